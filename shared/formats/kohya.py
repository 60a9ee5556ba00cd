"""Kohya LoRA files (what ComfyUI, A1111 and Forge load): module names, tensors, `ss_*` metadata, hashes.

Names: `lora_unet_<SGM module path, '.' -> '_'>` (the SGM path from `shared.models.sgm.unet_key`, so the block
indices follow the UNet's own layout), `lora_te1_…` / `lora_te2_…` with the Hugging Face CLIP module path
including `text_model.` (transformers 5 drops that prefix inside CLIPTextModel; files keep it). Per module:
`lora_down.weight` (peft's `lora_A`), `lora_up.weight` (`lora_B`), `alpha` (a float32 scalar; the update is
scaled by alpha / rank) and, with DoRA, `dora_scale`: peft's magnitude as an output-axis column, [out, 1] for a
Linear and [out, 1, 1, 1] for a Conv2d. That is LyCORIS's layout for `wd_on_out` (its default), which ComfyUI
and Forge recognise by `dora_scale.shape[0] == out_features`. Interoperability notes on DoRA: diffusers'
SDXL loader drops `dora_scale` from kohya files (it loads the peft export fully), and ComfyUI releases
before PR #15458 normalise output-axis DoRA by |W| instead of |W + ΔW|.

Metadata follows kohya's `train_network.py` (all values strings), with the hashes sd-webui-additional-networks
reads (`sshs_model_hash`: sha256 of the tensor bytes as saved with only the `ss_*` metadata;
`sshs_legacy_hash`: the first 8 hex of sha256 of bytes 0x100000..0x110000 of that same serialisation).
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from typing import Any

from shared.core import artifacts
from shared.formats.tensorfile import canonical_bytes, save_file
from shared.models import sgm

PROVENANCE = "sdxl_stages"  # metadata key / file stem holding the pipeline's fingerprints
PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
BASE_MODEL_VERSION = "sdxl_base_v1-0"  # what kohya's sdxl_train_util writes for SDXL
ARCHITECTURE = "stable-diffusion-xl-v1-base/lora"


def module_name(component: str, module: str, unet_config: Any = None) -> str:
    """The kohya name of a diffusers UNet module or a Hugging Face CLIP text-encoder module."""
    if component == "unet":
        path = sgm.unet_key(module + ".weight", unet_config)[: -len(".weight")]
    elif component in ("text_encoder", "text_encoder_2"):
        path = module if module.startswith(("text_model.", "text_projection")) else "text_model." + module
    else:
        raise KeyError(f"no kohya prefix for component {component}")
    return PREFIX[component] + path.replace(".", "_")


def dora_scale(magnitude: Any) -> Any:
    """peft's DoRA magnitude ([out] for Linear, [1, out, 1, 1] for Conv2d) as kohya's `dora_scale` column."""
    extra = 3 if magnitude.dim() == 4 else 1
    return magnitude.reshape(magnitude.numel(), *([1] * extra))


def magnitude(scale: Any) -> Any:
    """The inverse of `dora_scale`: peft's magnitude shape."""
    return scale.reshape(1, -1, 1, 1) if scale.dim() == 4 else scale.reshape(-1)


def to_kohya(states: dict[str, dict], alpha: float, unet_config: Any, dtype: Any = None) -> dict:
    """Kohya tensors from peft state dicts per component ({"unet": {...lora_A.weight: …}, "text_encoder": …})."""
    import torch

    out = {}
    for component, state in states.items():
        for key, value in state.items():
            module, sep, leaf = key.partition(".lora_")
            if not sep:
                raise KeyError(f"not a LoRA weight: {component}.{key}")
            name = module_name(component, module, unet_config)
            value = value.detach().to(dtype) if dtype is not None else value.detach()
            if leaf == "A.weight":
                out[f"{name}.lora_down.weight"] = value.contiguous()
                out[f"{name}.alpha"] = torch.tensor(float(alpha), dtype=torch.float32)
            elif leaf == "B.weight":
                out[f"{name}.lora_up.weight"] = value.contiguous()
            elif leaf in ("magnitude_vector", "magnitude_vector.weight"):
                out[f"{name}.dora_scale"] = dora_scale(value).contiguous()
            else:
                raise KeyError(f"no kohya name for LoRA weight {component}.{key}")
    return out


def modules(tensors: dict) -> set[str]:
    """The module names of a kohya state dict (keys up to the first dot)."""
    return {k.split(".", 1)[0] for k in tensors}


def network_args(preset: str, rank: int, alpha: float, dora: bool) -> dict:
    """kohya's `--network_args` for what was trained: conv LoRA as LoCon (conv_dim/conv_alpha), DoRA as
    LyCORIS's weight decomposition on the output axis."""
    args: dict = {}
    if dora:
        args.update(algo="lora", dora_wd="True", wd_on_out="True")
    if preset == "attn+conv":
        args.update(conv_dim=str(rank), conv_alpha=str(float(alpha)))
    return args


