"""encode's `index.json` (encode → train): what the encode output holds, per bucket and per shard.

The index names every shard with its sample count, per-sample repeats and item ids, and checksums (the tar's
size and digests, digests of its zarr rows, a hash of its samples' content), so train can plan epochs and choose
its held-out items from the index alone and check each shard whole before using it. Written once by encode's
rank 0 when every shard is done; read by train after checking it against encode's manifest.

Digests: every index records the tar's `sha256` and the rows' `zarr_sha256`; since 2026-12 encode also records
`blake3` and `zarr_blake3` (shards.DIGESTS), which a reader checks first (`matches`): ~5x faster, and in train's
first epoch the hash of every byte was most of the cost. An index without them (an older sdxl's) is checked by
sha256 as before. The record only gains keys, so the format version is unchanged: an older sdxl reads a new
index (it ignores keys it does not know, and checks sha256), and this one reads an old index.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Iterator

from shared.core import artifacts
from shared.core.errors import InputError
from shared.formats import location
from shared.formats.samples import ENCODE_VERSION, Layout, check_version, fix_for

FILE = "index.json"


#: ShardEntry fields left out of its record when None (keys an older sdxl neither writes nor reads)
OPTIONAL = ("blake3", "zarr_blake3")


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
    blake3: str | None = None       # of the tar (None: an index written before 2026-12)
    zarr_blake3: str | None = None  # of its zarr rows (shards.zarr_digest(..., "blake3"))

    @property
    def tar_digests(self) -> dict[str, str | None]:
        """{algorithm: digest} recorded of the tar (see `matches`)."""
        return {"sha256": self.sha256, "blake3": self.blake3}

    @property
    def rows_digests(self) -> dict[str, str | None]:
        """{algorithm: digest} recorded of its zarr rows (see `matches`)."""
        return {"sha256": self.zarr_sha256, "blake3": self.zarr_blake3}

    def to_json(self) -> dict:
        """Its fields, the blake3 ones only where recorded (without them: the record an older sdxl wrote)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
                if v is not None or k not in OPTIONAL}

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


def matches(recorded: dict[str, str | None], compute: Callable[[str], str]) -> bool:
    """Whether data is what `recorded` ({algorithm: digest or None}, as ShardEntry.tar_digests) says, `compute(a)`
    being the data's digest by algorithm `a`: by blake3 where recorded; else, or when that differs, by sha256,
    which every index records and which decides (an index edited by a tool that rewrote only its sha256 records
    still means what it says). The data is hashed whole before any use either way."""
    if recorded.get("blake3") and compute("blake3") == recorded["blake3"]:
        return True
    return recorded.get("sha256") is not None and compute("sha256") == recorded["sha256"]


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
