"""What a producer recorded about its files, and the checks a reader makes against it.

A manifest's `files` maps each file of an output (relative path) to its size, sha256 and mtime; bulky
subfolders (shards, zarr stores, checkpoints) are recorded as a `trees` stamp instead — file count, bytes and
a hash of the (path, size, mtime) listing — because their own index or manifests carry per-unit hashes that the
reading stage checks as it reads. Two levels of check:

- `damage(folder, ...)`: is a finished output still what its manifest says? Sizes and listings always; a
  file's content hash when its mtime moved. This is the up-to-date check's, so a deleted or edited file means
  "rebuild", never "unchanged".
- `verified(folder, rel, files)`: a stage about to read a file of its input hashes it first.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import BinaryIO, Iterable

from shared.core.errors import InputError

UNRECORDED = {"manifest.json", "job.json"}


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_record(path: Path) -> dict:
    st = path.stat()
    return {"bytes": st.st_size, "sha256": sha256_file(path), "mtime_ns": st.st_mtime_ns}


def _top(rel: str) -> str:
    return rel.split("/", 1)[0]


def _files_under(folder: Path) -> Iterable[str]:
    for dirpath, dirnames, names in os.walk(folder):
        dirnames.sort()
        for name in sorted(names):
            yield Path(os.path.relpath(os.path.join(dirpath, name), folder)).as_posix()


def record(folder: Path, trees: Iterable[str] = (), skip: Iterable[str] = ()) -> tuple[dict, dict]:
    """(files, trees) of `folder`: every file outside `trees` and `skip` with its size, sha256 and mtime;
    each subfolder in `trees` as a stamp."""
    trees, skip = set(trees), set(skip)
    files = {rel: file_record(folder / rel) for rel in _files_under(folder)
             if rel not in UNRECORDED and _top(rel) not in trees | skip}
    return files, {name: tree_stamp(folder / name) for name in sorted(trees)}


def tree_stamp(folder: Path) -> dict:
    """File count, bytes, and a hash of the (path, size, mtime) listing: a deleted, added, resized or
    rewritten file changes it (so does a copy that does not keep mtimes: the stage then re-verifies)."""
    h, count, total = hashlib.sha256(), 0, 0
    if folder.is_dir():
        for rel in _files_under(folder):
            st = (folder / rel).stat()
            h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
            count, total = count + 1, total + st.st_size
    return {"files": count, "bytes": total, "listing": h.hexdigest()}


def damage(folder: Path, files: dict, trees: dict) -> list[str]:
    """What no longer matches the record: missing, resized or edited files, changed subfolders."""
    problems = []
    for rel, rec in files.items():
        path = folder / rel
        try:
            st = path.stat()
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if st.st_size != rec["bytes"]:
            problems.append(f"{rel} changed size ({rec['bytes']} -> {st.st_size} bytes)")
        elif st.st_mtime_ns != rec.get("mtime_ns") and sha256_file(path) != rec["sha256"]:
            problems.append(f"{rel} changed content")
    for name, stamp in trees.items():
        now = tree_stamp(folder / name)
        if now["listing"] != stamp["listing"]:
            problems.append(f"{name}/ changed ({stamp['files']} files of {stamp['bytes']} bytes recorded, "
                            f"{now['files']} files of {now['bytes']} bytes found)")
    return problems


def recorded(folder: Path | str, where: Path | str, rel: str, files: dict | None, fix: str) -> dict:
    """The producer's record (bytes, sha256) of `rel` in `folder`'s manifest (`files`), `where` being the file's
    path or URL; an InputError naming it when the manifest has no such record."""
    if files is None:
        raise InputError(f"{folder}: its manifest records no file hashes (made by an older sdxl); rerun: {fix}")
    rec = files.get(rel)
    if rec is None:
        raise InputError(f"{where}: not recorded in {str(folder).rstrip('/')}/manifest.json; rerun: {fix}")
    return rec


def verified(folder: Path, rel: str, files: dict | None, fix: str) -> Path:
    """`folder/rel`, after checking it is the file its producer recorded; an InputError naming it otherwise."""
    path = Path(folder) / rel
    rec = recorded(folder, path, rel, files, fix)
    try:
        size = path.stat().st_size
    except OSError:
        raise InputError(f"{path}: missing (its producer wrote it); rerun: {fix}") from None
    if size != rec["bytes"] or sha256_file(path) != rec["sha256"]:
        raise InputError(f"{path}: changed since it was written (sha256 or size differ from the manifest); "
                         f"rerun: {fix}")
    return path


class HashingReader:
    """A read-only stream that hashes and counts what passes through it."""

    def __init__(self, raw: BinaryIO):
        self.raw, self.sha, self.bytes = raw, hashlib.sha256(), 0

    def read(self, n: int = -1) -> bytes:
        data = self.raw.read(n)
        self.sha.update(data)
        self.bytes += len(data)
        return data

    def drain(self) -> None:
        while self.read(1 << 20):
            pass

    def close(self) -> None:
        self.raw.close()
