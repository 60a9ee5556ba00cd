"""The loader benchmark's data: N synthetic SDXL-shaped samples written twice, by our own writers as an encode
output (tar shards + zarr store + index.json + empty/ + manifest, so train's reader checks everything as usual)
and as the common alternative, kohya's per-image cache (one latents `.npz` and one text-encoder `.npz` per image).

Shapes default to SDXL at 1024² (latent 4x128x128, text states 77x2048 = 768 + 1280, pooled 1280, float16) and
are configurable, so a smoke test can use tiny ones. The values are seeded random normals; every sample is
distinct.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from shared.core import artifacts
from shared.formats import samples as fmt
from shared.formats import shard_index, shards
from shared.formats.samples import WINDOW_TOKENS, EmptyCaption, Layout, Sample
from shared.formats.shard_index import BucketEntry, Index, ShardEntry


@dataclass(frozen=True)
class Shapes:
    side: int = 1024            # image side: latents are side/8 square
    channels: int = 4
    te_dims: tuple[int, int] = (768, 1280)   # the two text encoders' widths (kohya stores them apart)
    pooled: int = 1280
    dtype: str = "float16"

    @property
    def layout(self) -> Layout:
        return Layout(storage_dtype=self.dtype, latent_channels=self.channels, scaling_factor=0.13025,
                      te_dim=sum(self.te_dims), pooled_dim=self.pooled, variants=1, max_windows=1, flip=False,
                      token_ids=False)

    @property
    def bucket(self) -> tuple[int, int]:
        return (self.side, self.side)

    def sample_bytes(self) -> int:
        per = np.dtype(self.dtype).itemsize
        lat = self.channels * (self.side // 8) ** 2
        return per * (lat + WINDOW_TOKENS * sum(self.te_dims) + self.pooled)


def make_sample(i: int, shapes: Shapes, pool: list[dict[str, np.ndarray]]) -> Sample:
    """Sample i: one of a few random arrays, made distinct by its index in the first values."""
    base = pool[i % len(pool)]
    latent, te, pooled = base["latent"].copy(), base["te"].copy(), base["pooled"].copy()
    for a in (latent, te, pooled):
        a.flat[0] = i
    s = float(shapes.side)
    return Sample(key=f"{i:08d}", latent=latent, te=te[None], windows=(1,), pooled=pooled[None],
                  time_ids=(s, s, 0.0, 0.0, s, s), time_ids_flip=(s, s, 0.0, 0.0, s, s), path=f"img/{i:08d}.png",
                  source="bench", bucket=shapes.bucket, caption=f"sample {i}", variants=(f"sample {i}",),
                  original_size=(shapes.side, shapes.side), target_size=(shapes.side, shapes.side))


def random_pool(shapes: Shapes, seed: int, size: int = 8) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    lat = (shapes.channels, shapes.side // 8, shapes.side // 8)
    return [{"latent": rng.standard_normal(lat, np.float32).astype(shapes.dtype),
             "te": rng.standard_normal((WINDOW_TOKENS, sum(shapes.te_dims)), np.float32).astype(shapes.dtype),
             "pooled": rng.standard_normal(shapes.pooled, np.float32).astype(shapes.dtype)} for _ in range(size)]


def write_encode_output(out: Path, count: int, shapes: Shapes, shard_samples: int = 256, seed: int = 0,
                        compression: tuple[str, int] | None = None, digests: tuple[str, ...] = ("sha256",)) -> Index:
    """An encode output of `count` samples at `out` (format both; the zarr store chunked and compressed as
    encode writes it, `compression` = (codec, level), default encode's), committed with its manifest as encode
    commits one. `digests`: what index.json records of each shard (default: sha256 only, as an sdxl before
    2026-12 wrote it; encode now writes shards.DIGESTS, as the benchmark does)."""
    compression = compression or encode_compression()
    staging = artifacts.staging_dir(out)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    layout, bucket, group = shapes.layout, shapes.bucket, shard_index.group_name(shapes.bucket)
    fmt.write_empty(staging, EmptyCaption(te=np.zeros((WINDOW_TOKENS, layout.te_dim), shapes.dtype),
                                          pooled=np.zeros(layout.pooled_dim, shapes.dtype),
                                          ids=np.zeros((2, WINDOW_TOKENS), np.int32)))
    keys = [f"{i:08d}" for i in range(count)]
    store = shards.open_store(staging / "zarr", mode="a")
    shards.create_arrays(store, group, fmt.zarr_specs(layout, bucket, count), shards.zarr_codecs(*compression),
                         fmt.zarr_attrs(bucket, keys), shard_samples)
    pool, entries = random_pool(shapes, seed), []
    for k, first in enumerate(range(0, count, shard_samples)):
        batch = [make_sample(i, shapes, pool) for i in range(first, min(first + shard_samples, count))]
        entries.append(_write_shard(staging, store[group], group, k, first, batch, digests))
    index = Index("both", layout, (BucketEntry(bucket, tuple(entries)),), {})
    shard_index.write_index(staging, index)
    manifest = artifacts.Manifest(stage="encode", version=fmt.ENCODE_VERSION, code_version="bench",
                                  config={"bench": "loader", "samples": count}, inputs={},
                                  fingerprint=f"bench-loader-{count}-{seed}", counts={"in": count, "out": count},
                                  created=artifacts.now())
    artifacts.commit(staging, out, manifest, trees=("shards", "zarr"))
    return index


def encode_compression() -> tuple[str, int]:
    """encode's default zarr codec and level."""
    from stages.encode.config import Config

    found = {f.name: f.default for f in fields(Config)}
    return found["zarr_compression"], found["zarr_level"]


def _write_shard(staging: Path, group: object, name: str, k: int, first: int, batch: list[Sample],
                 digests: tuple[str, ...] = ("sha256",)) -> ShardEntry:
    rel = f"shards/{name}/{k:06d}.tar"
    (staging / rel).parent.mkdir(parents=True, exist_ok=True)
    members = [fmt.to_tar(s) for s in batch]
    written = shards.write_tar(staging / rel, members, tuple(dict.fromkeys(("sha256",) + tuple(digests))))
    fmt.write_rows(group, first, batch)
    content = hashlib.sha256()
    for m in members:
        for member, data in shards.sample_members(m):
            content.update(member.encode() + data)
    rows, keys = fmt.read_rows(group, first, first + len(batch))
    blake3 = "blake3" in digests
    return ShardEntry(name=rel, shard=k, first=first, samples=len(batch),
                      repeats=tuple(1 for _ in batch), bytes=written["bytes"], sha256=written["sha256"],
                      content_sha256=content.hexdigest(), zarr_sha256=fmt.rows_digest(rows, keys),
                      keys=tuple(s.key for s in batch), blake3=written["blake3"] if blake3 else None,
                      zarr_blake3=shards.zarr_digest(rows, keys, "blake3") if blake3 else None)


def write_per_file_cache(out: Path, count: int, shapes: Shapes, seed: int = 0) -> list[str]:
    """kohya's per-image cache of the same samples: `<id>_<W>x<H>_sdxl.npz` (latents, original_size,
    crop_ltrb) and `<id>_te_outputs.npz` (hidden_state1, hidden_state2, pool2), as `np.savez` writes them.
    Returns the ids."""
    out.mkdir(parents=True, exist_ok=True)
    pool, ids, split = random_pool(shapes, seed), [], shapes.te_dims[0]
    side = shapes.side
    for i in range(count):
        s = make_sample(i, shapes, pool)
        np.savez(out / f"{s.key}_{side:04d}x{side:04d}_sdxl.npz", latents=s.latent,
                 original_size=np.array([side, side]), crop_ltrb=np.array([0, 0, side, side]))
        np.savez(out / f"{s.key}_te_outputs.npz", hidden_state1=s.te[0][:, :split],
                 hidden_state2=s.te[0][:, split:], pool2=s.pooled[0])
        ids.append(s.key)
    return ids
