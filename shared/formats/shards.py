"""Encoded samples on disk: WebDataset tar shards and a zarr v3 store. Written by encode, read by train.

A tar shard is a plain POSIX tar; each sample is a run of members `<key>.<field>` (`.npy` arrays saved without
pickle, one `.json` of metadata), which is what `webdataset.WebDataset` reads. Members carry fixed owner,
mode and mtime, so the same samples always make the same bytes (and the same checksum).

Checksums (`DIGESTS`): what encode records of a shard's bytes, and train checks before using them. sha256 is
recorded in every index (all that an sdxl before 2026-12 records and checks, and what encode's reuse of a previous
output checks); BLAKE3 is recorded beside it since, and checked instead where recorded: ~4 GB/s on one core
against sha256's ~0.8–1.8 GB/s (SHA-NI), and able to spread one large shard over every core.

The zarr store holds one group per bucket (`WxH`) with the same arrays stacked along the sample axis, chunked
one shard per chunk (encode's shards are consecutive rows of `shard_samples`), so a shard is one object per
array: one request and one decompression call each. Arrays whose length varies per sample (text states of long
captions) are padded to the store's maximum and come with their valid lengths.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import blake3
import numpy as np

from shared.core.errors import DataError

#: the digests of a shard's bytes: sha256 (every index), blake3 (indexes written since 2026-12; checked first)
DIGESTS = ("sha256", "blake3")


def hasher(algorithm: str) -> Any:
    """A new hash object of `algorithm` (one of DIGESTS), hashlib's interface (update, hexdigest); both release
    the GIL while hashing a large buffer, and blake3 spreads one over the cores (Rust's shared thread pool)."""
    if algorithm == "blake3":
        return blake3.blake3(max_threads=blake3.blake3.AUTO)
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"digest {algorithm!r}: expected one of {', '.join(DIGESTS)}")


def digest(data: Any, algorithm: str) -> str:
    """The hex digest of a bytes-like object (bytes, memoryview, a contiguous numpy array)."""
    h = hasher(algorithm)
    h.update(data)
    return h.hexdigest()


def file_digests(path: Path, algorithms: tuple[str, ...] = DIGESTS, chunk: int = 8 << 20) -> dict[str, str]:
    """{algorithm: hex digest} of a file, read once."""
    hashers = {a: hasher(a) for a in algorithms}
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            for h in hashers.values():
                h.update(block)
    return {a: h.hexdigest() for a, h in hashers.items()}


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


