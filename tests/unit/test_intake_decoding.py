"""Where an upload is decoded: a small PNG or JPEG in the HTTP process, the rest in the pool,
with the same model input either way."""

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis

from cxr_triage.config import Settings
from cxr_triage.queue import JobQueue
from cxr_triage.repository import ModelRepository
from cxr_triage.serving.intake import Intake
from tests.helpers import chest_u8, dicom_bytes, jpeg_bytes, png_bytes

MODEL = "densenet121-nih14"


def intake(repo: Path, **settings: int) -> Intake:
    s = Settings(model_repo=repo, **{"decode_workers": 1, **settings})  # type: ignore[arg-type]
    queue = JobQueue(redis.Redis(), s.max_wait_s)  # never called: prepare does not queue
    return Intake(s, ModelRepository.load(repo), [MODEL], queue)


@contextmanager
def pools_shut(*intakes: Intake) -> Iterator[None]:
    """Shut down the decoding pools these intakes started, however the test ends."""
    try:
        yield
    finally:
        for i in intakes:
            if i._pool is not None:
                i._pool.shutdown()


def test_small_rasters_are_decoded_inline_and_the_rest_in_the_pool(exported_repo: Path) -> None:
    small = png_bytes(chest_u8(224))
    here, pooled = intake(exported_repo), intake(exported_repo, inline_decode_pixels=0)
    with pools_shut(here, pooled):
        inline = asyncio.run(here.prepare(small, "image/png", MODEL))
        assert here._pool is None  # no decoding process was needed
        asyncio.run(here.prepare(jpeg_bytes(chest_u8(224)), "image/jpeg", MODEL))
        assert here._pool is None
        asyncio.run(here.prepare(dicom_bytes("RG1_UNCR.dcm"), "application/dicom", MODEL))
        assert here._pool is not None  # DICOM: the pool
        via_pool = asyncio.run(pooled.prepare(small, "image/png", MODEL))
        assert pooled._pool is not None
        np.testing.assert_array_equal(inline.pixels, via_pool.pixels)  # the same model input
        assert (inline.source, inline.warnings) == (via_pool.source, via_pool.warnings)


def _page_faults(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[7])  # minflt


def test_a_decoding_process_reuses_its_image_buffers(exported_repo: Path) -> None:
    """keep_freed_memory in the decoders: a full-resolution JPEG after the first costs no fresh
    pages (glibc's defaults fault in ~1,400 per image here: a few ms of CPU each)."""
    full = jpeg_bytes(chest_u8())  # 1841 x 1955
    pooled = intake(exported_repo)
    with pools_shut(pooled):
        for _ in range(3):  # start the process, let its heap grow to an image's buffers
            asyncio.run(pooled.prepare(full, "image/jpeg", MODEL))
        assert pooled._pool is not None
        (pid,) = pooled._pool._processes
        before = _page_faults(pid)
        for _ in range(5):
            asyncio.run(pooled.prepare(full, "image/jpeg", MODEL))
        assert (_page_faults(pid) - before) / 5 < 100


def test_warm_calls_at_the_same_time_start_one_decoding_process(exported_repo: Path) -> None:
    """The start-up warm-up and a /ready probe arriving together share one call: two tasks
    submitted to a pool still starting would start two processes."""
    one = intake(exported_repo, decode_workers=4)

    async def together() -> None:
        await asyncio.gather(one.warm(), one.warm(), one.warm())
        assert one._pool is not None and len(one._pool._processes) == 1
        # Later (a probe comes seconds after): a new call, answered by the running process. The
        # pool's manager thread marks that process idle just after handing its answer over; a
        # call in between would make the pool start another, so wait as a probe's interval does.
        for _ in range(500):
            if one._pool._idle_worker_semaphore._value:  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.01)
        await one.warm()

    with pools_shut(one):
        asyncio.run(together())
        assert one._pool is not None and len(one._pool._processes) == 1
