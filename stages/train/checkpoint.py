"""Checkpoints: `checkpoints/step-NNNNNN/`, written as `.partial` and renamed, newest K kept.

A checkpoint holds everything the next step depends on: the trained weights (safetensors), EMA, AdamW's state
(tensors as safetensors, the rest as JSON), the gradient scaler, every rank's RNG states (torch CPU/CUDA,
Python, NumPy; the per-sample draws need none, see step.py), and the loader position (epoch, step in epoch:
the data plan is a function of the config, so the position is all it takes). Its `manifest.json`, written
last, records the fingerprinted config, world size and inputs, against which a resume is checked.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from shared.core import artifacts
# the folder contract itself is shared with export; re-exported here for the loop
from shared.formats.checkpoints import (CHECKPOINT_STAGE, VERSION, complete, damage, folder_name,  # noqa: F401
                                read_manifest, require_intact, write_manifest)
from shared.core.errors import ConfigError, InputError
from shared.core.log import warn


def resolve_resume(resume: str, staging: Path, main: bool = True) -> Path | None:
    """The checkpoint to start from: `auto` = the newest in this run's staging folder (None if there is none),
    `never` = None, else a checkpoint folder or a train output folder (its newest checkpoint)."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_intact(staging / "checkpoints", set_aside=main)
    path = Path(resume).expanduser()
    if (path / "manifest.json").is_file() and path.name.startswith("step-"):
        require_intact(path)
        return path
    found = complete(path / "checkpoints")
    if not found:
        raise InputError(f"--resume {resume}: neither a checkpoint folder (step-NNNNNN with a manifest) nor a "
                         f"train output holding finished checkpoints")
    require_intact(found[-1])
    return found[-1]


def newest_intact(root: Path, set_aside: bool = True) -> Path | None:
    """The newest finished checkpoint whose files match its manifest; a damaged newer one is renamed
    `<name>.damaged` (kept for inspection, never resumed; by the main rank) with a warning, and the next older
    one is tried."""
    for folder in reversed(complete(root)):
        problems = damage(folder)
        if not problems:
            return folder
        if not set_aside:
            continue
        aside = folder.with_name(folder.name + ".damaged")
        shutil.rmtree(aside, ignore_errors=True)
        folder.rename(aside)
        warn(f"{folder}: damaged ({problems[0]}); set aside as {aside.name}, resuming from an older checkpoint")
    return None


def differences(saved: dict, now: dict) -> list[str]:
    """What differs between a checkpoint's recorded math (config, world size, inputs) and this run's."""
    out = []
    for key in sorted(set(saved["config"]) | set(now["config"])):
        a, b = saved["config"].get(key), now["config"].get(key)
        if a != b:
            out.append(f"{key} {json.dumps(a)} -> {json.dumps(b)}")
    for name in sorted(set(saved["inputs"]) | set(now["inputs"])):
        a, b = saved["inputs"].get(name), now["inputs"].get(name)
        if a != b:
            out.append(f"{name} {str(a)[:16]} -> {str(b)[:16]}")
    return out


def check_resumable(folder: Path, now: dict, force: bool) -> dict:
    """The checkpoint's manifest, or a ConfigError naming what differs from this run (unless `force`)."""
    saved = read_manifest(folder)
    diff = differences(saved, now)
    if diff and not force:
        raise ConfigError(f"resuming {folder} with a config that changes the training: {'; '.join(diff)}. "
                          f"Pass --force-resume to resume anyway, or --resume never to start over")
    return saved


def save(root: Path, step: int, rank: int, main: bool, barrier: Callable[[], None], rank_state: dict,
         files: Callable[[Path], None], manifest: dict, keep: int) -> Path:
    """Write checkpoint `step`: each rank its RNG file, the main rank the rest and the manifest, then rename."""
    final = root / folder_name(step)
    tmp = root / (folder_name(step) + ".partial")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    save_file(rank_state["tensors"], str(tmp / f"rng-rank{rank}.safetensors"))
    (tmp / f"rng-rank{rank}.json").write_text(json.dumps(rank_state["json"]), encoding="utf-8")
    barrier()
    if main:
        files(tmp)
        write_manifest(tmp, manifest)
        if final.exists():
            shutil.rmtree(final)
        tmp.replace(final)
        for old in complete(root)[:-keep]:
            shutil.rmtree(old)
    barrier()
    return final


def rng_state(device: torch.device) -> dict:
    tensors = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(device)
    version, state, gauss = random.getstate()
    np_state = np.random.get_state()
    return {"tensors": tensors,
            "json": {"python": [version, list(state), gauss],
                     "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]),
                               float(np_state[4])]}}


def restore_rng(folder: Path, rank: int, device: torch.device) -> bool:
    """Set this rank's RNG states from the checkpoint; False when it has none for this rank."""
    path = folder / f"rng-rank{rank}.safetensors"
    if not path.is_file():
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["torch"])
    if device.type == "cuda" and "cuda" in tensors:
        torch.cuda.set_rng_state(tensors["cuda"], device)
    data = json.loads((folder / f"rng-rank{rank}.json").read_text(encoding="utf-8"))
    version, state, gauss = data["python"]
    random.setstate((version, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = data["numpy"]
    np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))
    return True


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise InputError(f"{path}: unreadable ({str(e)[:120]}); use another checkpoint") from None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); use another checkpoint") from None
