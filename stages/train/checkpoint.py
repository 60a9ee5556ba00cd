"""Checkpoints of the whole loop state, and where a run resumes from.

Every stateful part of training exposes `state_dict()` / `load_state_dict()` — the trained weights, their EMA,
AdamW, the LR schedule, the gradient scaler, the loop's progress (the data position: the data plan is a function
of the config, so the step is all it takes) and each rank's RNG states (the per-sample draws need none, see
step.py) — and `save` / `restore` store and load all of them, each as a part of the checkpoint folder
(shared/formats/checkpoints.py owns the format and the folder protocol). A new part is one more entry in the
loop's `parts`. The manifest records the fingerprinted config, world size and inputs, against which a resume is
checked.
"""
from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import numpy as np
import torch

from shared.core import artifacts
from shared.core.config import default_of, fingerprinted, to_plain
from shared.formats import checkpoints
# the folder contract is shared with export; re-exported here for the loop and the stage
from shared.formats.checkpoints import (CheckpointManifest, complete, damage, folder_name,  # noqa: F401
                                        read_manifest, require_intact)
from shared.core.errors import ConfigError, InputError
from shared.core.log import warn
from shared.core.config import opt

if TYPE_CHECKING:
    from stages.train.config import Config


@dataclass(frozen=True, kw_only=True)
class CheckpointConfig:
    """When checkpoints are written, how many are kept, and where a run starts: options of `sdxl train`
    (config.py composes them)."""
    checkpoint_every: int = opt(500, "Save a checkpoint every N optimizer steps (and always at the end).",
                                fingerprint=False, ge=1)
    checkpoint_epochs: bool = opt(False, "Also save a checkpoint at the end of every epoch.", fingerprint=False)
    keep_checkpoints: int = opt(3, "Keep the newest K checkpoints.", fingerprint=False, ge=1)
    resume: str = opt("auto", "auto (continue an unfinished run of this config from its newest checkpoint), "
                              "never (set an unfinished run aside and start over), or a checkpoint / train "
                              "output folder to start from.", fingerprint=False, nonempty=True)
    force_resume: bool = opt(False, "Resume even from a checkpoint made with a config that changes the training "
                                    "(the differences are printed).", fingerprint=False)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def resolve_resume(resume: str, staging: Path, main: bool = True) -> Path | None:
    """The checkpoint to start from: `auto` = the newest in this run's staging folder (None if there is none),
    `never` = None, else a checkpoint folder or a train output folder (its newest checkpoint)."""
    if resume == "never":
        return None
    if resume == "auto":
        return newest_intact(staging / "checkpoints", set_aside=main)
    path = Path(resume).expanduser()
    if checkpoints.is_checkpoint(path) and path.name.startswith("step-"):
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


def differences(saved: CheckpointManifest, config: dict, inputs: dict, allowed: tuple[str, ...] = (),
                defaults: dict | None = None) -> list[str]:
    """What differs between a checkpoint's recorded math (config, world size, inputs) and this run's, but for the
    `allowed` keys (the run's length: continuing to another length is an extension, not another training). A key
    that the checkpoint does not record (written by a version before that key existed) differs only when this
    run's value is not the key's default (`defaults`), the value that reproduces the training before it existed."""
    out = []
    defaults = defaults or {}
    for key in sorted((set(saved.config) | set(config)) - set(allowed)):
        a, b = saved.config.get(key), config.get(key)
        if key not in saved.config and key in defaults and b == defaults[key]:
            continue
        if a != b:
            out.append(f"{key} {json.dumps(a)} -> {json.dumps(b)}")
    for name in sorted(set(saved.inputs) | set(inputs)):
        a, b = saved.inputs.get(name), inputs.get(name)
        if a != b:
            out.append(f"{name} {str(a)[:16]} -> {str(b)[:16]}")
    return out


def check_resumable(folder: Path, config: dict, inputs: dict, force: bool,
                    allowed: tuple[str, ...] = (), defaults: dict | None = None) -> CheckpointManifest:
    """The checkpoint's record, or a ConfigError naming what differs from this run (unless `force`; `allowed`
    keys may differ; `defaults` as in `differences`)."""
    saved = read_manifest(folder)
    diff = differences(saved, config, inputs, allowed, defaults)
    if diff and not force:
        raise ConfigError(f"resuming {folder} with a config that changes the training: {'; '.join(diff)}. "
                          f"Pass --force-resume to resume anyway, or --resume never to start over")
    return saved


