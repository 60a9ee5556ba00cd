"""encode's `index.json` (encode → train): what the encode output holds, per bucket and per shard.

The index names every shard with its sample count, per-sample repeats and item ids, and checksums (the tar's
size and sha256, a digest of its zarr rows, a hash of its samples' content), so train can plan epochs and choose
its held-out items from the index alone and check each shard whole before using it. Written once by encode's
rank 0 when every shard is done; read by train after checking it against encode's manifest.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

from shared.core import artifacts
from shared.core.errors import InputError
from shared.formats import location
from shared.formats.samples import ENCODE_VERSION, Layout, check_version, fix_for

FILE = "index.json"


@dataclass(frozen=True, kw_only=True)
class ShardEntry:
    """One shard: `samples` consecutive items of a bucket, rows `first`.. of its zarr group."""
    name: str | None = None         # the tar, relative to the encode folder (None: zarr only)
    shard: int                      # within its bucket
    first: int
    samples: int
    repeats: tuple[int, ...]        # per sample
    bytes: int | None = None        # of the tar
    sha256: str | None = None       # of the tar
    content_sha256: str             # of its samples' tar members (whatever the format)
    zarr_sha256: str | None = None  # of its zarr rows (samples.rows_digest)
    keys: tuple[str, ...] = ()      # per sample, its item id (what train's held-out choice reads)

    def to_json(self) -> dict:
        return {f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v for f in fields(self)}

    @classmethod
    def from_json(cls, data: dict) -> "ShardEntry":
        values = {f.name: data[f.name] for f in fields(cls) if f.name in data}
        values["repeats"] = tuple(int(r) for r in values["repeats"])
        values["keys"] = tuple(str(k) for k in values.get("keys", ()))
        entry = cls(**values)
        for name in ("repeats", "keys"):
            if len(getattr(entry, name)) != entry.samples:
                raise ValueError(f"shard {entry.name or entry.shard}: {len(getattr(entry, name))} {name} for "
                                 f"{entry.samples} samples")
        return entry


def group_name(bucket: tuple[int, int]) -> str:
    """A bucket's name in the zarr store and under shards/: `WxH`."""
    return f"{bucket[0]}x{bucket[1]}"


@dataclass(frozen=True)
class BucketEntry:
    bucket: tuple[int, int]         # (width, height)
    shards: tuple[ShardEntry, ...]

    @property
    def group(self) -> str:
        return group_name(self.bucket)

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass(frozen=True)
class Index:
    format: str                     # wds | zarr | both
    layout: Layout
    buckets: tuple[BucketEntry, ...]
    tag_frequency: dict[str, int]   # over every sample's tags (not counting repeats)
    version: int = ENCODE_VERSION

    @property
    def samples(self) -> int:
        return sum(b.samples for b in self.buckets)

    def shards(self) -> Iterator[tuple[BucketEntry, ShardEntry]]:
        """Every shard with its bucket, in order (bucket by bucket)."""
        for b in self.buckets:
            for s in b.shards:
                yield b, s

    def to_json(self) -> dict:
        return {"version": self.version, "format": self.format, "samples": self.samples, **self.layout.to_json(),
                "buckets": [{"bucket": list(b.bucket), "samples": b.samples,
                             "shards": [s.to_json() for s in b.shards]} for b in self.buckets],
                "tag_frequency": dict(sorted(self.tag_frequency.items(), key=lambda kv: (-kv[1], kv[0])))}

    @classmethod
    def from_json(cls, data: dict) -> "Index":
        buckets = tuple(BucketEntry(tuple(b["bucket"]), tuple(ShardEntry.from_json(s) for s in b["shards"]))
                        for b in data["buckets"])
        index = cls(data["format"], Layout.from_json(data), buckets, dict(data.get("tag_frequency", {})),
                    data["version"])
        for b, raw in zip(buckets, data["buckets"]):
            if raw.get("samples", b.samples) != b.samples:
                raise ValueError(f"bucket {b.group}: {raw['samples']} samples, its shards hold {b.samples}")
        if data.get("samples", index.samples) != index.samples:
            raise ValueError(f"{data['samples']} samples, its buckets hold {index.samples}")
        return index


def write_index(folder: Path, index: Index) -> None:
    artifacts.write_atomic(Path(folder) / FILE, json.dumps(index.to_json(), indent=1) + "\n")


def read_index(folder: Path | str, manifest: artifacts.Manifest) -> Index:
    """`folder/index.json` (a folder or URL), checked against encode's manifest, its version and its own sums."""
    fix = fix_for(folder)
    path = location.join(folder, FILE)
    try:
        data = json.loads(location.verified_bytes(folder, FILE, manifest.files, fix).decode("utf-8"))
    except ValueError as e:
        raise InputError(f"{path}: unreadable ({e}); rerun: {fix}") from None
    check_version(data.get("version") if isinstance(data, dict) else None, str(path), fix)
    try:
        return Index.from_json(data)
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a valid encode index ({type(e).__name__}: {e}); rerun: {fix}") from None
