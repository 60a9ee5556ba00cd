"""Reading encode's shards for train: each shard loaded whole, checked, then decoded into `Sample` records,
several shards at once ahead of the stream.

A tar shard is read in one request (a path, an fsspec URL or a `pipe:` command), its size and digest compared
with index.json, and only then listed; its arrays are views of the shard's bytes (no copy per sample). A zarr
shard is one chunk per array (encode chunks the store by shard): the arrays are fetched concurrently, one object
each, decompressed in one call each off the training thread, and the rows' digest compared with index.json. A
mismatch is a DataError naming the shard, raised when the shard's turn comes — before any of its samples reaches
a training step. The digest checked is BLAKE3 where index.json records it (encode since 2026-12: ~5x sha256's
speed), else sha256, which every index records and which decides when they disagree (shard_index.matches).
`ShardInfo` carries the sha256 records only, so the reader takes the blake3 ones from the index itself
(`recorded_entries`), each bound to its info by equal sha256 records.

A local shard is hashed once per reader, not once per epoch: after a shard's check passes, the identity of its
files (device, inode, size, modification and change times in ns) is remembered, and a later read whose files
have the same identity before and after the read skips the hash (the size is still compared). Any write to a
file changes its change time, so an edited, replaced or rewritten shard is hashed again; files modified less
than RACY_SECONDS before the check are not remembered (timestamps coarser than the write rate could hide a
second write, as in git's "racy" index entries). Shards read by URL are hashed on every read.

`ShardReader.ahead(order)` loads the shards of a stream in background threads, up to `depth` beyond the one
being consumed: reading, hashing (sha256 and blake3 release the GIL; blake3 also spreads a large shard over the
cores) and network waits overlap each other and the training step. Memory: the `depth` shards ahead, the one
being read, and the shards more than a quarter of whose samples still wait in the stream's shuffle buffer
(data.stream_batches copies out the last quarter); their buffers come from a `BufferPool` and are reused once
free (~7 shard buffers at 256 SDXL samples a shard).
"""
from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.core.errors import DataError, InputError
from shared.formats import location, shard_index, shards
from shared.formats.buffers import BufferPool
from shared.formats import samples as fmt
from shared.formats.samples import Layout, Sample
from shared.formats.shard_index import Index, ShardEntry
from stages.train.data import ShardInfo

#: shards loaded ahead of the one being consumed (a shard of 256 SDXL samples at 1024² is ~115 MB)
READ_AHEAD = 3
#: a file modified this recently when checked is checked again on its next read
RACY_SECONDS = 2.0


