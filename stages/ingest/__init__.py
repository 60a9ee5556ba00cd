"""`sdxl ingest SOURCE...`: images + captions + tags -> items.jsonl / rejected.jsonl.

Every file under every source ends in exactly one row: an accepted item in `items.jsonl`, or a rejection with
a reason code in `rejected.jsonl`. A caption file belongs to its image's row (`caption_path`); a caption file
without an image is rejected as `orphan_caption`. Captions also come from metadata.jsonl files (Hugging Face
imagefolder; each such file is one `metadata` row) and, in kohya's layout (`<repeats>_<name>` folders), from
the folder's name. Headers only by default; `--verify` decodes every pixel.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

from shared.core import artifacts
from shared.core.artifacts import Manifest
from shared.core.errors import DataError
from shared.core.faults import checkpoint
from shared.core.log import progress, say, table, warn
from shared.core.ranks import die_with_parent
from shared.core.stage import BuildResult, Stage, execute
from shared.formats import items as itemfile
from shared.formats.items import ITEMS, ITEMS_VERSION, Item, ItemWriter, Rejection, RejectedWriter
from shared.images import Rejected, probe
from stages.ingest import kohya, metadata
from stages.ingest import tags as tagging
from stages.ingest.config import Config, Source
from stages.ingest.files import MAX_CAPTION_BYTES, image_limit, read_regular
from stages.ingest.tasks import Layout, Task, resolve_layout, tasks_for
from stages.ingest.walk import listing_fingerprint, walk

__all__ = ["Config", "Source", "Task", "examine", "listing_fingerprint", "read_caption", "run", "tasks_for",
           "walk"]

VERSION = ITEMS_VERSION  # the ingest output's format is its items' (shared/formats/items.py)


# ---------------------------------------------------------------- per file (runs in workers)

_worker_state: dict = {}


def _init_worker(cfg: Config, sources: list[Source], parent: int | None = None) -> None:
    """A worker's start; in a pool (`parent`: the stage's pid) it ends itself as soon as the stage is gone."""
    if parent is not None:
        checkpoint("ingest.worker")
        _leave_with(parent)
    _worker_state["cfg"], _worker_state["sources"] = cfg, sources


def _leave_with(parent: int) -> None:
    """End this worker when `parent` dies, even by kill -9: Linux's parent-death signal, set now and so too
    late if the parent died while this process was starting (checked right after), and a watch of the parent
    pid twice a second where that signal does not exist."""
    die_with_parent()
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def read_caption(data: bytes) -> tuple[str, str]:
    """Caption text and the encoding it was read with: UTF-8 (BOM allowed), UTF-16 with a BOM, or without one
    when NUL bytes give it away (see `_bomless_utf16`), else cp1252, else latin-1 (which never fails).
    Whitespace runs, newlines included, become one space (a stray NUL character counts as whitespace)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        candidates: tuple[str, ...] = ("utf-16",)
    else:
        candidates = tuple(filter(None, (_bomless_utf16(data), "utf-8-sig", "cp1252", "latin-1")))
    for enc in candidates:
        try:
            text = data.decode(enc)
        except UnicodeDecodeError:
            continue
        return tagging.clean_caption(text), ("utf-8" if enc == "utf-8-sig" else enc)
    return tagging.clean_caption(data.decode("latin-1")), "latin-1"


def _bomless_utf16(data: bytes) -> str | None:
    """utf-16-le or utf-16-be for text saved as UTF-16 without a byte-order mark, told by its NUL bytes: text
    in UTF-8 or an 8-bit code page has none, while Latin-script UTF-16 has one in every other byte (odd
    positions for little-endian, even for big-endian). Text without any such character is not detected."""
    odd, even = data[1::2].count(0), data[0::2].count(0)
    if len(data) % 2 or max(odd, even) == 0 or min(odd, even) * 4 > max(odd, even):
        return None
    return "utf-16-le" if odd > even else "utf-16-be"


