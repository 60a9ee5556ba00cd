"""Usable files mid-run: with each checkpoint, the kohya LoRA file ComfyUI / A1111 / Forge load, written beside
the checkpoints as `<out>/loras/<out name>-step-NNNNNN.safetensors` (and `…-ema` from the EMA weights when EMA is
on) by the writer export uses (shared/formats/kohya.py), with the same metadata and provenance. They are not
part of the fingerprinted result (`sdxl export` still makes the verified files)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.core import artifacts
from shared.formats import kohya

if TYPE_CHECKING:
    from stages.train.config import Config

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def states(weights: dict[str, torch.Tensor]) -> dict[str, dict]:
    """`unet.`-prefixed trained weights split by component, as export reads a checkpoint."""
    out: dict[str, dict] = {}
    for key, value in weights.items():
        component, _, rest = key.partition(".")
        out.setdefault(component, {})[rest] = value.detach().float().cpu()
    return out


def write(folder: Path, stem: str, weights: dict[str, torch.Tensor], spec: Any, unet_config: Any, info: dict,
          provenance: dict, dtype: str) -> Path:
    """One kohya file of `weights`; returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{stem}.safetensors"
    partial = path.with_name(path.name + ".partial")
    kohya.write(partial, states(weights), spec.alpha, unet_config, {**info, "name": stem}, provenance, DTYPES[dtype])
    partial.replace(path)
    return path


def metadata(config: dict, inputs: dict, extras: dict, *, step: int, epoch: int, spec: Any, base: str,
             comment: str, fingerprint: str, objective: dict, weights: str) -> tuple[dict, dict]:
    """(training info, provenance) of a file written at `step`, as export would record them."""
    info = kohya.training_info(config, extras, step=step, epoch=epoch, spec=spec, base=base, name="",
                               comment=comment or None, finished=None)
    prov = kohya.provenance(version=artifacts.PACKAGE_VERSION, base=base, train_fingerprint=None,
                            inputs={k: {"fingerprint": v} for k, v in inputs.items()}, weights=weights, step=step,
                            checkpoint_fingerprint=fingerprint, objective=objective)
    return info, prov


def write_step(folder: Path, cfg: Config, record: Any, run_record: dict, weights: Any, ema: Any, extras: dict,
               unet_config: Any) -> None:
    """The kohya LoRA file of the live weights (and of the EMA) beside the checkpoint `record` just saved, named
    `<out name>-step-NNNNNN[-ema]`."""
    from stages.train.targets import sampling_objective

    parts = [("", weights, f"step-{record.step:06d}")] + ([("-ema", ema, "ema")] if ema else [])
    for suffix, part, kind in parts:
        info, prov = metadata(run_record["config"], run_record["inputs"], extras, step=record.step,
                              epoch=record.epoch, spec=cfg.adapter, base=cfg.model, comment=cfg.comment,
                              fingerprint=record.fingerprint, objective=sampling_objective(cfg).to_dict(),
                              weights=kind)
        write(folder, f"{cfg.output.name}-step-{record.step:06d}{suffix}", part.state_dict(), cfg.adapter,
              unet_config, info, prov, cfg.lora_file_dtype)
