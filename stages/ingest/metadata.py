"""Captions from `metadata.jsonl` files, as in Hugging Face `imagefolder` datasets (and the diffusers training
scripts that read them): one JSON object per line with `file_name` (relative to the metadata file's folder)
and a caption column (`text`, else `caption`, unless `caption_column` names one).

A metadata file may sit at the source root or in any folder below; an image takes its caption from the nearest
metadata file at or above its folder that lists it (a farther one that lists it too is "shadowed"). A sidecar
caption file beats a metadata caption. The metadata file is one row of `rejected.jsonl` (reason `metadata`:
read, not an image) whose detail counts what it gave, and lists the rows that name missing files and the lines
that could not be read (one short message each, never a traceback).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from shared.images import Rejected
from stages.ingest.files import MAX_METADATA_BYTES, read_regular
from stages.ingest.tags import clean_caption

FILE = "metadata.jsonl"
DEFAULT_COLUMNS = ("text", "caption")
#: names listed per problem in a metadata file's row (the detail counts them all)
LISTED = 50


@dataclass
class Entry:
    caption: str
    line: int
    name: str                # file_name as written
    state: str = "unclaimed"  # used | sidecar (its image has a caption file) | shadowed (a nearer table has it)


@dataclass
class Table:
    rel: str                                                  # the metadata file, relative to the source root
    entries: dict[str, Entry] = field(default_factory=dict)   # by image path relative to the source root
    bad_lines: list[str] = field(default_factory=list)
    error: str | None = None                                  # the file could not be read
    error_reason: str = "unreadable"                          # ... or was not read: not_regular, too_large


def parse(data: bytes, column: str | None = None) -> tuple[dict[str, Entry], list[str]]:
    """The entries of a metadata.jsonl, by file_name normalised relative to its folder, and one message per
    line that is not an entry (blank lines are skipped; the first of two lines naming one file is kept)."""
    entries: dict[str, Entry] = {}
    bad: list[str] = []
    for number, raw in enumerate(data.removeprefix(b"\xef\xbb\xbf").split(b"\n"), 1):
        if not raw.strip():
            continue
        try:
            name, key, caption = _entry(raw, column)
        except ValueError as e:
            bad.append(f"line {number}: {e}")
            continue
        if key in entries:
            bad.append(f"line {number}: {_short(name)} again (first on line {entries[key].line}); the first is used")
            continue
        entries[key] = Entry(caption, number, name)
    return entries, bad


def _entry(raw: bytes, column: str | None) -> tuple[str, str, str]:
    """(file_name, its normalised path, caption) of one line, or ValueError saying what is wrong with it."""
    try:
        obj = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{_kind(obj)}, not a JSON object")
    name = obj.get("file_name")
    if not isinstance(name, str):
        raise ValueError("no file_name" if name is None else f"file_name is {_kind(name)}, not a string")
    if not name.strip():
        raise ValueError("file_name is empty")
    key = os.path.normpath(name)
    if os.path.isabs(key) or key == os.pardir or key.startswith(os.pardir + os.sep) or key == os.curdir:
        raise ValueError(f"file_name {_short(name)} is outside the metadata file's folder")
    found = [c for c in ((column,) if column else DEFAULT_COLUMNS) if c in obj]
    if not found:
        raise ValueError(f"no {column!r} column" if column else "no caption column (text or caption)")
    caption = obj[found[0]]
    if not isinstance(caption, str):
        raise ValueError(f"{found[0]!r} is {_kind(caption)}, not a string")
    return name, key, clean_caption(caption)


def _kind(value: object) -> str:
    return {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "an array", dict: "an object"}.get(type(value), type(value).__name__)


def _short(name: str) -> str:
    return repr(name if len(name) <= 80 else name[:77] + "...")


class Tables:
    """The metadata.jsonl tables of one source, read folder by folder as the walk reaches them (a folder's
    ancestors are always reached before it), and which image took which caption."""

    def __init__(self, root: Path, column: str | None):
        self.root, self.column = root, column
        self.by_folder: dict[str, Table] = {}

    def read(self, folder_rel: str) -> str:
        """Read the metadata file in `folder_rel`; its path relative to the source root."""
        rel = os.path.join(folder_rel, FILE)
        table = Table(rel)
        try:
            entries, table.bad_lines = parse(read_regular(self.root / rel, MAX_METADATA_BYTES, "metadata file"),
                                             self.column)
        except Rejected as r:
            table.error, table.error_reason = r.detail, r.reason
        except OSError as e:
            table.error = f"{type(e).__name__}: {e.strerror or e}"
        else:
            table.entries = {os.path.normpath(os.path.join(folder_rel, k)): v for k, v in entries.items()}
        self.by_folder[folder_rel] = table
        return rel

    def claim(self, image_rel: str, has_sidecar: bool) -> tuple[str, str] | None:
        """(caption, metadata file) for an image from the nearest table listing it; None when none does or the
        image has a sidecar caption file (which wins)."""
        found = None
        for folder in _ancestors(os.path.dirname(image_rel)):
            table = self.by_folder.get(folder)
            entry = table.entries.get(image_rel) if table else None
            if entry is None:
                continue
            if found is not None:
                entry.state = "shadowed"
                continue
            entry.state = "sidecar" if has_sidecar else "used"
            found = (entry.caption, table.rel)
        return None if has_sidecar else found

    def row(self, folder_rel: str) -> dict:
        """The metadata file's row (reason, detail and problem lists), once every image has been claimed."""
        table = self.by_folder[folder_rel]
        if table.error:
            return {"reason": table.error_reason, "detail": table.error}
        states: dict[str, list[str]] = {}
        for key, entry in table.entries.items():
            state = entry.state if entry.state != "unclaimed" else self._unclaimed(key)
            states.setdefault(state, []).append(entry.name)
        count = {state: len(names) for state, names in states.items()}
        parts = [f"caption table: {_n(count.get('used', 0), 'caption', 'captions')} used"]
        for state, one, many in (
                ("sidecar", "ignored: the image has a caption file", "ignored: the images have caption files"),
                ("shadowed", "ignored: a nearer metadata.jsonl lists the image", "ignored: nearer metadata.jsonl "
                                                                                 "files list the images"),
                ("missing", "names a missing file", "name missing files"),
                ("unmatched", "names a file not taken as an image", "name files not taken as images")):
            if count.get(state):
                parts.append(f"{count[state]} {one if count[state] == 1 else many}")
        if table.bad_lines:
            parts.append(_n(len(table.bad_lines), "bad line", "bad lines"))
        row = {"reason": "metadata", "detail": "; ".join(parts)}
        for state in ("missing", "unmatched"):
            if states.get(state):
                row[state] = states[state][:LISTED]
        if table.bad_lines:
            row["bad_lines"] = table.bad_lines[:LISTED]
        return row

    def _unclaimed(self, key: str) -> str:
        """missing (no such file), or unmatched: a file that is not an image, or an image not taken as one (in
        the pipeline's own folder, behind a second link to a folder, or outside the kohya layout)."""
        if not os.path.lexists(self.root / key):
            return "missing"
        return "unmatched"


def problems(row: dict) -> str | None:
    """A one-line warning for a metadata row with rows naming missing files or bad lines (None: neither)."""
    said = []
    if row.get("missing"):
        said.append(f"{_n(len(row['missing']), 'row names a missing file', 'rows name missing files', LISTED)} ("
                    + ", ".join(row["missing"][:3]) + (", ..." if len(row["missing"]) > 3 else "") + ")")
    if row.get("bad_lines"):
        said.append(f"{_n(len(row['bad_lines']), 'bad line', 'bad lines', LISTED)} ({row['bad_lines'][0]}"
                    + (", ..." if len(row["bad_lines"]) > 1 else "") + ")")
    return "; ".join(said) or None


def _n(count: int, one: str, many: str, listed: int | None = None) -> str:
    more = "+" if listed is not None and count >= listed else ""
    return f"{count}{more} {one if count == 1 else many}"


def _ancestors(folder: str) -> list[str]:
    """`folder` and every folder above it up to the source root (""), nearest first."""
    out = [folder]
    while folder:
        folder = os.path.dirname(folder)
        out.append(folder)
    return out