def _broken_link(path: Path) -> bool:
    """A symbolic link whose target is missing, or that leads back to itself."""
    return os.path.islink(path) and not os.path.exists(path)


def _link_detail(path: Path) -> str:
    try:
        os.stat(path)
    except OSError as e:
        return f"symbolic link to {os.readlink(path)!r}: {e.strerror}"
    return f"symbolic link to {os.readlink(path)!r}"


def examine(task: Task) -> dict:
    """The row for one file: {"ok": True, ...item} or {"ok": False, ...rejection}."""
    cfg: Config = _worker_state["cfg"]
    src: Source = _worker_state["sources"][task.source]
    base = {"path": task.rel, "source": str(src.path)}
    if task.kind == "rejected":
        return {"ok": False, **base, **dict(task.row)}
    if _broken_link(src.path / task.rel):
        return {"ok": False, **base, "reason": "broken_link", "detail": _link_detail(src.path / task.rel)}
    if task.kind == "orphan_caption":
        return {"ok": False, **base, "reason": "orphan_caption", "detail": "caption file without an image"}
    if task.kind == "not_image":
        return {"ok": False, **base, "reason": "not_image", "detail": "not an image or caption file"}
    if task.kind in ("metadata", "outside"):
        return {"ok": False, **base, **dict(task.row)}
    base["caption_path"] = task.caption_rel
    try:
        data = read_regular(src.path / task.rel, image_limit(cfg.max_pixels), "image file")
        info = probe(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, verify=cfg.verify)
        caption, encoding = _caption(src, task)
    except Rejected as r:
        return {"ok": False, **base, "reason": r.reason, "detail": r.detail}
    except OSError as e:
        return {"ok": False, **base, "reason": "unreadable", "detail": f"{type(e).__name__}: {e}"}
    if not caption and src.caption_required:
        return {"ok": False, **base, "reason": "no_caption", "detail": _no_caption(src, task)}
    digest = hashlib.sha256(data).hexdigest()
    row = {"ok": True, "id": digest[:16], **base, "width": info.width, "height": info.height,
           "stored_width": info.stored_width, "stored_height": info.stored_height,
           "orientation": info.orientation, "mode": info.mode, "format": info.format, "frames": info.frames,
           "bytes": len(data), "caption": caption, "caption_encoding": encoding,
           "tags": tagging.split_tags(caption, src.tag_separator, cfg.lowercase_tags, cfg.underscores_to_spaces),
           "tag_weight": 1.0, "sha256": digest, "repeats": src.repeats, "role": src.role}
    if task.caption:  # where a caption not read from a caption file came from
        row["caption_from"] = task.caption[1]
        if task.caption[2]:
            row["metadata_path"] = task.caption[2]
    row.update(task.fields)  # the kohya layout: repeats (in place), then subset and DreamBooth prompts
    return row


def _caption(src: Source, task: Task) -> tuple[str, str | None]:
    """(caption, encoding): from the caption file, else from metadata.jsonl (JSON is UTF-8) or the kohya
    folder's name (no encoding: a file name), else empty."""
    if task.caption_rel:
        return read_caption(read_regular(src.path / task.caption_rel, MAX_CAPTION_BYTES,
                                         f"its caption file {os.path.basename(task.caption_rel)}"))
    if task.caption:
        return task.caption[0], "utf-8" if task.caption[1] == "metadata" else None
    return "", None


def _no_caption(src: Source, task: Task) -> str:
    if task.caption_rel:
        return "caption file is empty"
    if task.caption:
        return f"its caption in {task.caption[2]} is empty" if task.caption[2] else "its folder gives no caption"
    return f"no {src.caption_ext} caption file"


def _results(cfg: Config, sources: list[Source], tasks: list[Task]) -> Iterator[dict]:
    workers = cfg.workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or len(tasks) < 64:
        _init_worker(cfg, sources)
        yield from map(examine, tasks)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch/threads is unsafe; spawn always is
    with _without_main():
        pool = ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, sources, os.getpid()))
    with pool:
        yield from pool.imap(examine, tasks, chunksize=16)


