"""The bucket plan (bucket → encode): `plan.jsonl`, one `PlanRow` per planned item.

A row is everything ingest knew of the item (its `items.jsonl` record, carried through unchanged) plus where
it goes: `bucket` `[w, h]`, `resize` `[w, h]` (the cover resize), `crop` `[left, top]` and `scale`. The file's
format version is the bucket output's manifest version (`PLAN_VERSION`); bucket writes rows with `PlanWriter`,
encode reads them with `read_plan`, which checks the manifest, the file's recorded hash and every row.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from shared.core import artifacts
from shared.core.errors import InputError
from shared.formats.jsonl import JsonlWriter

PLAN_VERSION = 1  # the bucket stage's format version
FILE = "plan.jsonl"
#: where a row's placement begins; the fields before it are ingest's, in the order ingest writes them
PLACEMENT = ("bucket", "resize", "crop", "scale")


@dataclass(frozen=True, kw_only=True)
class PlanRow:
    """One planned item. Sizes are `(width, height)`; `crop` is `(left, top)` in the resized image."""
    id: str                            # stable, from the content hash (ingest)
    path: str                          # relative to `source`, as ingest found it
    source: str                        # the source root
    caption_path: str | None = None
    width: int                         # upright (after EXIF orientation)
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
    bucket: tuple[int, int]
    resize: tuple[int, int]
    crop: tuple[int, int]
    scale: float = 1.0                 # resize factor of the cover resize
    extra: dict = field(default_factory=dict)  # fields of a newer ingest that this version does not know

    @classmethod
    def planned(cls, item: dict, bucket: tuple[int, int], resize: tuple[int, int], crop: tuple[int, int],
                scale: float) -> "PlanRow":
        """An ingest item placed in `bucket`."""
        return cls.from_json({**item, "bucket": bucket, "resize": resize, "crop": crop, "scale": scale})

    @classmethod
    def from_json(cls, data: dict) -> "PlanRow":
        known = {f.name for f in fields(cls)} - {"extra"}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for name in ("bucket", "resize", "crop"):
            if name in values:
                values[name] = tuple(int(x) for x in values[name])
        values["tags"] = tuple(values.get("tags") or ())
        return cls(**values, extra={k: v for k, v in data.items() if k not in known})

    def to_json(self) -> dict:
        """The row as written: ingest's fields in ingest's order, then the placement (the same keys and order
        as `{**item, "bucket": ..., "resize": ..., "crop": ..., "scale": ...}`)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name not in PLACEMENT and f.name != "extra":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(self.extra)
        out.update(bucket=list(self.bucket), resize=list(self.resize), crop=list(self.crop), scale=self.scale)
        return out

    @property
    def image(self) -> str:
        """The image file's path."""
        return str(Path(self.source) / self.path)


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


def fix_for(folder: Path) -> str:
    """The command that rewrites the plan at `folder`."""
    return f"sdxl bucket --out {folder}"


def require(folder: Path) -> artifacts.Manifest:
    """The finished bucket output at `folder`, of this plan version (else one line naming the fix)."""
    return artifacts.require_input(folder, "bucket", (PLAN_VERSION,), fix_for(folder))


def read_plan(folder: Path, manifest: artifacts.Manifest | None = None) -> list[PlanRow]:
    """Every row of `folder/plan.jsonl`, once the file is checked against the bucket manifest's record."""
    manifest = manifest or require(folder)
    path = manifest.verified(folder, FILE, fix_for(folder))
    return list(_rows(path, fix_for(folder)))


def _rows(path: Path, fix: str) -> Iterator[PlanRow]:
    with open(path, encoding="utf-8") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
                if not isinstance(data, dict):
                    raise TypeError(f"a JSON {type(data).__name__}, not an object")
                yield PlanRow.from_json(data)
            except (ValueError, TypeError) as e:
                raise InputError(f"{path} line {n}: not a plan row ({type(e).__name__}: {e}); rerun: {fix}") \
                    from None
