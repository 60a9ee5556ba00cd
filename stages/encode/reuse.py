"""Incremental encode: the previous finished output at `--out` as a read-only store of encoded samples.

A sample's arrays (latents, text states, token ids, CLIP embeddings) depend on its item's pixels and crop, its
captions, the model and the options that shape them, and the code that computed them. `sample_key` hashes
exactly that: every field of the item's plan row except the descriptive ones (path, source, tag weight,
repeats: `items.described` takes those from the current row, so a tag weight moved by new images does not
re-encode anything), plus `run_key` (encode's code version, its model / decoder / CLIP identities, every
fingerprinted option but the storage-only ones, and the numeric setup: batch size, device, library versions,
which decide the arrays' last bits). Each shard's completion record keeps its samples' keys, so a
later run finds a sample without opening any shard.

`Previous.take` reads the samples it is asked for from their old shards, each shard checked whole first (a
tar's size and sha256, else its zarr rows' digest, as recorded) and each record checked against the old
manifest; a sample that does not check out is simply not returned, and encode encodes it again. Nothing here
writes: the old output stays as it is until the new one replaces it at commit.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from shared.core import artifacts
from shared.core.config import fingerprinted
from shared.core.errors import PipelineError
from shared.core.integrity import HashingReader
from shared.core.log import warn
from shared.formats import samples as fmt
from shared.formats import shards
from shared.formats.plan import PlanRow
from shared.formats.samples import ENCODE_VERSION, Sample
from shared.formats.shard_index import group_name
from stages.encode.config import Config
from stages.encode.writer import ShardRecord

#: options that decide where and how samples are stored, never what a sample holds
STORAGE_ONLY = ("format", "shard_samples", "zarr_compression", "zarr_level")
#: plan row fields that reach a sample only as its description (taken from the current row, never reused)
DESCRIPTIVE = ("path", "source", "caption_path", "caption_encoding", "tag_weight", "repeats", "role")


def run_key(cfg: Config, inputs: dict, code_version: str, numerics: dict) -> str:
    """What every sample's arrays depend on besides its own item: encode's code, the identities of its models
    and decoder (its inputs but the plan, which `sample_key` covers row by row), the shaping options and the
    numeric setup (`Encoders.numerics`: batch shape, device, libraries)."""
    options = {k: v for k, v in fingerprinted(cfg).items() if k not in STORAGE_ONLY}
    models = {k: v["fingerprint"] for k, v in sorted(inputs.items()) if k != "bucket"}
    return artifacts.hash_json({"code": code_version, "options": options, "inputs": models, "numerics": numerics})


def sample_key(row: PlanRow, run: str) -> str:
    """The key of an item's sample: equal keys, equal arrays. Covers every field of the row but DESCRIPTIVE
    ones (a field a newer bucket or ingest adds is covered until it is known to be descriptive)."""
    item = {k: v for k, v in row.to_json().items() if k not in DESCRIPTIVE}
    return artifacts.hash_json({"run": run, "item": item})


class Previous:
    """The samples of a finished encode output, by sample key; empty when there is none to reuse (`note`
    says why)."""

    def __init__(self, folder: Path, where: dict[str, tuple[ShardRecord, int]], note: str):
        self.folder, self.where, self.note = Path(folder), where, note
        self._store: Any = None
        self._last: tuple[str, list[Sample]] = ("", [])  # the old shard read last: consecutive new shards
        self._bad: set[str] = set()                          # mostly take from the same one

    @classmethod
    def open(cls, folder: Path, enabled: bool = True) -> "Previous":
        """The finished encode output at `folder` (its manifest of this format, each completion record
        checked against it), or an empty store saying why there is none."""
        folder = Path(folder)
        if not enabled:
            return cls(folder, {}, "--no-reuse")
        manifest = artifacts.read_manifest(folder)
        if manifest is None:
            return cls(folder, {}, f"no previous output at {folder}")
        if manifest.stage != "encode" or manifest.version != ENCODE_VERSION or manifest.files is None:
            return cls(folder, {}, f"{folder} is not an encode output of format {ENCODE_VERSION}")
        where: dict[str, tuple[ShardRecord, int]] = {}
        for rel, rec in sorted(manifest.files.items()):
            record = _record(folder / rel, rec) if rel.startswith("done/") else None
            for position, key in enumerate(record.sample_keys if record else ()):
                where.setdefault(key, (record, position))
        note = "" if where else f"{folder} records no sample keys (an older sdxl wrote it)"
        return cls(folder, where, note)

    def __contains__(self, key: str) -> bool:
        return key in self.where

    def take(self, keys: dict[str, str]) -> dict[str, tuple[Sample, int]]:
        """{item id: (its sample as stored, its captions cut)} for the {item id: sample key} found here whose
        old shard checks out; others are left out (encode encodes them)."""
        out = {}
        for item, key in keys.items():
            if key in self.where:
                record, position = self.where[key]
                stored = self._shard(record)
                if stored is not None:
                    out[item] = (stored[position], record.cuts[position])
        return out

    def _shard(self, record: ShardRecord) -> list[Sample] | None:
        """An old shard's samples, once it checks out whole; None (and one warning) if it does not."""
        name = f"{group_name(record.bucket)}/{record.entry.shard:06d}"
        if name in self._bad:
            return None
        if self._last[0] != name:
            found = self._tar(record) if record.entry.name else None
            if found is None and record.entry.zarr_sha256:
                found = self._zarr(record)
            if found is None:
                self._bad.add(name)
                warn(f"encode: shard {name} of {self.folder} does not match its record; its samples are "
                     f"encoded again")
                return None
            self._last = (name, found)
        return self._last[1]

    def _tar(self, record: ShardRecord) -> list[Sample] | None:
        entry, path = record.entry, self.folder / str(record.entry.name)
        try:
            with open(path, "rb") as fh:
                reader = HashingReader(fh)
                raw = list(shards.tar_members(reader, str(path)))
                reader.drain()
            if (reader.bytes, reader.sha.hexdigest()) != (entry.bytes, entry.sha256) \
                    or [r["__key__"] for r in raw] != list(record.keys):
                return None
            return [fmt.from_tar(r, str(path), fmt.fix_for(self.folder)) for r in raw]
        except (OSError, PipelineError, KeyError, ValueError):
            return None

    def _zarr(self, record: ShardRecord) -> list[Sample] | None:
        entry = record.entry
        try:
            if self._store is None:
                self._store = shards.open_store(self.folder / "zarr", mode="r")
            group = self._store[group_name(record.bucket)]
            fmt.check_group(group, str(self.folder / "zarr"), fmt.fix_for(self.folder))
            rows, keys = fmt.read_rows(group, entry.first, entry.first + entry.samples,
                                       where=self.folder / "zarr" / group_name(record.bucket))
        except Exception:  # noqa: BLE001 - a store or rows that cannot be read are not reused
            return None
        if keys != list(record.keys) or fmt.rows_digest(rows, keys) != entry.zarr_sha256:
            return None
        return list(fmt.from_rows(rows, keys))


def _record(path: Path, recorded: dict) -> ShardRecord | None:
    """A completion record of the old output, if it is the file its manifest recorded and is well formed."""
    try:
        data = path.read_bytes()
        if len(data) != recorded["bytes"] or hashlib.sha256(data).hexdigest() != recorded["sha256"]:
            return None
        record = ShardRecord.from_json(json.loads(data))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    n = record.entry.samples
    return record if len(record.keys) == len(record.sample_keys) == len(record.cuts) == n else None
