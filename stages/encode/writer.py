"""encode's writing side: the shards of a plan, the layout rank 0 prepares (the empty caption, one zarr group
per bucket), one shard's tar and zarr rows with its completion record, and the check a repair makes of it.

A shard's tar is written to `<name>.partial` and renamed once its zarr rows are in too; only then is its
record returned, and the executor marks it complete (shared/core/sharded.py). A crash leaves at most a
`.partial` file, and the shard is redone.
"""
from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from shared.core.faults import checkpoint
from shared.formats import samples as fmt
from shared.formats import shards
from shared.formats.plan import PlanRow
from shared.formats.samples import EmptyCaption, Layout, Sample
from shared.formats.shard_index import ShardEntry, group_name, matches


@dataclass(frozen=True)
class Shard:
    """Consecutive plan rows of one bucket: the unit of work of ranks and of resumption."""
    number: int             # global, in bucket order then shard order
    bucket: tuple[int, int]
    index: int              # within the bucket
    first: int              # row of its first sample within the bucket
    rows: tuple[PlanRow, ...]

    @property
    def group(self) -> str:
        return group_name(self.bucket)

    @property
    def name(self) -> str:
        """Its unit name (completion marker `done/<name>.json`)."""
        return f"{self.group}/{self.index:06d}"

    @property
    def tar(self) -> str:
        return f"shards/{self.name}.tar"


def plan_shards(rows: list[PlanRow], shard_samples: int) -> list[Shard]:
    """Per bucket (sorted by width, height), consecutive runs of the plan's rows."""
    by_bucket: dict[tuple[int, int], list[PlanRow]] = {}
    for row in rows:
        by_bucket.setdefault(row.bucket, []).append(row)
    out: list[Shard] = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        for k, start in enumerate(range(0, len(members), shard_samples)):
            out.append(Shard(len(out), bucket, k, start, tuple(members[start:start + shard_samples])))
    return out


@dataclass(frozen=True, eq=False)
class Made:
    """One sample of a shard as the shard's record keeps it."""
    sample: Sample
    key: str        # its sample key (reuse.sample_key): what a later run looks it up by
    cut: int        # its captions (variants counted) cut at max_windows
    reused: bool    # taken from the previous output rather than encoded


@dataclass(frozen=True)
class ShardRecord:
    """What a completed shard's marker holds: its index entry, what encode's finish sums up, and per sample
    its sample key and cut captions (what lets a later run reuse it)."""
    entry: ShardEntry
    bucket: tuple[int, int]
    tags: dict[str, int]                        # tag -> samples carrying it
    truncated_captions: int                     # captions (variants counted) cut at max_windows
    clip_similarity: tuple[float, ...] | None = None
    sample_keys: tuple[str, ...] = ()           # per sample (none in records of an older sdxl)
    cuts: tuple[int, ...] = ()                  # per sample: its captions cut at max_windows
    reused: int = 0                             # samples taken from the previous output

    @property
    def keys(self) -> tuple[str, ...]:
        """Its samples' item ids, in order."""
        return self.entry.keys

    def to_json(self) -> dict:
        out = {**self.entry.to_json(), "bucket": list(self.bucket), "tags": self.tags,
               "truncated_captions": self.truncated_captions}
        if self.clip_similarity is not None:
            out["clip_similarity"] = list(self.clip_similarity)
        out.update(sample_keys=list(self.sample_keys), cuts=list(self.cuts), reused=self.reused)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "ShardRecord":
        sims = data.get("clip_similarity")
        return cls(ShardEntry.from_json(data), tuple(data["bucket"]), dict(data["tags"]),
                   int(data["truncated_captions"]), None if sims is None else tuple(sims),
                   tuple(data.get("sample_keys", ())), tuple(int(c) for c in data.get("cuts", ())),
                   int(data.get("reused", 0)))


def prepare(staging: Path, plan: list[Shard], layout: Layout, empty: EmptyCaption, codecs: dict | None) -> None:
    """Before any shard: the empty caption, and (codecs given: a zarr store) each bucket's arrays."""
    fmt.write_empty(staging, empty)
    if codecs is None:
        return
    store = shards.open_store(staging / "zarr", mode="a")
    groups: dict[tuple[int, int], list[str]] = {}
    chunk_rows: dict[tuple[int, int], int] = {}
    for s in plan:
        groups.setdefault(s.bucket, []).extend(r.id for r in s.rows)
        chunk_rows[s.bucket] = max(chunk_rows.get(s.bucket, 1), len(s.rows))
    for bucket, keys in groups.items():  # one chunk per shard: a bucket's shards are runs of its first's length
        shards.create_arrays(store, group_name(bucket), fmt.zarr_specs(layout, bucket, len(keys)), codecs,
                             fmt.zarr_attrs(bucket, keys), chunk_rows[bucket])


