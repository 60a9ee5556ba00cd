"""Writers of the four export formats, and merging a LoRA into its base weights for the two full-model ones."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from shared.formats import kohya
from shared.models import sgm
from shared.core.log import warn

LORA_FORMATS = ("kohya", "peft")
MODEL_FORMATS = ("diffusers", "single-file")
FORMATS = LORA_FORMATS + MODEL_FORMATS
PEFT_FILE = "pytorch_lora_weights.safetensors"
PROVENANCE = kohya.PROVENANCE  # metadata key / file stem holding the pipeline's fingerprints


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def paths(out: Path, name: str) -> dict[str, Path]:
    """Where each format goes inside the output folder."""
    return {"kohya": out / f"{name}.kohya.safetensors", "peft": out / "peft" / PEFT_FILE,
            "diffusers": out / "diffusers", "single-file": out / f"{name}.sdxl.safetensors"}


def write_kohya(path: Path, states: dict[str, dict], alpha: float, unet_config: Any, info: dict,
                provenance: dict, dtype: str) -> None:
    """One kohya `.safetensors` (shared/formats/kohya.py's writer, which train also uses mid-run)."""
    kohya.write(path, states, alpha, unet_config, info, provenance, torch_dtype(dtype))


def _adapter_config(state: dict, alpha: float) -> dict:
    """peft's LoraConfig of a saved state (what diffusers reads back as `lora_adapter_metadata`)."""
    from peft import LoraConfig

    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=sorted({k.split(".lora_")[0] for k in state}),
                        use_dora=any("magnitude" in k for k in state)).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def write_peft(path: Path, states: dict[str, dict], alpha: float, provenance: dict, dtype: str) -> None:
    """diffusers' own LoRA file (`save_lora_weights`: `unet.…lora_A.weight` keys, the adapter config in the
    metadata so alpha and DoRA load back exactly), plus our provenance in its metadata."""
    from diffusers import StableDiffusionXLPipeline
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    cast = {c: {k: v.to(torch_dtype(dtype)).contiguous() for k, v in s.items()} for c, s in states.items()}
    kwargs = {}
    for component in cast:
        kwargs[f"{component}_lora_layers"] = cast[component]
        kwargs[f"{component}_lora_adapter_metadata"] = _adapter_config(states[component], alpha)
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(str(path.parent), weight_name=path.name, safe_serialization=True,
                                                **kwargs)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    meta[PROVENANCE] = json.dumps(provenance, sort_keys=True)
    save_file(load_file(str(path)), str(path), metadata=meta)


def merge_lora(module: Any, scale: float) -> None:
    """Fold every peft LoRA of `module` into its base weights (update scaled by `scale`, as diffusers'
    `fuse_lora(lora_scale=…)`), then put the plain base layers back in place of peft's wrappers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuned = [(name, m) for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)]
    for name, layer in tuned:
        if scale != 1.0:
            layer.scale_layer(scale)
        layer.merge(safe_merge=True)
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, layer.get_base_layer())
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in vars(module):
            delattr(module, attr)


def scale_lora(module: Any, scale: float) -> None:
    """Multiply every LoRA update of `module` by `scale` (unmerged), as merge_lora will."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            m.scale_layer(scale)


def scheduler_for(scheduler: Any, prediction: str | None, schedule: str | None) -> Any:
    """The base scheduler, told the trained prediction type and zero-terminal-SNR schedule."""
    changes: dict = {}
    if prediction == "v_prediction":
        changes.update(prediction_type="v_prediction")
    if schedule in ("ztsnr", "novelai"):
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if prediction == "flow":
        warn("the diffusers scheduler config cannot express rectified-flow prediction; it is left as the base "
             "model's (sample with a flow-matching sampler)")
    return type(scheduler).from_config(scheduler.config, **changes) if changes else scheduler


def write_diffusers(folder: Path, model: Any, dtype: str, prediction: str | None, schedule: str | None,
                    provenance: dict) -> None:
    """A complete diffusers SDXL folder (`save_pretrained`, safetensors) in `dtype`."""
    from diffusers import StableDiffusionXLPipeline

    parts = {p: getattr(model, p) for p in ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
                                            "unet")}
    pipe = StableDiffusionXLPipeline(scheduler=scheduler_for(model.scheduler, prediction, schedule), **parts)
    pipe.to(dtype=torch_dtype(dtype))
    pipe.save_pretrained(str(folder), safe_serialization=True)
    (folder / f"{PROVENANCE}.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def write_single_file(path: Path, model: Any, dtype: str, info: dict, provenance: dict) -> None:
    """One SGM-layout SDXL checkpoint (shared.models.sgm), with the markers ComfyUI reads for v-prediction
    (`v_pred`) and zero terminal SNR (`ztsnr`), and modelspec metadata."""
    import torch
    from safetensors.torch import save_file

    state = sgm.to_sgm(model.unet, model.vae, model.text_encoder, model.text_encoder_2, torch_dtype(dtype))
    if info.get("prediction") == "v_prediction":
        state["v_pred"] = torch.tensor([])
        if info.get("schedule") in ("ztsnr", "novelai"):
            state["ztsnr"] = torch.tensor([])
    w, h = info.get("resolution") or (1024, 1024)
    meta = {"modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-xl-v1-base",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
            "modelspec.title": info.get("name", path.stem), "modelspec.resolution": f"{w}x{h}",
            "modelspec.prediction_type": "v" if info.get("prediction") == "v_prediction" else "epsilon",
            PROVENANCE: json.dumps(provenance, sort_keys=True)}
    save_file(state, str(path), metadata=meta)
