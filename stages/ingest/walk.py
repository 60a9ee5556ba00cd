"""Listing a source folder: every folder under it in a fixed order, symbolic links to folders followed once,
loops and unreadable folders turned into rejected rows; and the listing's fingerprint."""
from __future__ import annotations

import hashlib
import os
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class Folder:
    rel: str                 # relative to the source root ("" for the root)
    names: list[str]         # sorted file names
    rejected: list[dict]     # rows for sub-folders not walked: unreadable, symlink_loop, duplicate


def walk(root: Path, skip: frozenset[Path] = frozenset()) -> Iterator[Folder]:
    """Every folder under root, in a fixed order: the real folders first, then those reached through symbolic
    links (so a link never shadows the folder it points to). Folders in `skip` (the pipeline's own work folder,
    when it lies inside a source) are not entered; a folder that cannot be read, or that a link leads back
    into (a loop) or to a second time, is a rejected row instead of being walked."""
    seen = {_folder_key(root): ""}
    links: deque[str] = deque()
    yield from _walk_tree(root, "", skip, seen, links)
    while links:
        rel = links.popleft()
        row = _visit(root, rel, seen)
        if row is not None:
            yield Folder(rel, [], [row])
        else:
            yield from _walk_tree(root, rel, skip, seen, links)


def _walk_tree(root: Path, start: str, skip: frozenset[Path], seen: dict, links: deque) -> Iterator[Folder]:
    """The folders under root/start without following links; links to folders are queued on `links`."""
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(os.path.join(root, start), onerror=errors.append):
        rel = _relative(dirpath, root)
        rejected = [_unreadable_folder(e, root) for e in errors]
        errors.clear()
        enter = []
        for name in sorted(dirnames):
            path, child = os.path.join(dirpath, name), os.path.join(rel, name)
            if Path(path) in skip or Path(os.path.realpath(path)) in skip:
                continue
            if os.path.islink(path):
                links.append(child)
                continue
            row = _visit(root, child, seen)
            if row is None:
                enter.append(name)
            else:
                rejected.append(row)
        dirnames[:] = enter
        yield Folder(rel, sorted(filenames), rejected)
    if errors:  # the last folders walked could not be read
        yield Folder(start, [], [_unreadable_folder(e, root) for e in errors])


def _visit(root: Path, rel: str, seen: dict[tuple[int, int], str]) -> dict | None:
    """None when the folder at `rel` is to be walked (first time its device and inode are seen), else its
    rejected row: unreadable, symlink_loop (it contains the link that led to it) or duplicate."""
    try:
        key = _folder_key(os.path.join(root, rel))
    except OSError as e:
        return {"path": rel, "reason": "unreadable", "detail": f"folder: {e.strerror or e}"}
    first = seen.setdefault(key, rel)
    if first == rel:
        return None
    if first == "" or rel.startswith(first + os.sep):
        return {"path": rel, "reason": "symlink_loop",
                "detail": f"leads back into {first or 'the source folder'}, which contains it"}
    return {"path": rel, "reason": "duplicate", "duplicate_of": first,
            "detail": f"the same folder as {first}, reached again through a symbolic link; walked once"}


def _relative(path: str, root: Path) -> str:
    rel = os.path.relpath(path, root)
    return "" if rel == "." else rel


def _folder_key(path: Path | str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _unreadable_folder(error: OSError, root: Path) -> dict:
    where = _relative(os.fsdecode(error.filename), root) if error.filename is not None else ""
    return {"path": where or ".", "reason": "unreadable", "detail": f"folder: {error.strerror or error}"}


def listing_fingerprint(root: Path, skip: frozenset[Path] = frozenset()) -> str:
    """Hash of every file's relative path, size, mtime, inode and ctime (and of the folders not walked): changes
    when the source's files do, also a caption edited at the same length with its mtime put back (its ctime
    moves). A file that cannot be stat'ed (a broken link) counts with its link's own data."""
    h = hashlib.sha256()
    for folder in walk(root, skip):
        for row in folder.rejected:
            h.update(f"{row['path']}\0{row['reason']}\n".encode("utf-8", "surrogateescape"))
        for name in folder.names:
            path = os.path.join(root, folder.rel, name)
            try:
                st = os.stat(path)
            except OSError:
                st = os.lstat(path)
            h.update(f"{os.path.join(folder.rel, name)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\0"
                     f"{st.st_ctime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()
