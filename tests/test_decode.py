"""The DALI decode path (CPU here) against the PIL path, per image, on the bucket plan's geometry."""
import dataclasses

import numpy as np
import pytest
from PIL import Image

from shared.formats.plan import PlanRow
from stages.encode import decode
from tests.conftest import save

pytestmark = pytest.mark.skipif(not decode.dali_available(), reason="nvidia-dali not installed")


def smooth_image(w: int, h: int, seed: int) -> Image.Image:
    """Gradients plus a few shapes: photo-like content, where resampling filters agree closely."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    arr = np.stack([xx / w * 255, yy / h * 255, (np.sin(xx / 17 + yy / 23) * 0.5 + 0.5) * 255], -1)
    for _ in range(4):
        x0, y0 = rng.integers(0, w - w // 4), rng.integers(0, h - h // 4)
        arr[y0:y0 + h // 5, x0:x0 + w // 5] = rng.integers(0, 256, 3)
    return Image.fromarray(arr.astype(np.uint8), "RGB")


def plan_item(tmp_path, name, img, fmt, *, resize, crop, bucket, mode="RGB", orientation=1, **save_kw):
    if orientation != 1:
        exif = Image.Exif()
        exif[0x0112] = orientation
        save_kw["exif"] = exif.tobytes()
    path = save(img, tmp_path / name, fmt, **save_kw)
    return PlanRow(id=path.stem, source=str(tmp_path), path=path.name, width=img.width, height=img.height,
                   format=fmt, mode=mode, frames=1, resize=resize, crop=crop, bucket=bucket)


def test_dali_cpu_matches_pil_per_image(tmp_path):
    """Tolerance: mean absolute difference <= 0.5 levels (of 255) and 99th percentile <= 2 per image (seen:
    means 0.00-0.17, 99th percentiles <= 1; the largest single differences, up to 11, are Lanczos ringing at
    edges when upscaling). The two
    paths use different JPEG decoders (libjpeg-turbo vs nvImageCodec) and Lanczos implementations, so exact
    equality is not expected; a wrong orientation, size, crop offset or channel order gives differences of
    tens of levels (checked below by shifting the crop by 4 pixels)."""
    base = smooth_image(480, 320, 0)
    items = [
        plan_item(tmp_path, "down.jpg", base, "JPEG", resize=(240, 160), crop=(24, 0), bucket=(192, 160), quality=95),
        plan_item(tmp_path, "up.png", base.resize((120, 80)), "PNG", resize=(240, 160), crop=(0, 0), bucket=(192, 128)),
        plan_item(tmp_path, "same.webp", base, "WEBP", resize=(480, 320), crop=(32, 0), bucket=(448, 320), lossless=True),
        plan_item(tmp_path, "rot6.jpg", base, "JPEG", resize=(160, 240), crop=(0, 16), bucket=(160, 192),
                  orientation=6, quality=95),
        plan_item(tmp_path, "grey.png", base.convert("L"), "PNG", resize=(240, 160), crop=(0, 0), bucket=(192, 128),
                  mode="L"),
        plan_item(tmp_path, "alpha.png", base.convert("RGBA"), "PNG", resize=(240, 160), crop=(0, 0),
                  bucket=(192, 128), mode="RGBA"),
    ]
    assert not decode.dali_can_decode(items[-1])  # transparency -> PIL inside the DALI path
    by_bucket: dict = {}
    for item in items:
        by_bucket.setdefault(item.bucket, []).append(item)
    batches = list(by_bucket.values())
    dali = list(decode.dali_batches(batches, batch_size=4, threads=2, gpu=None))
    for batch, got in zip(batches, dali):
        want = decode.pil_batch(batch)
        assert tuple(got.shape) == want.shape
        for k, item in enumerate(batch):
            diff = np.abs(got[k].numpy().astype(int) - want[k].astype(int))
            assert diff.mean() <= 0.5 and np.percentile(diff, 99) <= 2, (item.path, diff.mean())
            moved = dataclasses.replace(item, crop=(item.crop[0] + 4, item.crop[1]))
            shifted = decode.pil_batch([moved])[0] if item.resize[0] >= item.bucket[0] + 4 else None
            if shifted is not None:
                assert np.abs(got[k].numpy().astype(int) - shifted.astype(int)).mean() > 3


def test_resolve_decoder():
    assert decode.resolve_decoder("auto") == "dali"
    assert decode.resolve_decoder("pil") == "pil"


def test_without_any_nvidia_package_dali_is_simply_unavailable(monkeypatch):
    """find_spec('nvidia.dali') raises when no `nvidia` package exists at all (a plain install)."""
    import importlib.util

    from stages.encode import decode

    def no_nvidia(name, *a):
        raise ModuleNotFoundError("No module named 'nvidia'")

    monkeypatch.setattr(importlib.util, "find_spec", no_nvidia)
    assert decode.dali_available() is False and decode.resolve_decoder("auto") == "pil"