@contextlib.contextmanager
def _without_main() -> Iterator[None]:
    """While workers are spawned: hide the main module from multiprocessing, which would have each worker run
    it first (`sdxl`'s imports torch and every stage: seconds per worker, in which a worker cannot notice that
    the stage has died). The workers need stages.ingest only, which they import to unpickle their work."""
    main = sys.modules.get("__main__")
    saved = {k: vars(main)[k] for k in ("__spec__", "__file__") if main is not None and k in vars(main)}
    try:
        if "__spec__" in saved:
            main.__spec__ = None  # type: ignore[union-attr]
        if "__file__" in saved:
            del main.__file__  # type: ignore[union-attr]
        yield
    finally:
        for k, v in saved.items():
            setattr(main, k, v)


# ---------------------------------------------------------------- the stage


def _inputs(cfg: Config) -> dict:
    found = {}
    for src in (cfg.effective(s) for s in cfg.sources):
        if not src.path.is_dir():
            raise DataError(f"source folder not found: {src.path}")
        if src.layout == "kohya":
            kohya.check_repeats(src.path, cfg.own_folders())
        found[f"source:{src.path}"] = {"path": str(src.path), "fingerprint": listing_fingerprint(src.path, cfg.own_folders()),
                                       "what": "files added, removed or modified"}
    return found


@dataclass
class _Tally:
    reasons: Counter = field(default_factory=Counter)      # rejected rows by reason
    tag_counts: Counter = field(default_factory=Counter)
    caption_from: Counter = field(default_factory=Counter)  # accepted items by caption source (None: a file)
    uncaptioned: int = 0
    warnings: list = field(default_factory=list)


def _build(cfg: Config, staging: Path, inputs: dict) -> BuildResult:
    sources = [cfg.effective(s) for s in cfg.sources]
    layouts = [resolve_layout(s, cfg.own_folders()) for s in sources]
    _say_layouts(sources, layouts, cfg.own_folders())
    tasks = list(tasks_for(sources, cfg.own_folders(), [layout.name for layout in layouts]))
    partial = staging / "items.partial.jsonl"
    tally, accepted = _write_rows(cfg, sources, tasks, partial, staging / itemfile.REJECTED)
    for line in tally.warnings:
        warn(line)
    metadata_files = tally.reasons.pop("metadata", 0)  # read for captions: counted apart from files dropped
    if accepted == 0:
        raise DataError(f"no usable images in {', '.join(str(s.path) for s in sources)} "
                        f"({sum(tally.reasons.values())} files rejected: {dict(tally.reasons)})")
    _write_weighted(cfg, partial, staging / itemfile.FILE, tally.tag_counts)
    partial.unlink()
    artifacts.write_atomic(staging / "tag_counts.json", _tag_counts_json(tally.tag_counts))
    paired = sum(1 for t in tasks if t.caption_rel)
    counts = {"in": len(tasks) + paired, "out": accepted, "dropped": dict(sorted(tally.reasons.items())),
              "captions": paired}
    extra_counts = {"metadata_files": metadata_files, "metadata_captions": tally.caption_from["metadata"],
                    "folder_captions": tally.caption_from["folder"]}
    counts.update({k: v for k, v in extra_counts.items() if v})  # absent when 0: manifests as before
    _print_summary(counts, tally.uncaptioned)
    extra: dict = {"tags": len(tally.tag_counts)}
    if any(layout.name != "plain" for layout in layouts):
        extra["layouts"] = {str(s.path): layout.name for s, layout in zip(sources, layouts)}
    return BuildResult(counts, extra)


