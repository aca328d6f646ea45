import numpy as np
from PIL import Image

from cxr_triage.imaging import resize_for_model, to_batch
from cxr_triage.imaging.preprocess import resize_levels, to_unit
from cxr_triage.repository.models import InputSpec


def test_letterbox_keeps_aspect_and_pads_black() -> None:
    tall = np.ones((200, 100), dtype=np.float32)
    out = resize_for_model(tall, InputSpec(size=64, resize="letterbox"))
    assert out.shape == (64, 64)
    assert out[:, :14].max() == 0.0 and out[:, -14:].max() == 0.0  # side bands
    np.testing.assert_allclose(out[:, 20:44], 1.0, atol=1e-5)


def test_squash_fills_the_square() -> None:
    out = resize_for_model(np.ones((200, 100), dtype=np.float32), InputSpec(size=64, resize="squash"))
    np.testing.assert_allclose(out, 1.0, atol=1e-5)


def test_downsizing_is_antialiased() -> None:
    stripes = np.tile(np.array([0.0, 1.0], dtype=np.float32), (512, 256))  # 1-pixel stripes
    out = resize_for_model(stripes, InputSpec(size=64, resize="squash"))
    assert abs(float(out.mean()) - 0.5) < 0.02 and float(out.std()) < 0.05


def test_to_batch_normalises_each_channel() -> None:
    spec = InputSpec(size=16, channels=3, mean=(0.5, 0.4, 0.3), std=(0.5, 0.25, 0.1))
    batch = to_batch([np.full((16, 16), 0.5, dtype=np.float32)] * 2, spec)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 0, 0], [0.0, 0.4, 2.0], atol=1e-6)


def test_an_image_already_at_the_model_size_is_not_resampled_and_gives_the_same_floats() -> None:
    """The short cut for an upload already at the model's size (no Pillow round trip) gives what
    Pillow's resize to the same size gives (a copy), bit for bit, padded as before."""
    rng = np.random.default_rng(0)
    for shape, resize in (((64, 64), "squash"), ((64, 64), "letterbox"), ((64, 40), "letterbox")):
        pixels = rng.random(shape, dtype=np.float32)
        spec = InputSpec(size=64, resize=resize)
        out = resize_for_model(pixels, spec)
        rows, cols = shape
        same = np.asarray(Image.fromarray(pixels, mode="F").resize((cols, rows), Image.Resampling.BILINEAR))
        want = np.zeros((64, 64), dtype=np.float32)
        left = (64 - cols) // 2
        want[:, left : left + cols] = same
        assert out.shape == (64, 64) and out.dtype == np.float32
        assert np.array_equal(out.view(np.uint32), want.view(np.uint32)), (shape, resize)


def _levels_cases() -> list[tuple[Image.Image, float, float]]:
    """8-bit and 16-bit level images, larger, smaller and at the model's size, with their range."""
    rng = np.random.default_rng(1)
    out = []
    for rows, cols in ((300, 200), (64, 64), (64, 40), (20, 50)):
        gray8 = (rng.random((rows, cols)) * 255).astype(np.uint8)
        out.append((Image.fromarray(gray8, mode="L"), 0.0, 255.0))
        gray16 = (rng.random((rows, cols)) * 60000 + 1000).astype(np.uint16)
        out.append((Image.fromarray(gray16), float(gray16.min()), float(gray16.max())))
    return out


def test_resizing_levels_then_mapping_them_gives_the_floats_of_mapping_then_resizing() -> None:
    """``resize_levels`` (what ``prepare`` runs for PNG and JPEG) gives what resizing the 0-1
    image gives, to float32 rounding, and bit for bit when the image is already at size."""
    for resize in ("letterbox", "squash"):
        spec = InputSpec(size=64, resize=resize)
        for image, lo, hi in _levels_cases():
            unit = ((np.asarray(image, dtype=np.float32) - lo) / (hi - lo)).astype(np.float32)
            want = resize_for_model(unit, spec)
            got = resize_levels(image, lo, hi, spec)
            assert got.shape == (64, 64) and got.dtype == np.float32
            assert got.min() >= 0.0 and got.max() <= 1.0
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6, err_msg=f"{image.mode} {image.size}")
            if image.size == (64, 64) or (resize == "letterbox" and image.size == (40, 64)):
                assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (image.mode, image.size)
            assert got.std() > 0.05  # a real image came through, not the padding


def test_a_flat_image_maps_to_black() -> None:
    flat = Image.fromarray(np.full((90, 70), 500, dtype=np.uint16))
    assert not resize_levels(flat, 500.0, 500.0, InputSpec(size=32)).any()
    assert not to_unit(np.full((4, 4), 3.0, dtype=np.float32), 3.0, 3.0).any()
