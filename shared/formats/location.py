"""Where encode's output is read from: a local folder or any fsspec URL (`http(s)://`, `s3://`, `gs://`, …,
with that fsspec backend installed), and webdataset's `pipe:` for single tar shards.

Objects are read whole (one request each), then checked against what their producer recorded before they are
parsed, so what is used is exactly what was checked. A folder given as a URL is joined with `/`.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

import numpy as np

from shared.core import graph, integrity
from shared.core.artifacts import MANIFEST, Manifest, check_manifest, wanted_format
from shared.core.graph import Format
from shared.core.errors import InputError

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")
#: the package that provides each common scheme's fsspec backend (named when it is missing)
BACKENDS = {"http": "aiohttp", "https": "aiohttp", "s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs",
            "abfs": "adlfs"}


def is_url(where: Any) -> bool:
    """A `scheme://` URL or a `pipe:` command rather than a local path."""
    return isinstance(where, str) and (where.startswith("pipe:") or SCHEME.match(where) is not None)


def join(base: str | Path, *parts: str) -> str | Path:
    """`base/part/...`: a Path for a local folder, a string for a URL."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def read_bytes(where: str | Path, alloc: Callable[[int], np.ndarray] | None = None,
               limit: int | None = None) -> Any:
    """The whole object at a path, `pipe:` command or fsspec URL, as a writable buffer (a uint8 array or a
    bytearray: arrays viewing it are writable too). `alloc(n)`: where an n-byte uint8 buffer for a local file or
    an http(s) body comes from (a `buffers.BufferPool`'s take; default a new array). `limit`: the most bytes it
    may hold (an object that turns out larger is an OSError before it is read whole: a server streaming without
    end). OSError when it cannot be read; InputError when the URL's fsspec backend is not installed."""
    alloc = alloc or _new_buffer
    if limit is not None and not is_url(where) and os.stat(where).st_size > limit:
        raise OSError(f"larger than the {limit:,} bytes it may hold")
    if not is_url(where):
        with open(where, "rb") as fh:
            # not bytearray: no zero-filling pass over a shard-sized buffer before the read fills it
            data = alloc(os.fstat(fh.fileno()).st_size)
            got = fh.readinto(data)  # a buffered reader fills the buffer unless the file ends first
            rest = fh.read()         # grown since the stat: keep it, the size check will tell
        return np.concatenate([data[:got], np.frombuffer(rest, np.uint8)]) if rest else data[:got]
    if str(where).startswith("pipe:"):
        from webdataset.gopen import gopen

        with gopen(str(where), "rb") as stream:
            return _bounded(bytearray(stream.read(-1 if limit is None else limit + 1)), limit)
    if is_http(where):
        return http_get(str(where), alloc, limit)
    return _bounded(bytearray(_fsspec_cat(str(where), limit)), limit)


def _bounded(data: Any, limit: int | None) -> Any:
    if limit is not None and len(data) > limit:
        raise OSError(f"larger than the {limit:,} bytes it may hold")
    return data


def _new_buffer(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, np.uint8)


def is_http(where: Any) -> bool:
    return isinstance(where, str) and where.split("://", 1)[0].lower() in ("http", "https")


#: the most bytes a remote manifest may hold (a server that streams without end is refused, not read)
MANIFEST_LIMIT = 64 * 2 ** 20

#: seconds an http(s) read may stall before it fails
HTTP_TIMEOUT = 120.0


