"""JSON Lines tables: one object per line, UTF-8, streamed both ways so memory stays flat."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.core.errors import InputError


def read_jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)


def read_records(path: Path, from_json: Callable[[dict], Any], what: str, fix: str) -> Iterator[Any]:
    """Each line of a JSON Lines table made into its record by `from_json`; a line that is not one is a one-line
    InputError naming the file, the line and `what` it should be (e.g. "a plan row"), with the `fix` to run."""
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
                yield from_json(data)
            except (ValueError, TypeError) as e:
                hint = f"; rerun: {fix}" if fix else ""
                raise InputError(f"{path} line {n}: not {what} ({type(e).__name__}: {e}){hint}") from None


def dumps_utf8(obj: object, **kw) -> str:
    """JSON that is always valid UTF-8: readable non-ASCII where possible; a file name that is not valid
    UTF-8 arrives as lone surrogates (surrogateescape) and is then escaped as \\udcXX, which reads back to the
    very same path string."""
    text = json.dumps(obj, ensure_ascii=False, **kw)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(obj, ensure_ascii=True, **kw)
    return text


class JsonlWriter:
    """Appends rows to a JSON Lines file; use as a context manager."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fh = open(self.path, "w", encoding="utf-8")
        self.count = 0

    def write(self, row: dict) -> None:
        self._fh.write(dumps_utf8(row, separators=(",", ":")) + "\n")
        self.count += 1

    def close(self) -> None:
        self._fh.close()

    def __enter__(self) -> "JsonlWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
