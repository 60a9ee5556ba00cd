"""The item table (ingest → bucket): `items.jsonl`, one `Item` per accepted image, and `rejected.jsonl`, one
`Rejection` per file that was not (with a reason code).

Ingest writes both with `ItemWriter` / `RejectedWriter`; bucket reads the items with `read_items`, which checks
the input's manifest (the items format, of a version in `ITEMS.readable`), the file's recorded hash and every
row. A plan row (shared/formats/plan.py) is an `Item` plus its placement, so what ingest knew of an item travels
to encode unchanged. The format's version is ingest's manifest version (`ITEMS_VERSION`).
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, Iterator

from shared.core import artifacts, graph
from shared.formats.jsonl import JsonlWriter, read_records

ITEMS_VERSION = 1
FILE = "items.jsonl"
REJECTED = "rejected.jsonl"
ITEMS = graph.declare(graph.Format(
    "items", ITEMS_VERSION, "items.jsonl (the accepted images, with captions and tags) and rejected.jsonl (every "
    "other file, with a reason)", made_by="ingest"))


@dataclass(frozen=True, kw_only=True)
class Item:
    """One accepted image. Sizes are `(width, height)`, upright (after EXIF orientation)."""
    id: str                            # stable, from the content hash
    path: str                          # relative to `source`, as found
    source: str                        # the source root
    caption_path: str | None = None
    width: int
    height: int
    stored_width: int | None = None
    stored_height: int | None = None
    orientation: int = 1
    mode: str | None = None            # PIL mode, format and frame count: which decoder can take the file
    format: str | None = None
    frames: int = 1
    bytes: int | None = None           # size and sha256 of the image file, checked before it is decoded
    caption: str | None = ""
    caption_encoding: str | None = None
    tags: tuple[str, ...] = ()
    tag_weight: float = 1.0
    sha256: str | None = None
    repeats: int = 1
    role: str = "instance"             # instance | class (DreamBooth class images)
    #: what a row holds beyond these, in its order: where a caption not read from a caption file came from
    #: (caption_from, metadata_path), kohya's subset and prompts, and fields of a newer ingest
    extra: dict = field(default_factory=dict)

    #: fields written after `extra` (a subclass's: the plan's placement), and those of them that are int pairs
    TAIL: ClassVar[tuple[str, ...]] = ()
    PAIRS: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_json(cls, data: dict) -> Any:
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        values["tags"] = tuple(values.get("tags") or ())
        for name in cls.PAIRS:
            if name in values:
                values[name] = tuple(int(x) for x in values[name])
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict:
        """The row as written: the fields in their order (lists for tuples), then `extra`, then `TAIL`."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in self.TAIL and f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        for name in self.TAIL:
            value = getattr(self, name)
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    @property
    def image(self) -> str:
        """The image file's path."""
        return str(Path(self.source) / self.path)


@dataclass(frozen=True)
class Rejection:
    """One file not accepted: `path` (relative to `source`), `reason` (a short code: unreadable, truncated,
    too_small, not_image, duplicate, no_caption, orphan_caption, metadata, ...), `detail`, and what the reason
    adds (caption_path, duplicate_of, duplicate_of_id, the lists of a metadata file). `row` is the row as written,
    keys in the order they were found (rows of different reasons order them differently)."""
    row: dict

    @classmethod
    def from_json(cls, data: dict) -> "Rejection":
        missing = [k for k in ("path", "reason") if k not in data]
        if missing:
            raise TypeError(f"a rejected row without {missing[0]!r}")
        return cls(dict(data))

    def to_json(self) -> dict:
        return dict(self.row)

    @property
    def path(self) -> str:
        return self.row["path"]

    @property
    def source(self) -> str | None:
        return self.row.get("source")

    @property
    def reason(self) -> str:
        return self.row["reason"]

    @property
    def detail(self) -> str:
        return self.row.get("detail", "")


class _Writer:
    def __init__(self, path: Path):
        self._rows = JsonlWriter(path)

    @property
    def count(self) -> int:
        return self._rows.count

    def write(self, record: Item | Rejection) -> None:
        self._rows.write(record.to_json())

    def close(self) -> None:
        self._rows.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ItemWriter(_Writer):
    """Writes `Item`s to `path` (`<folder>/items.jsonl`), row by row; use as a context manager."""


class RejectedWriter(_Writer):
    """Writes `Rejection`s to `path` (`<folder>/rejected.jsonl`), row by row; use as a context manager."""


def fix_for(folder: Path | str, wrote: str | None = None) -> str:
    """The command that rewrites the items at `folder` (from the stage graph)."""
    return graph.fix(ITEMS, folder, wrote)


def require(folder: Path) -> artifacts.Manifest:
    """The finished output holding items at `folder`, of a version read here (else one line naming the fix)."""
    return artifacts.require_input(Path(folder), ITEMS)


def read_items(folder: Path, manifest: artifacts.Manifest | None = None) -> Iterator[Item]:
    """Every item of `folder/items.jsonl`, streamed, once the file is checked against its manifest's record."""
    folder = Path(folder)
    manifest = manifest or require(folder)
    fix = fix_for(folder, manifest.stage)
    return read_file(manifest.verified(folder, FILE, fix), fix)


def read_file(path: Path, fix: str = "") -> Iterator[Item]:
    """The items of one items file (no manifest check: a file a stage is writing itself)."""
    yield from _rows(path, Item, fix)


def read_rejected(folder: Path, manifest: artifacts.Manifest | None = None) -> Iterator[Rejection]:
    folder = Path(folder)
    manifest = manifest or require(folder)
    fix = fix_for(folder, manifest.stage)
    yield from _rows(manifest.verified(folder, REJECTED, fix), Rejection, fix)


def _rows(path: Path, record: Any, fix: str) -> Iterator[Any]:
    return read_records(path, record.from_json, "an item" if record is Item else "a rejected row", fix)
