"""Encoded samples on disk: WebDataset tar shards and a zarr v3 store. Written by encode, read by train.

A tar shard is a plain POSIX tar; each sample is a run of members `<key>.<field>` (`.npy` arrays saved without
pickle, one `.json` of metadata), which is what `webdataset.WebDataset` reads. Members carry fixed owner,
mode and mtime, so the same samples always make the same bytes (and the same checksum).

The zarr store holds one group per bucket (`WxH`) with the same arrays stacked along the sample axis, chunked
one sample per chunk. Arrays whose length varies per sample (text states of long captions) are padded to the
store's maximum and come with their valid lengths.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from shared.core.artifacts import sha256_file
from shared.core.errors import DataError


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _member(name: str, data: bytes) -> tuple[tarfile.TarInfo, io.BytesIO]:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = len(data), 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info, io.BytesIO(data)


def sample_members(sample: dict[str, Any]) -> list[tuple[str, bytes]]:
    """`{"__key__": k, "latent.npy": array, "json": dict, ...}` as (member name, bytes), in a fixed order."""
    key = sample["__key__"]
    if "." in key or "/" in key:
        raise ValueError(f"sample key {key!r} may not contain '.' or '/'")
    out = []
    for field in sorted(k for k in sample if k != "__key__"):
        value = sample[field]
        if isinstance(value, np.ndarray):
            data = npy_bytes(value)
        elif isinstance(value, (dict, list)):
            data = json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8", "surrogateescape")
        elif isinstance(value, bytes):
            data = value
        else:
            raise TypeError(f"{field}: cannot store {type(value).__name__}")
        out.append((f"{key}.{field}", data))
    return out


def write_tar(path: Path, samples: list[dict[str, Any]]) -> dict:
    """Write `samples` to the tar `path` (fsynced); return {"samples", "bytes", "sha256"} of the file."""
    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for name, data in sample_members(sample):
                    tar.addfile(*_member(name, data))
        fh.flush()
        os.fsync(fh.fileno())
    return {"samples": len(samples), "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def decode_member(field: str, data: bytes) -> Any:
    if field.endswith(".npy"):
        return np.load(io.BytesIO(data), allow_pickle=False)
    if field == "json" or field.endswith(".json"):
        return json.loads(data.decode("utf-8", "surrogateescape"))
    return data


def tar_members(fileobj: Any, where: str) -> Iterator[dict[str, Any]]:
    """Samples of a tar stream as {"__key__": key, "<field>": raw bytes, ...}, in stored order."""
    current: dict[str, Any] | None = None
    try:
        with tarfile.open(fileobj=fileobj, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, field = info.name.partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                current[field] = tar.extractfile(info).read()
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{where}: unreadable shard ({e})") from None
    if current is not None:
        yield current


def read_tar(path: Path | str) -> Iterator[dict[str, Any]]:
    """Samples of a shard as dicts (arrays decoded, json parsed), in stored order."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise DataError(f"{path}: unreadable shard ({e})") from None
    with fh:
        for raw in tar_members(fh, str(path)):
            yield {k: (v if k == "__key__" else decode_member(k, v)) for k, v in raw.items()}


# ---------------------------------------------------------------- zarr


def zarr_codecs(compression: str, level: int) -> dict:
    """Keyword arguments for `create_array`: zstd, blosc (zstd + bit shuffle) or none."""
    import zarr.codecs as codecs

    if compression == "none":
        return {"compressors": None}
    if compression == "zstd":
        return {"compressors": codecs.ZstdCodec(level=level)}
    if compression == "blosc":
        return {"compressors": codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")}
    raise ValueError(compression)


def open_store(path: Path, mode: str = "a") -> Any:
    import zarr

    return zarr.open_group(store=str(path), mode=mode, zarr_format=3)


def create_arrays(store: Any, group: str, specs: dict[str, tuple[tuple[int, ...], str]], codecs: dict,
                  attrs: dict) -> None:
    """Create (if missing) group `group` with arrays {name: (shape, dtype)}, one sample per chunk."""
    g = store.require_group(group)
    for name, (shape, dtype) in specs.items():
        if name in g:
            continue
        g.create_array(name, shape=shape, chunks=(1,) + tuple(shape[1:]), dtype=dtype, fill_value=0, **codecs)
    g.attrs.update(attrs)


def zarr_digest(rows: dict[str, np.ndarray], keys: list[str]) -> str:
    """sha256 of one shard's rows in the zarr store: every array's rows (name, dtype, shape, bytes, by name)
    and the sample keys. Encode records it per shard; train recomputes it from what it reads."""
    h = hashlib.sha256()
    for name in sorted(rows):
        a = np.ascontiguousarray(rows[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.tobytes())
    h.update(json.dumps(list(keys), ensure_ascii=False).encode("utf-8", "surrogateescape"))
    return h.hexdigest()
