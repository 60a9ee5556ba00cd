"""The checkpoint folder contract between train (writes) and export (reads): `checkpoints/step-NNNNNN/`,
finished when its `manifest.json` (stage `train-checkpoint`) exists; `.partial` folders are never finished.
The manifest records every file's size and sha256 (`files`), checked before a checkpoint is resumed or
exported."""
from __future__ import annotations

import json
import re
from pathlib import Path

from shared.core import integrity
from shared.core.errors import InputError

CHECKPOINT_STAGE = "train-checkpoint"
VERSION = 2  # 2: the manifest records file hashes
NAME = re.compile(r"step-\d{6,}")  # not .partial (being written) nor .damaged (set aside)


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def complete(root: Path) -> list[Path]:
    """Finished checkpoints under `root` (manifest present), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name)
                  and (p / "manifest.json").is_file())


def manifest_or_none(folder: Path) -> dict | None:
    """A checkpoint folder's manifest, or None when `folder` is not a finished checkpoint."""
    try:
        data = json.loads((Path(folder) / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == CHECKPOINT_STAGE else None


def read_manifest(folder: Path) -> dict:
    """A finished checkpoint's manifest of this format version, or an InputError saying what it is not."""
    data = manifest_or_none(folder)
    if data is None:
        raise InputError(f"{folder}: not a finished checkpoint (no readable train-checkpoint manifest.json)")
    if data.get("version") != VERSION:
        raise InputError(f"{folder}: a train checkpoint of format version {data.get('version')}, which this "
                         f"version of sdxl cannot read (it reads {VERSION}); retrain with sdxl train")
    return data


def write_manifest(folder: Path, manifest: dict) -> None:
    """Finish a checkpoint folder whose files are all written: its manifest (this format version, with every
    file's size and sha256), written last and atomically."""
    from shared.core.artifacts import write_atomic

    files = {rel: {"bytes": r["bytes"], "sha256": r["sha256"]} for rel, r in integrity.record(folder)[0].items()}
    write_atomic(Path(folder) / "manifest.json", json.dumps({**manifest, "stage": CHECKPOINT_STAGE,
                                                            "version": VERSION, "files": files}, indent=1) + "\n")


def damage(folder: Path) -> list[str]:
    """What in a finished checkpoint differs from its manifest's file record (empty: intact)."""
    try:
        files = read_manifest(folder).get("files")
    except InputError as e:
        return [str(e)]
    if not isinstance(files, dict) or not files:
        return [f"{folder}: its manifest records no files"]
    problems = []
    for rel, rec in files.items():
        path = Path(folder) / rel
        try:
            size = path.stat().st_size
        except OSError:
            problems.append(f"{rel} is missing")
            continue
        if size != rec["bytes"] or integrity.sha256_file(path) != rec["sha256"]:
            problems.append(f"{rel} differs from what was written (size or sha256)")
    return problems


def require_intact(folder: Path) -> dict:
    """A finished checkpoint's manifest once every file checks out; an InputError naming the damage."""
    problems = damage(folder)
    if problems:
        raise InputError(f"{folder}: damaged checkpoint ({problems[0]}); use another checkpoint")
    return read_manifest(folder)