def write_shard(staging: Path, shard: Shard, made: list[Made], wds: bool, zarr: bool,
                pixels: str = "png") -> ShardRecord:
    """The shard's tar (to a temporary name, renamed last) and zarr rows; its record. `pixels`: the image
    format of the samples' pixels in the tar (when they have them)."""
    samples = [m.sample for m in made]
    members = tar_members(samples, pixels)
    entry: dict[str, Any] = {"shard": shard.index, "first": shard.first, "samples": len(samples),
                             "repeats": tuple(int(s.repeats) for s in samples),
                             "content_sha256": content_hash(members), "keys": tuple(s.key for s in samples)}
    final = staging / shard.tar
    tmp = final.with_name(final.name + ".partial")
    if wds:
        final.parent.mkdir(parents=True, exist_ok=True)
        written = shards.write_tar(tmp, members)
        entry.update(name=shard.tar, bytes=written["bytes"], sha256=written["sha256"], blake3=written["blake3"])
    if zarr:
        group = shards.open_store(staging / "zarr", mode="a")[shard.group]
        fmt.write_rows(group, shard.first, samples)
        digests = zarr_rows_digests(group, shard.first, len(samples), staging / "zarr" / shard.group)
        entry.update(zarr_sha256=digests["sha256"], zarr_blake3=digests["blake3"])
    if wds:
        tmp.replace(final)
    checkpoint("encode.shard")
    sims = tuple(s.clip_similarity for s in samples) if samples and samples[0].clip_similarity is not None \
        else None
    return ShardRecord(ShardEntry(**entry), shard.bucket, tag_counts(s.tags for s in samples),
                       sum(m.cut for m in made), sims, tuple(m.key for m in made), tuple(m.cut for m in made),
                       sum(m.reused for m in made))


def tar_members(samples: list[Sample], pixels: str) -> list[dict]:
    """The samples' tar members, in order; with pixels, their images compressed in threads (PIL releases the
    GIL: a 1024² PNG takes ~0.17 s, lossless WebP ~0.27 s, which one thread would add to every sample)."""
    if not samples or samples[0].pixels is None:
        return [fmt.to_tar(s, pixels) for s in samples]
    with ThreadPoolExecutor(max(1, min(len(samples), os.cpu_count() or 1, 8))) as pool:
        return list(pool.map(lambda s: fmt.to_tar(s, pixels), samples))


def zarr_rows_digests(group: Any, first: int, count: int, where: Path | None = None) -> dict[str, str]:
    """{algorithm: digest} (shards.DIGESTS) of what the store now holds for a shard's rows (read back once, from
    the chunk files at `where` as train reads them)."""
    rows, keys = fmt.read_rows(group, first, first + count, where=where)
    return {a: shards.zarr_digest(rows, keys, a) for a in shards.DIGESTS}


def content_hash(members: list[dict]) -> str:
    """sha256 of the samples' tar members (names and bytes), whatever format holds them."""
    h = hashlib.sha256()
    for m in members:
        for name, data in shards.sample_members(m):
            h.update(name.encode("utf-8", "surrogateescape"))
            h.update(data)
    return h.hexdigest()


def tag_counts(tag_lists: Iterable[Iterable[str]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for t in tags:
            counts[t] = counts.get(t, 0) + 1
    return counts


def shard_intact(staging: Path, record: ShardRecord, store: Any) -> bool:
    """Whether a finished shard's tar and zarr rows (`store`: the open store, or None) still match its record
    (shard_index.matches: by blake3 where it records one, else sha256)."""
    entry = record.entry
    if entry.name:
        tar = staging / entry.name
        if not tar.is_file() or tar.stat().st_size != entry.bytes \
                or not matches(entry.tar_digests, lambda a: shards.file_digests(tar, (a,))[a]):
            return False
    if store is None:
        return True
    try:
        group = store[group_name(record.bucket)]
        rows, keys = fmt.read_rows(group, entry.first, entry.first + entry.samples,
                                   where=staging / "zarr" / group_name(record.bucket))
        return matches(entry.rows_digests, lambda a: shards.zarr_digest(rows, keys, a))
    except Exception:  # noqa: BLE001 - unreadable rows are damaged rows
        return False