class ShardReader:
    """Samples of one shard, in stored order, as `Sample` records (shared/formats/samples.py); the encode
    output at `folder` is a local folder or an fsspec URL."""

    def __init__(self, folder: Path | str, infos: list[ShardInfo], source: str, urls: dict[int, str],
                 layout: Layout | None = None, pixels: bool = True, index: Index | None = None):
        self.folder, self.infos, self.source, self.urls = folder, infos, source, urls
        # each shard's index entry (its blake3 records); `index`: the one `infos` came from [default: read again]
        self.entries = recorded_entries(folder, infos, index)
        # pixels False: a tar's stored images are left undecoded (the shard's digest still covers them; a zarr
        # shard's pixel rows are read, since its digest covers every array, but cost no image decoding)
        self.fix, self.pixels = fmt.fix_for(folder), pixels
        self.names = fmt.zarr_names(layout) if layout is not None else None
        self.store = shards.open_store(location.join(folder, "zarr"), mode="r") if source == "zarr" else None
        self.groups: dict[str, tuple[Any, dict[str, Any]]] = {}  # bucket group -> (group, its arrays), opened once
        self.lock = threading.Lock()
        # shard-sized buffers reused once a shard's samples are let go (no fresh pages to fault in per shard)
        self.buffers = BufferPool()
        self.checked = CheckedFiles()

    def __call__(self, number: int) -> Iterator[tuple[int, Sample]]:
        yield from enumerate(self.load(number))

    def ahead(self, order: list[int], depth: int | None = None) -> Callable[[int], Iterator[tuple[int, Sample]]]:
        """A reader for a stream that opens shards in `order`: each loaded in the background, `depth` (default
        READ_AHEAD) ahead."""
        return ReadAhead(self.load, order, READ_AHEAD if depth is None else depth)

    def load(self, number: int) -> list[Sample]:
        """Shard `number`'s samples, once the whole shard is checked (thread-safe)."""
        info = self.infos[number]
        return self._zarr(info) if self.store is not None else self._tar(info)

    def _tar(self, info: ShardInfo) -> list[Sample]:
        url = self.urls.get(info.number) or str(location.join(self.folder, str(info.name)))
        before = self.checked.identity([url])
        data = read_tar(url, self.buffers.take)
        after = self.checked.identity([url])
        if not (self.checked.unchanged(info.number, before, after) and len(data) == info.bytes):
            check_tar(data, url, info, self.entries.get(info.number))
            self.checked.remember(info.number, before, after)
        out = [fmt.from_tar(raw, url, self.fix, self.pixels) for raw in shards.tar_samples(data, url)]
        if len(out) != info.samples:
            raise DataError(f"{url}: {len(out)} samples, but index.json says {info.samples}; the shard is "
                            f"incomplete or not this encode's (re-encode, or check --shards)")
        return out

    def _zarr(self, info: ShardInfo) -> list[Sample]:
        where = location.join(self.folder, "zarr", info.group)
        lo, hi = info.first, info.first + info.samples
        try:
            group, arrays = self._group(info.group, str(where))
            files = chunk_files(where, arrays, lo, hi)
            before = self.checked.identity(files) if files else None
            rows, keys = fmt.read_rows(group, lo, hi, self.names, where, arrays, self.buffers.take)
            after = self.checked.identity(files) if files else None
        except (KeyError, ValueError, OSError) as e:
            raise DataError(f"{where}: unreadable rows {lo}..{hi - 1} ({e}); re-encode") from None
        except Exception as e:  # noqa: BLE001 - a remote store's client raises its own types
            raise DataError(f"{where}: unreadable rows {lo}..{hi - 1} ({type(e).__name__}: {e})") from None
        if not self.checked.unchanged(info.number, before, after):
            if not rows_match(rows, keys, info, self.entries.get(info.number)):
                raise DataError(f"{where}: rows {lo}..{hi - 1} (shard {info.name or lo}) differ from what encode "
                                f"recorded in index.json; re-encode")
            self.checked.remember(info.number, before, after)
        return list(fmt.from_rows(rows, keys))

    def _group(self, name: str, where: str) -> tuple[Any, dict[str, Any]]:
        """A bucket group and its arrays, opened and version-checked once (a remote store's metadata are requests)."""
        with self.lock:
            if name not in self.groups:
                group = self.store[name]
                fmt.check_group(group, where, self.fix)
                names = self.names if self.names is not None else sorted(group.array_keys())
                self.groups[name] = (group, fmt.open_arrays(group, names))
            return self.groups[name]


def read_tar(url: str, alloc: Callable[[int], Any] | None = None) -> Any:
    """The whole shard from `url` (a path, fsspec URL or pipe:); `alloc` as for location.read_bytes."""
    try:
        return location.read_bytes(url, alloc)
    except (OSError, ValueError) as e:
        raise DataError(f"{url}: unreadable shard ({e})") from None


def check_tar(data: Any, url: str, info: ShardInfo, entry: ShardEntry | None = None) -> None:
    """A DataError unless `data` has the size and digest encode recorded for the shard (shard_index.matches: its
    blake3 where `entry`, its index entry as recorded_entries finds it, records one; else the info's sha256)."""
    recorded = {"sha256": info.sha256, "blake3": entry.blake3 if entry is not None else None}
    if len(data) == info.bytes and shard_index.matches(recorded, lambda a: _digest(data, a)):
        return
    raise DataError(f"{url}: not the shard encode wrote ({len(data)} bytes, sha256 "
                    f"{hashlib.sha256(data).hexdigest()[:12]}; index.json: {info.bytes} bytes, "
                    f"{str(info.sha256)[:12]}); it is damaged or another shard — re-encode, or check --shards")


def _digest(data: Any, algorithm: str) -> str:
    return hashlib.sha256(data).hexdigest() if algorithm == "sha256" else shards.digest(data, algorithm)


def rows_match(rows: dict[str, Any], keys: list[str], info: ShardInfo, entry: ShardEntry | None = None) -> bool:
    """Whether a zarr shard's rows (and keys) have the digest encode recorded (as check_tar)."""
    recorded = {"sha256": info.zarr_sha256, "blake3": entry.zarr_blake3 if entry is not None else None}
    return shard_index.matches(recorded, lambda a: fmt.rows_digest(rows, keys) if a == "sha256"
                               else shards.zarr_digest(rows, keys, a))


