"""Train checkpoints, the artifact between train (writer) and export (reader): `checkpoints/step-NNNNNN/`.

A checkpoint folder is finished when its `manifest.json` (stage `train-checkpoint`, a `CheckpointManifest`)
exists; it is written last, after every other file, into `step-N.partial/`, which is then renamed. The manifest
records each file's size and sha256 (`files`), checked before a checkpoint is resumed or exported.

Every other file is one *part* of the training state, stored by `write_state` without pickle: a part whose state
is a flat {name: tensor} dict (the trained weights, their EMA) is `<part>.safetensors` with those names; any
other state (the optimizer's, the scheduler's, the RNGs') is `<part>.json`, its tensors moved into
`<part>.safetensors` and referenced from the JSON as {"$tensor": key}, tuples as {"$tuple": [...]} and dicts
with non-string keys as {"$items": [[key, value], ...]}, so `read_state` gives back what was saved.

Versions: 2 recorded file hashes; 3 stores every part by `write_state` (the LR scheduler, the gradient scaler
and the loop's progress as parts of their own; optimizer tensors keyed by their state path).
"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from shared.core import graph, integrity
from shared.core.errors import InputError
from shared.models.lora import LoraSpec

CHECKPOINT_STAGE = "train-checkpoint"
VERSION = 3
#: a training (train's output: `checkpoints/step-N/` of format VERSION, logs/, train's manifest), as the stage
#: graph knows it; its version is train's manifest version
TRAINING_VERSION = 1
CHECKPOINTS = graph.declare(graph.Format(
    "checkpoints", TRAINING_VERSION, "a training: checkpoints/step-NNNNNN/ (weights, optimizer, EMA...) and logs/",
    made_by="train"))
MANIFEST = "manifest.json"
NAME = re.compile(r"step-\d{6,}")  # not .partial (being written) nor .damaged (set aside)
REWRITE = "train again with `sdxl train --resume never` (an unfinished run is set aside, not deleted)"
TENSOR, TUPLE, ITEMS = "$tensor", "$tuple", "$items"


@dataclass(frozen=True)
class CheckpointManifest:
    """What a checkpoint is: written by train, read by train's resume and by export."""
    step: int                         # optimizer steps done
    epoch: int                        # the epoch the next step belongs to
    method: str                       # lora | full | vae (train --target vae: `vae.*` weights, the whole VAE)
    lora: LoraSpec | None             # the adapter's shape (method lora), else None
    model: str                        # the base model whose UNet was trained
    weights_dtype: str                # the UNet's dtype in training (LoRA weights are float32)
    config: dict = field(default_factory=dict)   # the training's fingerprinted config (flat keys)
    inputs: dict = field(default_factory=dict)   # {input name: fingerprint} (encode output, model, world)
    fingerprint: str = ""             # hash of config + inputs: which training this is a step of
    created: str = ""                 # ISO time of writing
    files: dict = field(default_factory=dict)    # {relative path: {"bytes", "sha256"}}, set by write_manifest

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["lora"] = self.lora.to_dict() if self.lora is not None else None
        return {**out, "stage": CHECKPOINT_STAGE, "version": VERSION}

    @classmethod
    def from_dict(cls, data: dict) -> "CheckpointManifest":
        """The record `to_dict` wrote (of this version); a ValueError naming what does not fit."""
        known = {f.name for f in fields(cls)}
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.name not in
                         ("config", "inputs", "fingerprint", "created", "files"))
        if missing:
            raise ValueError(f"the manifest lacks {', '.join(missing)}")
        values = {k: v for k, v in data.items() if k in known}
        values["lora"] = LoraSpec.from_dict(data["lora"]) if data["lora"] is not None else None
        record = cls(**values)
        if not isinstance(record.step, int) or not isinstance(record.files, dict):
            raise ValueError("step is not a number or files is not a table")
        return record


def folder_name(step: int) -> str:
    return f"step-{step:06d}"


def complete(root: Path) -> list[Path]:
    """Finished checkpoints under `root` (manifest present), oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and NAME.fullmatch(p.name) and (p / MANIFEST).is_file())


def _raw(folder: Path) -> dict | None:
    try:
        data = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("stage") == CHECKPOINT_STAGE else None


def is_checkpoint(folder: Path) -> bool:
    """Whether `folder` holds a train checkpoint's manifest (of any version)."""
    return _raw(folder) is not None


