"""`sdxl ingest SOURCE...`: images + sidecar captions + tags -> items.jsonl / rejected.jsonl.

Every file under every source ends in exactly one row: an accepted item in `items.jsonl`, or a rejection with
a reason code in `rejected.jsonl`. A caption file belongs to its image's row (`caption_path`); a caption file
without an image is rejected as `orphan_caption`. Headers only by default; `--verify` decodes every pixel.
"""
from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections import Counter, deque
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

from shared.core import artifacts
from stages.ingest import tags as tagging
from shared.core.artifacts import Manifest
from shared.core.config import opt
from shared.core.errors import ConfigError, DataError
from shared.core.faults import checkpoint
from shared.images import IMAGE_EXTENSIONS, Rejected, probe
from shared.formats.jsonl import JsonlWriter, read_jsonl
from shared.core.log import progress, say, table
from shared.core.ranks import die_with_parent
from shared.core.stage import BuildResult, Stage, execute

VERSION = 1


@dataclass(frozen=True)
class Source:
    """One source folder; unset options fall back to the [ingest] table's values."""
    path: Path = opt(Path("."), "Folder walked recursively for images and captions.")
    repeats: int | None = opt(None, "Times each image of this source is seen per epoch.", ge=1)
    caption_ext: str | None = opt(None, "Extension of sidecar caption files.", nonempty=True)
    caption_required: bool | None = opt(None, "Reject images without a caption (reason no_caption).")
    tag_separator: str | None = opt(None, "Separator between tags in a caption.", nonempty=True)


@dataclass(frozen=True)
class Config:
    sources: tuple[Source, ...] = opt((), "Source folders. In TOML: a list of paths or [[ingest.sources]] "
                                      "tables with per-source repeats, caption_ext, caption_required, "
                                      "tag_separator.", positional=True)
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/ingest].", flag="--out",
                              fingerprint=False)
    repeats: int = opt(1, "Default times each image is seen per epoch.", ge=1)
    caption_ext: str = opt(".txt", "Default sidecar caption extension (image.png -> image.txt).", nonempty=True)
    caption_required: bool = opt(False, "Reject images without a caption instead of keeping an empty one.")
    tag_separator: str = opt(",", "Default separator between tags in a caption.", nonempty=True)
    lowercase_tags: bool = opt(False, "Lower-case tags.")
    underscores_to_spaces: bool = opt(False, "Turn underscores in tags into spaces (long_hair -> long hair).")
    verify: bool = opt(False, "Decode every image fully to catch truncated or corrupt files (slower).")
    min_side: int = opt(256, "Reject images whose shorter side is below this (too_small).", ge=1)
    max_pixels: int = opt(100_000_000, "Reject images with more pixels than this, from the header, before "
                                       "decoding (too_large; decompression-bomb guard).", ge=1)
    tag_weighting: bool = opt(True, "Compute tag-frequency loss weights (otherwise every item weighs 1).")
    tag_weight_power: float = opt(0.5, "Exponent p of the per-tag weight (median_count / count) ** p; 0 = "
                                       "every tag weighs the same.", ge=0)
    tag_weight_min: float = opt(0.5, "Lower clamp of an item's tag weight (the mean weight is 1).", gt=0, le=1)
    tag_weight_max: float = opt(2.0, "Upper clamp of an item's tag weight (the mean weight is 1).", ge=1)
    workers: int = opt(0, "Worker processes (0 = one per CPU core, at most 8; 1 = in-process).", ge=0,
                       fingerprint=False)

    def __post_init__(self) -> None:
        if not self.sources:  # ranges, types and empty strings are checked by shared.core.config.build
            raise ConfigError("sources: none given; pass SOURCE folders or set [ingest] sources")
        object.__setattr__(self, "output", self.output or self.workdir / "ingest")  # resolved, as recorded

    @property
    def out_dir(self) -> Path:
        return self.output

    def own_folders(self) -> frozenset[Path]:
        """Folders the pipeline writes, never walked as data even when a source contains them."""
        out = self.out_dir.expanduser().resolve()
        return frozenset({self.workdir.expanduser().resolve(), out, artifacts.staging_dir(out)})

    def effective(self, src: Source) -> Source:
        """A source with every unset option filled from this table."""
        return replace(src, path=src.path.expanduser().resolve(),
                       repeats=src.repeats if src.repeats is not None else self.repeats,
                       caption_ext=_dot(src.caption_ext if src.caption_ext is not None else self.caption_ext),
                       caption_required=(src.caption_required if src.caption_required is not None
                                         else self.caption_required),
                       tag_separator=src.tag_separator if src.tag_separator is not None else self.tag_separator)


