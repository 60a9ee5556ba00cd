"""The checkpoint folder contract between train (writes) and export (reads): `checkpoints/step-NNNNNN/`,
finished when its `manifest.json` (stage `train-checkpoint`) exists; `.partial` folders are never finished."""
from __future__ import annotations

import json
from pathlib import Path

from shared.errors import InputError

CHECKPOINT_STAGE = "train-checkpoint"
VERSION = 1


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def complete(root: Path) -> list[Path]:
    """Finished checkpoints under `root` (manifest present), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-")
                  and not p.name.endswith(".partial") and (p / "manifest.json").is_file())


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
        raise InputError(f"{folder}: not a train checkpoint of format version {VERSION}")
    return data