def http_get(url: str, alloc: Callable[[int], np.ndarray] | None = None, limit: int | None = None) -> np.ndarray:
    """GET `url` into one buffer of its Content-Length, read in the calling thread by the standard library.

    Not through fsspec's http backend: that one runs every transfer of the process on its single event-loop
    thread, copying each body through Python chunk by chunk (~0.4 GB/s on localhost, however many shards are in
    flight); here each shard's socket reads straight into its buffer without the GIL (~1.2 GB/s each, in
    parallel). FileNotFoundError for a 404; OSError for any other failure or a body cut short."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
            size = response.headers.get("Content-Length")
            if size is None or response.headers.get("Content-Encoding"):
                return np.frombuffer(_read_bounded(response, limit), np.uint8)
            if limit is not None and int(size) > limit:
                raise OSError(f"{int(size):,} bytes, larger than the {limit:,} it may hold")
            data = (alloc or _new_buffer)(int(size))
            view, got = memoryview(data), 0
            while got < len(data):
                n = response.readinto(view[got:])
                if not n:
                    raise OSError(f"the connection closed after {got} of {len(data)} bytes")
                got += n
            return data
    except urllib.error.HTTPError as e:
        if e.code == 404:
            raise FileNotFoundError(f"{url}: HTTP 404") from None
        raise OSError(f"HTTP {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise OSError(str(e.reason)) from None
    except (ValueError, http_errors()) as e:
        raise OSError(f"{type(e).__name__}: {e}") from None


def _read_bounded(response: Any, limit: int | None) -> bytearray:
    """A body of unknown length, read in chunks, never more than `limit` + 1 bytes."""
    data = bytearray()
    while chunk := response.read(1 << 20):
        data += chunk
        _bounded(data, limit)
    return data


def http_errors() -> type:
    import http.client

    return http.client.HTTPException


def _fsspec_cat(url: str, limit: int | None = None) -> bytes:
    try:
        import fsspec

        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        need = BACKENDS.get(scheme, f"the fsspec backend for {scheme}://")
        raise InputError(f"{url}: reading {scheme}:// URLs needs {need} ({e}); pip install {need}") from None
    except ValueError as e:  # an unknown protocol
        raise InputError(f"{url}: not a URL fsspec can read ({e})") from None
    try:
        return fs.cat_file(path) if limit is None else fs.cat_file(path, start=0, end=limit + 1)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - network clients raise their own types; each is an unreadable object
        raise OSError(f"{type(e).__name__}: {e}") from None


def verified_bytes(folder: str | Path, rel: str, files: dict | None, fix: str) -> bytes:
    """`folder/rel`, checked against its producer's record (size, sha256) before it is parsed; an InputError
    naming it otherwise. A URL is read once and the bytes checked are the bytes returned."""
    if not is_url(folder):
        return integrity.verified(Path(folder), rel, files, fix).read_bytes()
    where = join(folder, rel)
    rec = integrity.recorded(folder, where, rel, files, fix)
    try:
        data = read_bytes(where, limit=rec["bytes"])
    except OSError as e:
        raise InputError(f"{where}: unreadable ({e}); its producer wrote it; rerun: {fix}") from None
    if len(data) != rec["bytes"] or hashlib.sha256(data).hexdigest() != rec["sha256"]:
        raise InputError(f"{where}: changed since it was written (sha256 or size differ from the manifest); "
                         f"rerun: {fix}")
    return bytes(data)


def require_remote(url: str, wanted: Format | str, versions: tuple[int, ...] | None = None,
                   fix: str | None = None) -> Manifest:
    """The manifest of the finished output holding the format `wanted` at `url` (what artifacts.require_input
    checks of a local folder), or an InputError."""
    where = join(url, MANIFEST)
    fmt = wanted_format(wanted, versions)
    wrote = graph.who(fmt, "`sdxl {}`")
    try:
        data = json.loads(bytes(read_bytes(where, limit=MANIFEST_LIMIT)).decode("utf-8"))
        manifest = Manifest.from_dict(data)
    except OSError as e:
        raise InputError(f"{where}: unreadable ({e}); give --in the URL of a folder that {wrote} wrote") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise InputError(f"{where}: not a readable manifest, so {url} is not a finished {graph.who(fmt)} output; "
                         f"give --in the URL of a folder that {wrote} wrote") from None
    return check_manifest(manifest, url, fmt, versions, fix)