def _dot(ext: str) -> str:
    return ext.lower() if ext.startswith(".") else "." + ext.lower()


# ---------------------------------------------------------------- listing


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
    """Hash of every file's relative path, size and mtime (and of the folders not walked): changes when the
    source's files do. A file that cannot be stat'ed (a broken link) counts with its link's own data."""
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
            h.update(f"{os.path.join(folder.rel, name)}\0{st.st_size}\0{st.st_mtime_ns}\n"
                     .encode("utf-8", "surrogateescape"))
    return h.hexdigest()


@dataclass(frozen=True)
class Task:
    kind: str            # image | orphan_caption | not_image | rejected (a folder not walked)
    source: int          # index into the effective sources
    rel: str             # path relative to the source root
    caption_rel: str | None = None
    row: tuple = ()      # kind rejected: the row's (key, value) pairs


def tasks_for(sources: list[Source], skip: frozenset[Path] = frozenset()) -> Iterator[Task]:
    for index, src in enumerate(sources):
        for folder in walk(src.path, skip):
            for row in folder.rejected:
                yield Task("rejected", index, row["path"], row=tuple(row.items()))
            yield from _file_tasks(index, src, folder)


def _file_tasks(index: int, src: Source, folder: Folder) -> Iterator[Task]:
    names = folder.names
    images = {os.path.splitext(n)[0] for n in names if os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS}
    captions = {os.path.splitext(n)[0]: n for n in names if os.path.splitext(n)[1].lower() == src.caption_ext}
    for name in names:
        stem, ext = os.path.splitext(name)
        rel = os.path.join(folder.rel, name)
        if ext.lower() in IMAGE_EXTENSIONS:
            cap = captions.get(stem)
            yield Task("image", index, rel, os.path.join(folder.rel, cap) if cap else None)
        elif ext.lower() == src.caption_ext:
            if stem not in images:
                yield Task("orphan_caption", index, rel)
        else:
            yield Task("not_image", index, rel)


# ---------------------------------------------------------------- per file (runs in workers)

_worker_state: dict = {}


def _init_worker(cfg: Config, sources: list[Source], in_pool: bool = False) -> None:
    if in_pool:
        die_with_parent()
    _worker_state["cfg"], _worker_state["sources"] = cfg, sources


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
        return " ".join(text.replace("\x00", " ").split()), ("utf-8" if enc == "utf-8-sig" else enc)
    return " ".join(data.decode("latin-1").replace("\x00", " ").split()), "latin-1"


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
    base["caption_path"] = task.caption_rel
    try:
        data = (src.path / task.rel).read_bytes()
        info = probe(data, max_pixels=cfg.max_pixels, min_side=cfg.min_side, verify=cfg.verify)
        caption, encoding = read_caption((src.path / task.caption_rel).read_bytes()) if task.caption_rel else ("", None)
    except Rejected as r:
        return {"ok": False, **base, "reason": r.reason, "detail": r.detail}
    except OSError as e:
        return {"ok": False, **base, "reason": "unreadable", "detail": f"{type(e).__name__}: {e}"}
    if not caption and src.caption_required:
        why = "caption file is empty" if task.caption_rel else f"no {src.caption_ext} caption file"
        return {"ok": False, **base, "reason": "no_caption", "detail": why}
    digest = hashlib.sha256(data).hexdigest()
    return {"ok": True, "id": digest[:16], **base, "width": info.width, "height": info.height,
            "stored_width": info.stored_width, "stored_height": info.stored_height,
            "orientation": info.orientation, "mode": info.mode, "format": info.format, "frames": info.frames,
            "bytes": len(data), "caption": caption, "caption_encoding": encoding,
            "tags": tagging.split_tags(caption, src.tag_separator, cfg.lowercase_tags, cfg.underscores_to_spaces),
            "tag_weight": 1.0, "sha256": digest, "repeats": src.repeats}


