"""Issue 15: the VAE as a training target on builtin:tiny. encode stores the planned crops' pixels (lossless PNG
/ WebP members, a uint8 zarr array); `train --target vae` fine-tunes the decoder (or encoder and decoder) with a
reconstruction + perceptual (+ KL) loss, resumes bitwise after kill -9, validates PSNR and perceptual distance
before vs after with a grid; export writes a diffusers AutoencoderKL folder and an original-layout single file."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from shared.core.config import resolve
from shared.formats import samples as fmt
from shared.formats import shards
from tests.conftest import caption, save


def smooth_image(size: int, seed: int) -> Image.Image:
    """A smooth random colour field (what a VAE can learn to reconstruct in a few steps, unlike noise)."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, size=(6, 6, 3), dtype=np.uint8), "RGB")
    return small.resize((size, size), Image.BICUBIC)


def encode_pixels(root: Path, pixels: str = "png", fmt_: str = "both") -> Path:
    """8 captioned 96x96 images -> one 64x64 bucket, 2 shards of 4, with the crops' pixels stored."""
    from stages import bucket, encode, ingest

    for i in range(8):
        p = save(smooth_image(96, 10 + i), root / "src" / f"img_{i:02d}.png")
        caption(p, f"colour {i % 4}, common")
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work, "workers": 1,
                                                    "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": 64 * 64, "min_side": 64,
                                                    "max_side": 64}))
    encode.run(resolve(encode.Config, "encode", {}, {"workdir": work, "model": "builtin:tiny", "shard_samples": 4,
                                                    "format": fmt_, "pixels": pixels, "workers": 0,
                                                    "decoder": "pil"}))
    return work


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    return encode_pixels(tmp_path_factory.mktemp("vae"))


def test_encode_stores_the_planned_crop_losslessly_in_tar_and_zarr(encoded, tmp_path):
    """Each sample's pixels are exactly the planned crop (what its latent was encoded from), in the tar as a
    PNG member and in the zarr store as uint8 rows; the layout records it; webp is lossless too."""
    from shared.formats.plan import read_plan
    from shared.images import load_planned

    index = json.loads((encoded / "encode" / "index.json").read_text())
    assert index["pixels"] == "png" and index["version"] == fmt.ENCODE_VERSION == 6
    plan = {r.id: r for r in read_plan(encoded / "bucket")}
    tars = sorted((encoded / "encode" / "shards").rglob("*.tar"))
    raw = [r for t in tars for r in shards.read_tar(t)]
    assert len(raw) == 8 and all("pixels.png" in r for r in raw)
    store = shards.open_store(encoded / "encode" / "zarr", mode="r")
    rows, keys = fmt.read_rows(store["64x64"], 0, 8)
    for r in raw:
        row = plan[r["__key__"]]
        want = load_planned(row.image, row.resize, row.crop, row.bucket)
        got = fmt.from_tar({**r, "json": json.dumps(r["json"]).encode()}, "t", "fix").pixels
        assert got.dtype == np.uint8 and np.array_equal(got, want)
        assert np.array_equal(rows["pixels"][keys.index(r["__key__"])], want)
    webp = fmt.image_array(fmt.image_bytes(want, "webp"), "w", "fix")
    assert np.array_equal(webp, want)