def _write_rows(cfg: Config, sources: list[Source], tasks: list[Task], items_path: Path,
                rejected_path: Path) -> tuple[_Tally, int]:
    """Every task's row, in order, into the items (before tag weights) or the rejected file; the first file
    with given content is kept, later ones are duplicates."""
    tally = _Tally()
    first_by_sha: dict[str, tuple[str, str]] = {}
    with ItemWriter(items_path) as items, RejectedWriter(rejected_path) as rejected:
        for row in progress(_results(cfg, sources, tasks), len(tasks), "ingest", "file"):
            ok = row.pop("ok")
            if ok and row["sha256"] in first_by_sha:
                kept_path, kept_id = first_by_sha[row["sha256"]]
                row = {"path": row["path"], "source": row["source"], "caption_path": row["caption_path"],
                       "reason": "duplicate", "detail": "same content as an earlier file",
                       "duplicate_of": kept_path, "duplicate_of_id": kept_id}
                ok = False
            if ok:
                first_by_sha[row["sha256"]] = (row["path"], row["id"])
                tally.tag_counts.update(row["tags"])
                tally.uncaptioned += not row["caption"]
                tally.caption_from[row.get("caption_from")] += 1
                items.write(Item.from_json(row))
                checkpoint("ingest.item")
            else:
                tally.reasons[row["reason"]] += 1
                rejected.write(Rejection.from_json(row))
                trouble = metadata.problems(row) if row["reason"] == "metadata" else None
                if trouble:
                    tally.warnings.append(f"{os.path.join(row['source'], row['path'])}: {trouble}")
    return tally, items.count


def _say_layouts(sources: list[Source], layouts: list[Layout], skip: frozenset[Path]) -> None:
    """What "auto" chose and why; and a note for a plain source that looks like kohya's layout."""
    for src, layout in zip(sources, layouts):
        if src.layout == "auto":
            say(f"ingest: {src.path}: {layout.name} layout (auto: {layout.why})")
        elif layout.name == "plain" and src.path.is_dir():
            fits, why = kohya.looks_like_kohya(src.path, skip)
            if fits:
                say(f"note: {src.path} looks like kohya's layout ({why}); its folder names are not read as "
                    f"repeats unless layout = \"kohya\" (or \"auto\")")


def _write_weighted(cfg: Config, partial: Path, final: Path, tag_counts: Counter) -> None:
    """Second pass: the tag weights need the whole dataset's tag counts."""
    if cfg.tag_weighting:
        per_tag = tagging.tag_weights(tag_counts, cfg.tag_weight_power)
        raw = [tagging.raw_item_weight(item.tags, per_tag) for item in itemfile.read_file(partial)]
        weights = iter(tagging.normalise_weights(raw, cfg.tag_weight_min, cfg.tag_weight_max))
    with ItemWriter(final) as out:
        for item in itemfile.read_file(partial):
            out.write(replace(item, tag_weight=round(next(weights), 6) if cfg.tag_weighting else 1.0))


def _tag_counts_json(counts: Counter) -> str:
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return json.dumps(ordered, ensure_ascii=False, indent=1) + "\n"


def _print_summary(counts: dict, uncaptioned: int) -> None:
    rows = [["accepted", counts["out"]]] + [[f"rejected: {k}", v] for k, v in counts["dropped"].items()]
    rows.append(["caption files (part of the rows above)", counts["captions"]])
    if counts.get("metadata_files"):
        rows.append(["metadata.jsonl files (read for captions)", counts["metadata_files"]])
    for key, what in (("metadata_captions", "metadata.jsonl"), ("folder_captions", "kohya folder names")):
        if counts.get(key):
            rows.append([f"accepted, captioned from {what}", counts[key]])
    say(table(["files", "count"], rows + [["total files", counts["in"]]]))
    if uncaptioned:
        say(f"note: {uncaptioned} accepted images have no caption (set caption_required to reject them)")


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    return [("source folder", cfg.effective(s).path) for s in cfg.sources]


STAGE = Stage(name="ingest", version=VERSION,
              module=__name__,
              out_dir=lambda cfg: cfg.out_dir, inputs=_inputs, build=_build, protected=_protected, writes=(ITEMS,))


def run(cfg: Config, force: bool = False) -> Manifest:
    """Ingest the sources into `<out>/items.jsonl` and `<out>/rejected.jsonl`."""
    return execute(STAGE, cfg, force)