def _results(cfg: Config, sources: list[Source], tasks: list[Task]) -> Iterator[dict]:
    workers = cfg.workers or min(os.cpu_count() or 1, 8)
    if workers == 1 or len(tasks) < 64:
        _init_worker(cfg, sources)
        yield from map(examine, tasks)
        return
    ctx = multiprocessing.get_context("spawn")  # fork after torch/threads is unsafe; spawn always is
    with ctx.Pool(workers, initializer=_init_worker, initargs=(cfg, sources, True)) as pool:
        yield from pool.imap(examine, tasks, chunksize=16)


# ---------------------------------------------------------------- the stage


def _inputs(cfg: Config) -> dict:
    found = {}
    for src in (cfg.effective(s) for s in cfg.sources):
        if not src.path.is_dir():
            raise DataError(f"source folder not found: {src.path}")
        found[f"source:{src.path}"] = {"path": str(src.path), "fingerprint": listing_fingerprint(src.path, cfg.own_folders()),
                                       "what": "files added, removed or modified"}
    return found


def _build(cfg: Config, staging: Path, inputs: dict) -> BuildResult:
    sources = [cfg.effective(s) for s in cfg.sources]
    tasks = list(tasks_for(sources, cfg.own_folders()))
    reasons: Counter = Counter()
    tag_counts: Counter = Counter()
    first_by_sha: dict[str, tuple[str, str]] = {}
    uncaptioned = 0
    partial = staging / "items.partial.jsonl"
    with JsonlWriter(partial) as items, JsonlWriter(staging / "rejected.jsonl") as rejected:
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
                tag_counts.update(row["tags"])
                uncaptioned += not row["caption"]
                items.write(row)
                checkpoint("ingest.item")
            else:
                reasons[row["reason"]] += 1
                rejected.write(row)
    accepted = items.count
    if accepted == 0:
        raise DataError(f"no usable images in {', '.join(str(s.path) for s in sources)} "
                        f"({sum(reasons.values())} files rejected: {dict(reasons)})")
    _write_weighted(cfg, partial, staging / "items.jsonl", tag_counts)
    partial.unlink()
    artifacts.write_atomic(staging / "tag_counts.json", _tag_counts_json(tag_counts))
    paired = sum(1 for t in tasks if t.caption_rel)
    counts = {"in": len(tasks) + paired, "out": accepted, "dropped": dict(sorted(reasons.items())),
              "captions": paired}
    _print_summary(counts, uncaptioned)
    return BuildResult(counts, {"tags": len(tag_counts)})


def _write_weighted(cfg: Config, partial: Path, final: Path, tag_counts: Counter) -> None:
    """Second pass: the tag weights need the whole dataset's tag counts."""
    if cfg.tag_weighting:
        per_tag = tagging.tag_weights(tag_counts, cfg.tag_weight_power)
        raw = [tagging.raw_item_weight(r["tags"], per_tag) for r in read_jsonl(partial)]
        weights = iter(tagging.normalise_weights(raw, cfg.tag_weight_min, cfg.tag_weight_max))
    with JsonlWriter(final) as out:
        for row in read_jsonl(partial):
            row["tag_weight"] = round(next(weights), 6) if cfg.tag_weighting else 1.0
            out.write(row)


def _tag_counts_json(counts: Counter) -> str:
    ordered = dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return json.dumps(ordered, ensure_ascii=False, indent=1) + "\n"


def _print_summary(counts: dict, uncaptioned: int) -> None:
    rows = [["accepted", counts["out"]]] + [[f"rejected: {k}", v] for k, v in counts["dropped"].items()]
    rows.append(["caption files (part of the rows above)", counts["captions"]])
    say(table(["files", "count"], rows + [["total files", counts["in"]]]))
    if uncaptioned:
        say(f"note: {uncaptioned} accepted images have no caption (set caption_required to reject them)")


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    return [("source folder", cfg.effective(s).path) for s in cfg.sources]


STAGE = Stage(name="ingest", version=VERSION,
              module=__name__,
              out_dir=lambda cfg: cfg.out_dir, inputs=_inputs, build=_build, protected=_protected)


def run(cfg: Config, force: bool = False) -> Manifest:
    """Ingest the sources into `<out>/items.jsonl` and `<out>/rejected.jsonl`."""
    return execute(STAGE, cfg, force)