def _epoch_seconds(iso: str | None) -> str | None:
    try:
        return str(_dt.datetime.fromisoformat(iso).timestamp()) if iso else None
    except ValueError:
        return None


def _date(finished: str | None) -> str:
    """modelspec.date: SOURCE_DATE_EPOCH when set (reproducible builds), else when the training finished, else
    now (a LoRA written mid-training); so exporting one training twice gives the same bytes."""
    if os.environ.get("SOURCE_DATE_EPOCH") or not finished:
        return artifacts.now()
    return finished


def metadata(info: dict) -> dict[str, str]:
    """`ss_*` and `modelspec.*` metadata as kohya writes it, from what the training recorded (`info` keys:
    name, rank, alpha, dropout, preset, dora, base_model, resolution [w, h], steps, epoch, max_steps,
    learning_rate, batch_size, seed, prediction, schedule, min_snr_gamma, noise_offset, tag_frequency,
    buckets [[w, h, count]], comment, finished (ISO time)); missing values are left out."""
    w, h = info.get("resolution") or (1024, 1024)
    v_pred = info.get("prediction") == "v_prediction"
    meta = {
        "ss_output_name": info.get("name"), "ss_network_module": "lycoris.kohya" if info.get("dora") else
        "networks.lora", "ss_network_dim": info.get("rank"), "ss_network_alpha": float(info.get("alpha", 0)),
        "ss_network_dropout": info.get("dropout"), "ss_base_model_version": BASE_MODEL_VERSION,
        "ss_sd_model_name": info.get("base_model"), "ss_v2": False, "ss_v_parameterization": v_pred,
        "ss_zero_terminal_snr": info.get("schedule") in ("ztsnr", "novelai"), "ss_resolution": f"({w}, {h})",
        "ss_steps": info.get("steps"), "ss_epoch": info.get("epoch"), "ss_max_train_steps": info.get("max_steps"),
        "ss_learning_rate": info.get("learning_rate"),
        "ss_unet_lr": info.get("adapter_lr") or info.get("learning_rate"),
        "ss_text_encoder_lr": (info.get("text_encoder_lr") or info.get("learning_rate"))
        if info.get("train_text_encoder") not in (None, "none") else None,
        "ss_network_train_unet_only": info.get("train_text_encoder") in (None, "none"),
        "ss_batch_size_per_device": info.get("batch_size"), "ss_seed": info.get("seed"),
        "ss_min_snr_gamma": info.get("min_snr_gamma"), "ss_noise_offset": info.get("noise_offset"),
        "ss_training_comment": info.get("comment") or None,
        "ss_training_finished_at": _epoch_seconds(info.get("finished")),
        "ss_tag_frequency": json.dumps({"dataset": info["tag_frequency"]}, ensure_ascii=False)
        if info.get("tag_frequency") else None,
        "ss_bucket_info": json.dumps({"buckets": {str(i): {"resolution": [bw, bh], "count": n}
                                                  for i, (bw, bh, n) in enumerate(info["buckets"])}})
        if info.get("buckets") else None,
        "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": ARCHITECTURE,
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": info.get("name"), "modelspec.resolution": f"{w}x{h}",
        "modelspec.prediction_type": "v" if v_pred else "epsilon",
        "modelspec.date": _date(info.get("finished")),
    }
    args = network_args(info.get("preset", "attn"), info.get("rank", 0), info.get("alpha", 0), info.get("dora", False))
    if args:
        meta["ss_network_args"] = json.dumps(args)
    return {k: str(v) for k, v in meta.items() if v is not None}


def training_info(config: dict, extra: dict, *, step: int, epoch: int | None, spec: Any, base: str, name: str,
                  comment: str | None, finished: str | None) -> dict:
    """What `metadata` records, from a training's config and manifest extras (or, mid-run, what train knows):
    used by export and by train's LoRA files written beside its checkpoints."""
    from pathlib import Path

    lora = {"rank": spec.rank, "alpha": spec.alpha, "dropout": spec.dropout, "preset": spec.preset,
            "dora": spec.dora} if spec else {}
    return {**lora, "name": name, "base_model": base if base.startswith("builtin:") else Path(base).name,
            "resolution": extra.get("resolution"), "steps": step, "epoch": epoch,
            "tag_frequency": extra.get("tag_frequency"), "buckets": extra.get("buckets"), "comment": comment,
            "finished": finished,
            **{k: config.get(k) for k in ("max_steps", "learning_rate", "batch_size", "seed", "prediction",
                                          "schedule", "min_snr_gamma", "noise_offset", "adapter_lr",
                                          "text_encoder_lr", "train_text_encoder")}}


