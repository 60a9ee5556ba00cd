"""What ingest does with each file of a source, decided in the main process in the listing's fixed order: the
layout (plain, or kohya's `<repeats>_<name>` folders) and the captions that do not come from a sidecar file
(metadata.jsonl, kohya folder tokens). Workers then examine one task each (see `examine`)."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shared.core.log import warn
from shared.images import IMAGE_EXTENSIONS
from stages.ingest import kohya, metadata
from stages.ingest.config import Source
from stages.ingest.tags import clean_caption
from stages.ingest.walk import Folder, walk


@dataclass(frozen=True)
class Task:
    kind: str            # image | orphan_caption | not_image | rejected (a folder not walked) | metadata | outside
    source: int          # index into the effective sources
    rel: str             # path relative to the source root
    caption_rel: str | None = None
    row: tuple = ()      # kinds rejected, metadata, outside: the row's (key, value) pairs
    caption: tuple = ()  # an image without a caption file: (text, "metadata" | "folder", metadata file | None)
    fields: tuple = ()   # kohya layout: the item's (key, value) pairs: repeats, subset, instance/class prompt


@dataclass(frozen=True)
class Layout:
    name: str            # plain | kohya
    why: str = ""        # what decided it, for layout = "auto"


def resolve_layout(src: Source, skip: frozenset[Path] = frozenset()) -> Layout:
    """The layout a source is read with: its own, or for "auto" kohya's when the folder looks like it."""
    if src.layout != "auto":
        return Layout(src.layout or "plain")
    fits, why = kohya.looks_like_kohya(src.path, skip)
    return Layout("kohya" if fits else "plain", why)


def tasks_for(sources: list[Source], skip: frozenset[Path] = frozenset(),
              layouts: list[str] | None = None) -> Iterator[Task]:
    for index, src in enumerate(sources):
        layout = layouts[index] if layouts else resolve_layout(src, skip).name
        yield from source_tasks(index, src, layout, skip)


def source_tasks(index: int, src: Source, layout: str, skip: frozenset[Path] = frozenset()) -> list[Task]:
    """Every task of one source. A metadata file's row is made last (it reports which of its entries found an
    image, which needs the whole walk) and put back in its place in the listing."""
    tables = metadata.Tables(src.path, src.caption_column) if src.metadata else None
    tasks: list[Task] = []
    for folder in walk(src.path, skip):
        tasks.extend(Task("rejected", index, row["path"], row=tuple(row.items())) for row in folder.rejected)
        tasks.extend(_file_tasks(index, src, folder, layout, tables))
    if tables is None:
        return tasks
    return [Task("metadata", index, t.rel, row=tuple(tables.row(os.path.dirname(t.rel)).items()))
            if t.kind == "metadata" else t for t in tasks]


def _file_tasks(index: int, src: Source, folder: Folder, layout: str,
                tables: metadata.Tables | None) -> Iterator[Task]:
    names = folder.names
    images = {os.path.splitext(n)[0] for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS}
    captions = {os.path.splitext(n)[0]: n for n in names if os.path.splitext(n)[1].lower() == src.caption_ext}
    place = kohya.placement(folder.rel) if layout == "kohya" else None
    if tables is not None and metadata.FILE in names:
        tables.read(folder.rel)  # before this folder's images claim their captions
    _say_shared_captions(src, folder, captions)
    for name in names:
        stem, ext = os.path.splitext(name)
        rel = os.path.join(folder.rel, name)
        if ext.lower() in IMAGE_EXTENSIONS:
            cap = captions.get(stem)
            yield _image_task(index, src, rel, os.path.join(folder.rel, cap) if cap else None, place, tables)
        elif ext.lower() == src.caption_ext:
            if stem not in images:
                yield Task("orphan_caption", index, rel)
        elif tables is not None and name == metadata.FILE:
            yield Task("metadata", index, rel)  # its row is filled in once the source is walked
        else:
            yield Task("not_image", index, rel)


def _say_shared_captions(src: Source, folder: Folder, captions: dict[str, str]) -> None:
    """Warn about a caption file that captions more than one image (`anim.txt` for `anim.gif` and `anim.webp`):
    each of them takes it, which is seldom what was meant."""
    by_stem: dict[str, list[str]] = {}
    for name in folder.names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS and stem in captions:
            by_stem.setdefault(stem, []).append(name)
    for stem, images in by_stem.items():
        if len(images) > 1:
            warn(f"{os.path.join(src.path, folder.rel, captions[stem])}: one caption file for {len(images)} images "
                 f"({', '.join(images)}); each of them is captioned by it")


def _image_task(index: int, src: Source, rel: str, caption_rel: str | None, place: kohya.Subset | str | None,
                tables: metadata.Tables | None) -> Task:
    """An image's task: its caption source (a caption file wins, then the nearest metadata.jsonl listing it,
    then, in the kohya layout, its folder's tokens) and its kohya subset; or outside the kohya layout."""
    if isinstance(place, str):
        return Task("outside", index, rel, caption_rel,
                    row=(("caption_path", caption_rel), ("reason", "outside_layout"), ("detail", place)))
    caption: tuple = ()
    claimed = tables.claim(rel, caption_rel is not None) if tables is not None else None
    if claimed is not None:
        caption = (claimed[0], "metadata", claimed[1])
    elif caption_rel is None and place is not None and src.caption_from_folder and place.tokens.strip():
        caption = (clean_caption(place.tokens), "folder", None)
    fields = (("repeats", place.repeats), *place.fields()) if place is not None else ()
    return Task("image", index, rel, caption_rel, caption=caption, fields=fields)