def read_manifest(folder: Path) -> CheckpointManifest:
    """A finished checkpoint's record, or one InputError line saying what it is not and how to rewrite it."""
    data = _raw(folder)
    if data is None:
        raise InputError(f"{folder}: not a finished checkpoint (no readable train-checkpoint {MANIFEST})")
    if data.get("version") != VERSION:
        raise InputError(f"{folder}: a train checkpoint of format version {data.get('version')}, which this "
                         f"version of sdxl cannot read (it reads {VERSION}); {REWRITE}")
    try:
        return CheckpointManifest.from_dict(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{folder}: unreadable checkpoint manifest ({e}); {REWRITE}") from None


def write_manifest(folder: Path, record: CheckpointManifest) -> None:
    """Finish a checkpoint folder whose files are all written: its manifest (this format version, with every
    file's size and sha256), written last and atomically."""
    from shared.core.artifacts import write_atomic

    files = {rel: {"bytes": r["bytes"], "sha256": r["sha256"]} for rel, r in integrity.record(folder)[0].items()
             if rel != MANIFEST}
    data = {**record.to_dict(), "files": files}
    write_atomic(Path(folder) / MANIFEST, json.dumps(data, indent=1) + "\n")


def damage(folder: Path) -> list[str]:
    """What in a finished checkpoint differs from its manifest's file record (empty: intact)."""
    try:
        files = read_manifest(folder).files
    except InputError as e:
        return [str(e)]
    if not files:
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


def require_intact(folder: Path) -> CheckpointManifest:
    """A finished checkpoint's record once every file checks out; an InputError naming the damage."""
    problems = damage(folder)
    if problems:
        raise InputError(f"{folder}: damaged checkpoint ({problems[0]}); use another checkpoint")
    return read_manifest(folder)


def _alone() -> None:
    """The barrier of a single process: nothing to wait for."""


def write(root: Path, record: CheckpointManifest, write_files: Callable[[Path], None], keep: int, *,
          each_rank: Callable[[Path], None] | None = None, main: bool = True,
          barrier: Callable[[], None] = _alone) -> Path:
    """Write checkpoint `record.step` under `root`: in `step-N.partial/` every rank its own files (`each_rank`),
    then the main rank the rest (`write_files`) and the manifest, last; the folder is renamed into place and all
    but the newest `keep` finished checkpoints are removed. Every rank calls this; `barrier` waits for all."""
    final = root / folder_name(record.step)
    tmp = final.with_name(final.name + ".partial")
    if main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    if each_rank is not None:
        each_rank(tmp)
    barrier()
    if main:
        write_files(tmp)
        write_manifest(tmp, record)
        if final.exists():
            _remove(final)
        tmp.replace(final)
        for old in complete(root)[:-keep] + sorted(root.glob("*" + REMOVING)):
            _remove(old)
    barrier()
    return final


REMOVING = ".removing"   # a checkpoint being deleted: renamed first, so a stop mid-delete leaves no partial step-N


def _remove(folder: Path) -> None:
    """Delete a checkpoint folder: renamed out of the checkpoints' name pattern first, then removed."""
    gone = folder if folder.name.endswith(REMOVING) else folder.with_name(folder.name + REMOVING)
    if gone != folder:
        shutil.rmtree(gone, ignore_errors=True)
        folder.replace(gone)
    shutil.rmtree(gone)


def write_state(folder: Path, name: str, state: Any, metadata: dict[str, str] | None = None) -> None:
    """Store one part's state_dict as `<name>.safetensors` and/or `<name>.json` (see the module's doc)."""
    import torch

    from shared.formats.tensorfile import save_file  # the same bytes every time, the umask's mode

    flat = isinstance(state, dict) and state and all(isinstance(k, str) and torch.is_tensor(v)
                                                      for k, v in state.items())
    tensors: dict = {}
    skeleton = None if flat else _split(state, "", tensors)
    if flat:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    if tensors:
        save_file(tensors, str(Path(folder) / f"{name}.safetensors"), metadata=metadata)
    if not flat:
        (Path(folder) / f"{name}.json").write_text(json.dumps(skeleton, indent=1, sort_keys=True) + "\n",
                                                   encoding="utf-8")


def read_state(folder: Path, name: str) -> Any:
    """The state `write_state` stored as `name` (None when the checkpoint has no such part)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    tensor_file, json_file = folder / f"{name}.safetensors", folder / f"{name}.json"
    try:
        tensors = load_file(str(tensor_file)) if tensor_file.is_file() else {}
        if not json_file.is_file():
            return tensors or None
        return _join(json.loads(json_file.read_text(encoding="utf-8")), tensors)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a damaged file
        raise InputError(f"{folder}: part {name!r} unreadable ({str(e)[:120]}); use another checkpoint") from None


def _split(value: Any, path: str, tensors: dict) -> Any:
    """`value` as JSON, its tensors moved into `tensors` under their path."""
    import torch

    here = lambda k: f"{path}/{k}" if path else str(k)  # noqa: E731
    if torch.is_tensor(value):
        tensors[path] = value.detach().cpu().contiguous()
        return {TENSOR: path}
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _split(v, here(k), tensors) for k, v in value.items()}
        if not all(isinstance(k, (str, int)) for k in value):
            raise TypeError(f"checkpoint state {path}: keys must be strings or integers")
        return {ITEMS: [[k, _split(v, here(k), tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        items = [_split(v, here(i), tensors) for i, v in enumerate(value)]
        return {TUPLE: items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"checkpoint state {path}: cannot store a {type(value).__name__}")


def _join(value: Any, tensors: dict) -> Any:
    """The inverse of `_split`."""
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if TENSOR in value:
        return tensors[value[TENSOR]]
    if TUPLE in value:
        return tuple(_join(v, tensors) for v in value[TUPLE])
    if ITEMS in value:
        return {k: _join(v, tensors) for k, v in value[ITEMS]}
    return {k: _join(v, tensors) for k, v in value.items()}