def provenance(*, version: str, base: str, train_fingerprint: str | None, inputs: dict, weights: str, step: int,
               checkpoint_fingerprint: str | None, objective: dict) -> dict:
    """Our fingerprints in an exported file's metadata: the package, base model, training, its encode and model
    inputs, the checkpoint, and the trained objective (how compare picks the sampler)."""
    return {"exported_by": f"sdxl-stages {version}", "base_model": base, "train_fingerprint": train_fingerprint,
            "encode_fingerprint": (inputs.get("encode") or {}).get("fingerprint"),
            "model_fingerprint": (inputs.get("model") or {}).get("fingerprint"),
            "checkpoint": {"weights": weights, "step": step, "fingerprint": checkpoint_fingerprint},
            "objective": objective}


def write(path: Any, states: dict[str, dict], alpha: float, unet_config: Any, info: dict, provenance: dict,
          dtype: Any) -> None:
    """One kohya `.safetensors`: SGM names, lora_down/lora_up/alpha (+ dora_scale), `ss_*` metadata and our
    provenance; `dtype` a torch dtype."""
    tensors = to_kohya(states, alpha, unet_config, dtype)
    meta = metadata(info)
    meta[PROVENANCE] = json.dumps(provenance, sort_keys=True)
    save(tensors, meta, path)


def hashes(tensors: dict, meta: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as kohya precalculates them for sd-webui-additional-networks."""
    from safetensors.torch import save

    blob = canonical_bytes(save(tensors, {k: v for k, v in meta.items() if k.startswith("ss_")}))
    header = int.from_bytes(blob[:8], "little")
    return (hashlib.sha256(blob[8 + header:]).hexdigest(),
            hashlib.sha256(blob[0x100000:0x110000]).hexdigest()[:8])


def save(tensors: dict, meta: dict[str, str], path: Any) -> None:
    """Write a kohya LoRA file with its metadata (in sorted order, see shared/formats/tensorfile.py) and the two
    sd-webui hashes."""
    model_hash, legacy_hash = hashes(tensors, meta)
    save_file(tensors, str(path), metadata={**meta, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash})


def diffusers_modules(kohya_modules: set[str], unet_config: Any) -> dict[str, str]:
    """How diffusers' own kohya converter names each `lora_unet_*` module: {kohya name: UNet module name}.
    Modules it cannot place are missing from the result."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_unet_state_dict_to_peft

    out = {}
    for name in sorted(n for n in kohya_modules if n.startswith(PREFIX["unet"])):
        fake = {f"{name}.lora_down.weight": torch.zeros(1, 1), f"{name}.lora_up.weight": torch.zeros(1, 1),
                f"{name}.alpha": torch.tensor(1.0)}
        try:
            state, _ = StableDiffusionXLPipeline.lora_state_dict(fake, unet_config=unet_config)
        except (ValueError, KeyError, IndexError):
            continue
        peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
        found = {k.split(".lora_A.")[0] for k in peft if ".lora_A." in k}
        if len(found) == 1:
            out[name] = found.pop()
    return out


def full_size_names(preset: str) -> dict[str, str]:
    """{kohya name: diffusers module} of `preset` applied to the full-size SDXL 1.0 UNet (built on the meta
    device, no weights): the names a LoRA of real SDXL carries."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from shared.models.lora import target_modules
    from shared.models.loading import quiet_libraries, sdxl_configs

    quiet_libraries()
    with init_empty_weights():
        unet = UNet2DConditionModel(**sdxl_configs()["unet"])
    return {module_name("unet", m, unet.config): m for m in target_modules(unet, preset)}


def full_size_problems(preset: str) -> list[str]:
    """Names of `preset` on full-size SDXL that diffusers' converter does not map back to the same module."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    from shared.models.loading import sdxl_configs

    names = full_size_names(preset)
    with init_empty_weights():
        config = UNet2DConditionModel(**sdxl_configs()["unet"]).config
    decoded = diffusers_modules(set(names), config)
    return [f"{k} -> {decoded.get(k)} (expected {v})" for k, v in sorted(names.items()) if decoded.get(k) != v]


def full_size_te_names() -> set[str]:
    """Kohya names of every Linear of SDXL 1.0's two text encoders (meta device): where `lora_te1_` /
    `lora_te2_` keys must point."""
    import torch
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from shared.models.loading import sdxl_configs

    configs = sdxl_configs()
    names = set()
    with init_empty_weights():
        for component, cls in (("text_encoder", CLIPTextModel), ("text_encoder_2", CLIPTextModelWithProjection)):
            model = cls(CLIPTextConfig(**configs[component]))
            names |= {module_name(component, n) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return names


def is_full_size(unet_config: Any) -> bool:
    """Whether a UNet config has SDXL 1.0's block layout (so its SGM names are real SDXL's)."""
    from shared.models.loading import sdxl_configs

    full = sdxl_configs()["unet"]
    return all(_plain(unet_config[k]) == _plain(full[k]) for k in
               ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                "transformer_layers_per_block"))


def _plain(value: Any) -> Any:
    return tuple(value) if isinstance(value, (list, tuple)) else value
