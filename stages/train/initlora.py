"""Starting a LoRA from an existing LoRA file: kohya (`lora_unet_…lora_down/lora_up/alpha`, + `dora_scale`), as
ComfyUI / A1111 load it, or peft / diffusers (`unet.….lora_A/lora_B`, alpha in `lora_adapter_metadata`).

The file must be the same LoRA shape as the one configured: the same rank, the same UNet modules (lora_preset),
DoRA or not; a mismatch is a one-line error naming both. A different alpha is allowed: lora_B is rescaled so the
update (alpha / rank)·B·A is the file's. Text-encoder weights in the file are left out (train trains the UNet).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from shared.core.errors import ConfigError, InputError
from shared.core.log import warn
from shared.formats import kohya
from shared.models.lora import LoraSpec, load_lora_state, lora_state


def _open(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for other files
        raise InputError(f"--init-lora {path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") \
            from None


def _modules(ours: dict) -> dict[str, dict[str, str]]:
    """{UNet module: {leaf kind: our key}} of the configured LoRA."""
    out: dict[str, dict[str, str]] = {}
    for key in ours:
        module, _, leaf = key.partition(".lora_")
        kind = "A" if leaf == "A.weight" else "B" if leaf == "B.weight" else "magnitude"
        out.setdefault(module, {})[kind] = key
    return out


def _check(path: Path, spec: LoraSpec, found: set[str], wanted: set[str], rank: int, dora: bool) -> None:
    if found != wanted:
        first = sorted(found ^ wanted)[0]
        raise ConfigError(f"--init-lora {path}: a LoRA on {len(found)} UNet modules, but lora_preset {spec.preset} "
                          f"trains {len(wanted)} (first difference: {first}); start from a LoRA of the same targets")
    if rank != spec.rank:
        raise ConfigError(f"--init-lora {path}: rank {rank}, but lora_rank is {spec.rank}; set --lora-rank {rank}")
    if dora != spec.dora:
        raise ConfigError(f"--init-lora {path}: {'a DoRA' if dora else 'a plain LoRA'}, but dora is "
                          f"{'on' if spec.dora else 'off'}; set --{'' if dora else 'no-'}dora")


def from_kohya(path: Path, tensors: dict, unet: Any, spec: LoraSpec, ours: dict) -> dict[str, torch.Tensor]:
    modules = _modules(ours)
    names = {kohya.module_name("unet", m, unet.config): m for m in modules}
    found = {k for k in kohya.modules(tensors) if k.startswith(kohya.PREFIX["unet"])}
    if len(found) < len(kohya.modules(tensors)):
        warn(f"--init-lora {path}: its text-encoder weights are left out (train trains the UNet)")
    rank = int(next(v for k, v in tensors.items() if k.endswith(".lora_down.weight")).shape[0])
    _check(path, spec, found, set(names), rank, any(k.endswith(".dora_scale") for k in tensors))
    state = {}
    for name, module in names.items():
        keys = modules[module]
        alpha = float(tensors[f"{name}.alpha"]) if f"{name}.alpha" in tensors else float(rank)
        state[keys["A"]] = tensors[f"{name}.lora_down.weight"].float()
        state[keys["B"]] = tensors[f"{name}.lora_up.weight"].float() * (alpha / spec.alpha)
        if "magnitude" in keys:
            state[keys["magnitude"]] = kohya.magnitude(tensors[f"{name}.dora_scale"].float()).reshape(
                ours[keys["magnitude"]].shape)
    return state


def from_peft(path: Path, tensors: dict, meta: dict, spec: LoraSpec, ours: dict) -> dict[str, torch.Tensor]:
    unet = {k[len("unet."):]: v for k, v in tensors.items() if k.startswith("unet.")}
    if len(unet) < len(tensors):
        warn(f"--init-lora {path}: its text-encoder weights are left out (train trains the UNet)")
    rank = int(next(v for k, v in unet.items() if k.endswith("lora_A.weight")).shape[0])
    try:
        alpha = float(json.loads(meta.get("lora_adapter_metadata", "{}")).get("unet.lora_alpha") or rank)
    except ValueError:
        alpha = float(rank)
    found = {k.partition(".lora_")[0] for k in unet}
    _check(path, spec, found, set(_modules(ours)), rank, any("magnitude" in k for k in unet))
    state = {}
    for key, value in unet.items():
        mine = key if key in ours else key.removesuffix(".weight")
        if mine not in ours:
            raise ConfigError(f"--init-lora {path}: weight {key} has no place in the configured LoRA")
        state[mine] = value.float() * (alpha / spec.alpha if ".lora_B." in key else 1.0)
    return state


def load(path: Path, unet: Any, spec: LoraSpec) -> None:
    """The file's LoRA into the configured (freshly initialised) adapter of `unet`."""
    tensors, meta = _open(path)
    ours = lora_state(unet)
    if any(k.startswith(("lora_unet_", "lora_te")) for k in tensors):
        state = from_kohya(path, tensors, unet, spec, ours)
    elif any(".lora_A." in k for k in tensors):
        state = from_peft(path, tensors, meta, spec, ours)
    else:
        raise InputError(f"--init-lora {path}: neither a kohya nor a peft LoRA file")
    for key, value in state.items():
        if value.shape != ours[key].shape:
            raise ConfigError(f"--init-lora {path}: {key} is {tuple(value.shape)} in the file, "
                              f"{tuple(ours[key].shape)} in the configured LoRA")
    load_lora_state(unet, {k: v.to(ours[k].device, ours[k].dtype) for k, v in state.items()})