def write_tar(path: Path, samples: list[dict[str, Any]], digests: tuple[str, ...] = DIGESTS) -> dict:
    """Write `samples` to the tar `path` (fsynced); return {"samples", "bytes"} of the file and its digests
    (`digests`: the algorithms, each a key)."""
    with open(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample in samples:
                for name, data in sample_members(sample):
                    tar.addfile(*_member(name, data))
        fh.flush()
        os.fsync(fh.fileno())
    return {"samples": len(samples), "bytes": path.stat().st_size, **file_digests(path, digests)}


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


# ---------------------------------------------------------------- a tar held in memory


def ustar_members(view: memoryview) -> Iterator[tuple[str, int, int]]:
    """(name, data offset, size) of each regular file of a USTAR tar held in memory.

    Written by hand: tarfile parses every header field in Python (~20 µs a member, most of a shard's listing
    time); this reads only what `write_tar` sets — name, prefix, size, type — and is used on bytes already
    checked against encode's digest, so they are `write_tar`'s. Anything else (pax / GNU headers) is refused."""
    pos, end = 0, len(view)
    while pos + 512 <= end:
        header = view[pos:pos + 512].tobytes()
        if header == _ZERO_BLOCK:
            return
        if header[257:262] != b"ustar" or header[156:157] not in (b"0", b"\0", b"5"):
            raise ValueError(f"member at byte {pos}: not a plain USTAR file header")
        size = int(header[124:136].rstrip(b"\0 ") or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        prefix = header[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
        if pos + 512 + size > end:
            raise ValueError(f"member {name!r} runs past the end")
        if header[156:157] != b"5":
            yield name.decode("utf-8", "surrogateescape"), pos + 512, size
        pos += 512 + -(-size // 512) * 512
    raise ValueError("no end-of-archive marker")


_ZERO_BLOCK = bytes(512)


def tar_samples(data: Any, where: str) -> Iterator[dict[str, Any]]:
    """Samples of a whole tar written by `write_tar`, held in memory, in stored order: {"__key__": key,
    "<name>.npy": array, "<field>": bytes}. Arrays are views of `data` (no copy; writable if `data` is)."""
    view = memoryview(data).cast("B")
    current: dict[str, Any] | None = None
    try:
        for name, offset, size in ustar_members(view):
            key, _, field = name.partition(".")
            if current is None or current["__key__"] != key:
                if current is not None:
                    yield current
                current = {"__key__": key}
            current[field] = (npy_view(view, offset, size) if field.endswith(".npy")
                              else view[offset:offset + size].tobytes())
    except ValueError as e:
        raise DataError(f"{where}: unreadable shard ({e})") from None
    if current is not None:
        yield current


_NPY_HEADERS: dict[bytes, tuple[np.dtype, tuple[int, ...], bool]] = {}


def npy_view(view: memoryview, offset: int, size: int) -> np.ndarray:
    """The array of the `.npy` bytes view[offset:offset+size], viewing them. Pickled (object) arrays are
    refused, as np.load(allow_pickle=False) does; headers are parsed once per distinct header."""
    head = view[offset:offset + 12].tobytes()
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise ValueError("not a .npy member")
    start = 10 + int.from_bytes(head[8:10], "little") if head[6] == 1 else 12 + int.from_bytes(head[8:12], "little")
    header = view[offset:offset + start].tobytes()
    parsed = _NPY_HEADERS.get(header)
    if parsed is None:
        parsed = _npy_header(header)
        if len(_NPY_HEADERS) < 4096:
            _NPY_HEADERS[header] = parsed
    dtype, shape, fortran = parsed
    count = math.prod(shape)
    if start + count * dtype.itemsize != size:
        raise ValueError(f"a .npy member of {size} bytes does not hold {shape} {dtype}")
    array = np.frombuffer(view, dtype, count, offset + start)
    return array.reshape(shape[::-1]).T if fortran else array.reshape(shape)


def _npy_header(header: bytes) -> tuple[np.dtype, tuple[int, ...], bool]:
    fp = io.BytesIO(header)
    version = np.lib.format.read_magic(fp)
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    if version not in readers:
        raise ValueError(f".npy format {version} (np.save writes 1.0 or 2.0)")
    shape, fortran, dtype = readers[version](fp)
    if dtype.hasobject:
        raise ValueError("an object (pickled) array; refused")
    return dtype, tuple(shape), fortran


# ---------------------------------------------------------------- zarr


def zarr_codecs(compression: str, level: int) -> dict:
    """Keyword arguments for `create_array`: lz4 (blosc lz4 + byte shuffle), blosc (blosc zstd + bit shuffle),
    zstd or none."""
    import zarr.codecs as codecs

    if compression == "none":
        return {"compressors": None}
    if compression == "zstd":
        return {"compressors": codecs.ZstdCodec(level=level)}
    if compression == "blosc":
        return {"compressors": codecs.BloscCodec(cname="zstd", clevel=level, shuffle="bitshuffle")}
    if compression == "lz4":
        return {"compressors": codecs.BloscCodec(cname="lz4", clevel=level, shuffle="shuffle")}
    raise ValueError(compression)


def open_store(path: Path, mode: str = "a") -> Any:
    import zarr

    return zarr.open_group(store=str(path), mode=mode, zarr_format=3)


def create_arrays(store: Any, group: str, specs: dict[str, tuple[tuple[int, ...], str]], codecs: dict,
                  attrs: dict, chunk_rows: int = 1) -> None:
    """Create (if missing) group `group` with arrays {name: (shape, dtype)}, `chunk_rows` samples per chunk
    (encode: a shard's; fewer when the group holds fewer)."""
    g = store.require_group(group)
    for name, (shape, dtype) in specs.items():
        if name in g:
            continue
        rows = max(1, min(chunk_rows, shape[0]))
        g.create_array(name, shape=shape, chunks=(rows,) + tuple(shape[1:]), dtype=dtype, fill_value=0, **codecs)
    g.attrs.update(attrs)


def zarr_digest(rows: dict[str, np.ndarray], keys: list[str], algorithm: str = "sha256") -> str:
    """The digest (sha256 | blake3) of one shard's rows in the zarr store: every array's rows (name, dtype, shape,
    bytes, by name) and the sample keys. Encode records both per shard (`zarr_sha256`, `zarr_blake3`); train
    recomputes the fastest recorded from what it reads."""
    h = hasher(algorithm)
    for name in sorted(rows):
        a = np.ascontiguousarray(rows[name])
        h.update(f"{name}\0{a.dtype.str}\0{a.shape}\0".encode())
        h.update(a.reshape(-1).view(np.uint8) if a.size else b"")  # the bytes of tobytes(), without the copy
    h.update(json.dumps(list(keys), ensure_ascii=False).encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# ---------------------------------------------------------------- zarr rows, read chunk by chunk


@dataclass(frozen=True)
class ChunkReader:
    """Reads rows of one array written by `create_arrays` (chunks of whole rows; codecs bytes + none / zstd /
    blosc) straight from the store's objects: the chunks covering the rows, each fetched whole and decoded into
    one buffer.

    Written by hand because zarr's own read costs a Python-level pass per chunk and, on a remote store, one
    sequential request per chunk; here a shard is one object per array, fetched (concurrently across arrays by
    the caller) and decompressed in one call that releases the GIL. The rows are then checked against encode's
    digest, so a misread is an error, never a silent change."""
    rows: int                   # per chunk
    row_shape: tuple[int, ...]
    dtype: np.dtype
    codec: Any                  # a numcodecs codec, or None for raw bytes
    fill: Any
    keys: Callable[[int], str]  # chunk number -> its key, relative to the array

    @classmethod
    def of(cls, array: Any) -> "ChunkReader | None":
        """The reader of a zarr array, or None for a layout it does not handle (read it through zarr)."""
        import numcodecs

        meta = array.metadata.to_dict()
        codecs, chunk = meta["codecs"], tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        if (meta["chunk_grid"]["name"] != "regular" or chunk[1:] != tuple(meta["shape"][1:])
                or codecs[0]["name"] != "bytes" or len(codecs) > 2):
            return None
        inner = codecs[1]["name"] if len(codecs) == 2 else None
        if inner not in (None, "zstd", "blosc"):
            return None
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        codec = {None: None, "zstd": numcodecs.Zstd(), "blosc": numcodecs.Blosc()}[inner]
        tail = (0,) * (len(chunk) - 1)
        return cls(chunk[0], chunk[1:], dtype, codec, meta["fill_value"],
                   lambda c: array.metadata.encode_chunk_key((c, *tail)))

    def chunks(self, lo: int, hi: int) -> range:
        """The chunk numbers holding rows lo..hi-1 (hi > lo)."""
        return range(lo // self.rows, (hi - 1) // self.rows + 1)

    def assemble(self, lo: int, hi: int, raws: list[Any], alloc: Callable[[int], np.ndarray] | None = None
                 ) -> np.ndarray:
        """Rows lo..hi-1 from the objects of `chunks(lo, hi)` (None: never written, reads as the fill value);
        `alloc(n)`: where the n-byte buffer they are decoded into comes from (default a new array)."""
        first = self.chunks(lo, hi).start
        shape = (len(raws) * self.rows,) + self.row_shape
        size = math.prod(shape) * self.dtype.itemsize
        out = (alloc(size) if alloc is not None else np.empty(size, np.uint8)).view(self.dtype).reshape(shape)
        for k, raw in enumerate(raws):
            part = out[k * self.rows:(k + 1) * self.rows]
            if raw is None:
                part[...] = self.fill
            elif self.codec is not None:
                self.codec.decode(raw, out=part.reshape(-1).view(np.uint8))
            else:
                part.reshape(-1).view(np.uint8)[...] = np.frombuffer(raw, np.uint8)  # ValueError if cut short
        return out[lo - first * self.rows:hi - first * self.rows]


def read_objects(urls: list[str | Path], alloc: Callable[[int], np.ndarray] | None = None) -> list[Any]:
    """The bytes of each path or URL, None where it does not exist; URLs fetched concurrently (http(s) by
    location.http_get, other schemes by fsspec). `alloc`: as for location.read_bytes."""
    from shared.formats import location

    if not urls or not location.is_url(str(urls[0])):
        return [_read_file(Path(u), alloc) for u in urls]
    if location.is_http(str(urls[0])):
        return ([_read_http(str(u), alloc) for u in urls] if len(urls) == 1
                else _read_http_concurrently(urls, alloc))
    import fsspec

    fs, _ = fsspec.core.url_to_fs(str(urls[0]))
    got = fs.cat([str(u) for u in urls], on_error="return")
    out = []
    for u in urls:
        value = got.get(str(u))
        if isinstance(value, FileNotFoundError):
            value = None
        elif isinstance(value, BaseException):
            raise OSError(f"{u}: {type(value).__name__}: {value}")
        out.append(value)
    return out


def _read_http(url: str, alloc: Callable[[int], np.ndarray] | None = None) -> Any:
    from shared.formats import location

    try:
        return location.http_get(url, alloc)
    except FileNotFoundError:
        return None


def _read_http_concurrently(urls: list[str | Path], alloc: Callable[[int], np.ndarray] | None = None
                            ) -> list[Any]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(min(len(urls), 8)) as pool:
        return list(pool.map(lambda u: _read_http(str(u), alloc), urls))


def _read_file(path: Path, alloc: Callable[[int], np.ndarray] | None = None) -> Any:
    """The file's bytes as a uint8 array (read into it: half the cost of a `bytes` object of a chunk's size), or
    None when it does not exist."""
    from shared.formats import location

    try:
        return location.read_bytes(path, alloc)
    except FileNotFoundError:
        return None