def recorded_entries(folder: Path | str, infos: list[ShardInfo], index: Index | None = None
                     ) -> dict[int, ShardEntry]:
    """{shard number: its index.json entry} for the shards of `infos` whose entry records blake3 digests and holds
    the same records as the info (name, rows, repeats, keys, bytes and sha256 ones: the same record of the same
    shard, so its blake3 digests check what its sha256 ones would). `index`: the index `infos` were read from
    [default: read again from `folder`, checked against its manifest]. A shard left out is checked by sha256."""
    if index is None:
        try:
            index = shard_index.read_index(folder, fmt.require_encode(folder))
        except InputError:  # unreadable now (it was a moment ago): the infos' own sha256 records are checked
            return {}
    by_place = {(b.group, s.first): s for b, s in index.shards()}
    out = {}
    for info in infos:
        entry = by_place.get((info.group, info.first))
        if entry is not None and (entry.blake3 or entry.zarr_blake3) and (
                entry.name, entry.repeats, entry.keys, entry.bytes, entry.sha256, entry.zarr_sha256) == (
                info.name, info.repeats, info.keys, info.bytes, info.sha256, info.zarr_sha256):
            out[info.number] = entry
    return out


class CheckedFiles:
    """The identities of the local files of each shard whose check has passed (see the module's docstring)."""

    def __init__(self) -> None:
        self.shards: dict[int, tuple] = {}
        self.lock = threading.Lock()

    @staticmethod
    def identity(paths: list[Any]) -> tuple | None:
        """(device, inode, size, mtime ns, ctime ns) of each local file, None per missing one; None for URLs."""
        if any(location.is_url(str(p)) for p in paths):
            return None
        out = []
        for p in paths:
            try:
                st = os.stat(p)
            except FileNotFoundError:
                out.append(None)
                continue
            except OSError:
                return None
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
        return tuple(out)

    def unchanged(self, number: int, before: tuple | None, after: tuple | None) -> bool:
        """Whether shard `number`'s files kept, from `before` to `after` a read, the identity they had when its
        check passed (then what was read is what was checked)."""
        with self.lock:
            return before is not None and before == after and self.shards.get(number) == before

    def remember(self, number: int, before: tuple | None, after: tuple | None) -> None:
        """Shard `number` passed its check, read between identities `before` and `after`."""
        if before is None or before != after or os.name == "nt":  # Windows' st_ctime is the creation time
            return
        settled = time.time_ns() - int(RACY_SECONDS * 1e9)
        if all(f is None or (f[3] < settled and f[4] < settled) for f in before):
            with self.lock:
                self.shards[number] = before


def chunk_files(where: Any, arrays: dict[str, Any], lo: int, hi: int) -> list[Any]:
    """The local chunk files holding rows lo..hi-1 of `arrays` (empty when any array has a layout
    shards.ChunkReader does not read, or the store is remote)."""
    if location.is_url(str(where)):
        return []
    files = []
    for name in sorted(arrays):
        reader = shards.ChunkReader.of(arrays[name])
        if reader is None:
            return []
        files += [location.join(where, name, reader.keys(c)) for c in reader.chunks(lo, hi)]
    return files


class ReadAhead:
    """Loads the shards of `order` in daemon threads, at most `depth` beyond the one being read; a shard's
    failure is raised when its turn comes. A shard outside `order` is loaded when asked for."""

    def __init__(self, load: Callable[[int], list[Sample]], order: list[int], depth: int):
        self.load, self.todo = load, iter(order)
        self.pending: dict[int, _Load] = {}
        for _ in range(max(depth, 1)):
            self._start()

    def _start(self) -> None:
        for number in self.todo:
            if number not in self.pending:
                self.pending[number] = _Load(self.load, number)
                return

    def __call__(self, number: int) -> Iterator[tuple[int, Sample]]:
        job = self.pending.pop(number, None)
        self._start()
        return enumerate(job.result() if job is not None else self.load(number))


class _Load:
    def __init__(self, load: Callable[[int], list[Sample]], number: int):
        self.done = threading.Event()
        self.value: list[Sample] = []
        self.error: BaseException | None = None
        threading.Thread(target=self._run, args=(load, number), name=f"shard-{number}", daemon=True).start()

    def _run(self, load: Callable[[int], list[Sample]], number: int) -> None:
        try:
            self.value = load(number)
        except BaseException as e:  # noqa: BLE001 - re-raised in the reading thread
            self.error = e
        finally:
            self.done.set()

    def result(self) -> list[Sample]:
        self.done.wait()
        if self.error is not None:
            raise self.error
        return self.value
