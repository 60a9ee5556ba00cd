"""The bucket plan (bucket → encode): `plan.jsonl`, one `PlanRow` per planned item.

A row is everything ingest knew of the item (its `Item`, shared/formats/items.py, carried through unchanged) plus
where it goes: `bucket` `[w, h]`, `resize` `[w, h]` (the cover resize), `crop` `[left, top]` and `scale`. The
file's format version is `PLAN_VERSION` (the `plan` format of the stage graph, written by bucket and by any stage
that reads a plan and writes one back); bucket writes rows with `PlanWriter`, encode reads them with `read_plan`,
which checks the manifest (the plan format, not its writer's name), the file's recorded hash and every row.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import ClassVar, Iterator

from shared.core import artifacts, graph
from shared.formats.items import Item
from shared.formats.jsonl import JsonlWriter, read_records

PLAN_VERSION = 1  # the plan format's version (bucket's manifest version)
FILE = "plan.jsonl"
#: where a row's placement begins; the fields before it are ingest's, in the order ingest writes them
PLACEMENT = ("bucket", "resize", "crop", "scale")
PLAN = graph.declare(graph.Format(
    "plan", PLAN_VERSION, "plan.jsonl (each item with its bucket, resize and crop) and buckets.json",
    made_by="bucket"))


@dataclass(frozen=True, kw_only=True)
class PlanRow(Item):
    """One planned item: an ingest `Item` placed in a bucket. Sizes are `(width, height)`; `crop` is
    `(left, top)` in the resized image."""
    bucket: tuple[int, int]
    resize: tuple[int, int]
    crop: tuple[int, int]
    scale: float = 1.0                 # resize factor of the cover resize

    TAIL: ClassVar[tuple[str, ...]] = PLACEMENT
    PAIRS: ClassVar[tuple[str, ...]] = ("bucket", "resize", "crop")

    @classmethod
    def planned(cls, item: Item | dict, bucket: tuple[int, int], resize: tuple[int, int], crop: tuple[int, int],
                scale: float) -> "PlanRow":
        """An ingest item placed in `bucket`."""
        if isinstance(item, dict):
            item = Item.from_json(item)
        own = {f.name: getattr(item, f.name) for f in fields(Item) if f.name != "extra"}
        extra = {k: v for k, v in item.extra.items() if k not in PLACEMENT}
        return cls(**own, extra=extra, bucket=tuple(int(x) for x in bucket),
                   resize=tuple(int(x) for x in resize), crop=tuple(int(x) for x in crop), scale=scale)


class PlanWriter:
    """Writes `plan.jsonl` row by row; use as a context manager."""

    def __init__(self, folder: Path):
        self._rows = JsonlWriter(Path(folder) / FILE)

    @property
    def count(self) -> int:
        return self._rows.count

    def write(self, row: PlanRow) -> None:
        self._rows.write(row.to_json())

    def __enter__(self) -> "PlanWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self._rows.close()


def fix_for(folder: Path | str, wrote: str | None = None) -> str:
    """The command that rewrites the plan at `folder` (from the stage graph: `wrote`, the stage whose output it
    is, when that writes plans)."""
    return graph.fix(PLAN, folder, wrote)


def require(folder: Path) -> artifacts.Manifest:
    """The finished output holding a plan at `folder`, of this plan version (else one line naming the fix)."""
    return artifacts.require_input(folder, PLAN)


def read_plan(folder: Path, manifest: artifacts.Manifest | None = None) -> list[PlanRow]:
    """Every row of `folder/plan.jsonl`, once the file is checked against its manifest's record."""
    manifest = manifest or require(folder)
    fix = fix_for(folder, manifest.stage)
    path = manifest.verified(folder, FILE, fix)
    return list(_rows(path, fix))


def _rows(path: Path, fix: str) -> Iterator[PlanRow]:
    return read_records(path, PlanRow.from_json, "a plan row", fix)
