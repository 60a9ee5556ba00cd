"""Shared test helpers: image makers for good and bad inputs, a CLI runner."""
from __future__ import annotations

import io
import os
import tempfile
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

os.environ.setdefault("SDXL_PROGRESS", "0")
# builtin models are materialised once per test session into a fresh cache, so tests never depend on ~/.cache
os.environ["SDXL_CACHE"] = tempfile.mkdtemp(prefix="sdxl-test-cache-")


def noise_image(width: int, height: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(arr, "RGB").convert(mode)


def save(img: Image.Image, path: Path, fmt: str | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, fmt, **kw)
    return path


def caption(path: Path, text: str | bytes) -> Path:
    cap = path.with_suffix(".txt")
    cap.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return cap


def png_with_header_size(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny (wrong) body: a decompression-bomb header."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def jpeg_bytes(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", **kw)
    return buf.getvalue()


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def make_dataset(root: Path, count: int = 12, seed: int = 0) -> Path:
    """`count` small captioned noise images of a few aspect ratios."""
    sizes = [(320, 320), (480, 320), (320, 480), (640, 320), (300, 400)]
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        p = save(noise_image(w, h, seed=seed * 1000 + i), root / f"img_{i:03d}.png")
        caption(p, f"tag{i % 3}, common, shape {i % 2}")
    return root


def encode_sixteen(root: Path) -> Path:
    """16 captioned 256x256 images -> one 128x128 bucket, 4 shards of 4, tar + zarr, flipped latents, token ids;
    the work folder (what the train and launcher tests train from)."""
    for i in range(16):
        p = save(noise_image(256, 256, seed=100 + i), root / "src" / f"img_{i:02d}.png")
        caption(p, f"colour {i % 4}, shape {i % 3}, common")
    return encode_folder(root, max_area=128 * 128, max_side=256, shard_samples=4, format="both", flip=True,
                         caption_variants=1, token_ids=True)


def encode_folder(root: Path, max_area: int, max_side: int, **encode: object) -> Path:
    """ingest -> bucket -> encode (builtin:tiny, PIL, in process) of the captioned images in `root`/src into the
    work folder `root`/w, which is returned; `encode` holds the encode options."""
    from shared.core.config import resolve
    from stages import bucket, encode as encode_stage, ingest

    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work, "workers": 1,
                                                    "min_side": 64}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": max_area, "min_side": 64,
                                                    "max_side": max_side}))
    encode_stage.run(resolve(encode_stage.Config, "encode", {}, {"workdir": work, "model": "builtin:tiny", "workers": 0,
                                                                "decoder": "pil", **encode}))
    return work