def save(root: Path, record: CheckpointManifest, parts: dict[str, Stateful], rank_parts: dict[str, Stateful],
         keep: int, metadata: dict[str, str], main: bool = True,
         barrier: Callable[[], None] = lambda: None) -> Path:
    """Checkpoint `record.step`: every rank its `rank_parts`, the main rank `parts` (tensor files carrying
    `metadata`) and the manifest; written as `.partial` and renamed, the newest `keep` kept."""
    return checkpoints.write(root, record, _writer(parts, metadata), keep, each_rank=_writer(rank_parts, None),
                             main=main, barrier=barrier)


def _writer(parts: dict[str, Stateful], metadata: dict[str, str] | None) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        for name, part in parts.items():
            checkpoints.write_state(folder, name, part.state_dict(), metadata)
    return write


def restore(folder: Path, parts: dict[str, Stateful]) -> list[str]:
    """Load every part from the checkpoint, in the order given; the names of those it holds no state of (left
    as they are). An empty saved state (a disabled scaler's) is not loaded."""
    missing = []
    for name, part in parts.items():
        state = checkpoints.read_state(folder, name)
        if state is None:
            missing.append(name)
        elif not (isinstance(state, dict) and not state):
            part.load_state_dict(state)
    return missing


class RNGState:
    """This process's global generators (torch CPU, CUDA of `device`, Python, NumPy) as a checkpoint part. Only
    LoRA dropout draws from them; every other draw has its own seeded generator."""

    def __init__(self, device: torch.device):
        self.device = device

    def state_dict(self) -> dict:
        version, state, gauss = random.getstate()
        name, keys, pos, has_gauss, cached = np.random.get_state()
        out = {"torch": torch.get_rng_state(), "python": [version, list(state), gauss],
               "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]}
        if self.device.type == "cuda":
            out["cuda"] = torch.cuda.get_rng_state(self.device)
        return out

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        if self.device.type == "cuda" and "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)
        version, keys, gauss = state["python"]
        random.setstate((version, tuple(keys), gauss))
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, np.asarray(keys, np.uint32), pos, has_gauss, cached))


def record(cfg: Config, inputs: dict) -> dict:
    """What a run's checkpoints record of it: its fingerprinted config and its inputs' fingerprints."""
    return {"config": fingerprinted(cfg), "inputs": {k: v["fingerprint"] for k, v in inputs.items()}}


#: keys whose absence from an older checkpoint stands for another value than today's default: what runs written
#: before the key existed did (a bucket's remainder was dropped)
BEFORE_THE_KEY = {"bucket_remainder": "drop"}


def config_defaults(config_class: type) -> dict:
    """What a fingerprinted key absent from an older checkpoint stands for, as the record holds values: its
    default, or what runs did before the key existed (BEFORE_THE_KEY)."""
    return {f.name: BEFORE_THE_KEY.get(f.name, to_plain(default_of(f))) for f in fields(config_class)
            if f.metadata.get("fingerprint", True)}


def run_manifest(cfg: Config, method: str, step: int, epoch: int, run_record: dict) -> CheckpointManifest:
    """The manifest of a run's checkpoint at `step` (what export reads: method lora | full | vae and the adapter's
    shape; what a resume compares: the fingerprinted config and inputs)."""
    return CheckpointManifest(step=step, epoch=epoch, method=method, lora=cfg.adapter if method == "lora" else None,
                              model=cfg.model, weights_dtype=cfg.weights_dtype, config=run_record["config"],
                              inputs=run_record["inputs"], fingerprint=artifacts.hash_json(run_record),
                              created=artifacts.now())


def save_run(root: Path, cfg: Config, manifest: CheckpointManifest, parts: dict[str, Stateful],
             rank_parts: dict[str, Stateful], sharded: bool, main: bool, barrier: Callable[[], None]) -> None:
    """Checkpoint a run: `manifest`, the parts (gathered from every process first when sharded) and each rank's
    own parts."""
    lora = manifest.lora
    metadata = {"format": "sdxl-stages", "method": manifest.method, "lora": lora.to_json() if lora else ""}
    if sharded:   # gathered by every process
        from stages.train import sharding

        parts = sharding.snapshots(parts)
    save(root, manifest, parts, rank_parts, cfg.checkpointing.keep_checkpoints, metadata, main, barrier)
