"""The export formats: each one entry of the FORMATS registry (where it goes, how it is written, how it is loaded
back for verification and by `sdxl compare`, for which trained kinds it is the default, and how it holds a VAE
fine-tune), with the writers, and merging a LoRA into its base weights for the full-model ones. A new format is
one more `FORMATS.add(ExportFormat(...))`; build.py, vae.py, verify.py and compare.py iterate over the registry."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from shared.formats import kohya
from shared.models import loading as models
from shared.models import sgm
from shared.core.errors import ConfigError
from shared.core.log import warn
from shared.core.registry import Registry
from stages.export import verify
from stages.export.verify import VerificationError

if TYPE_CHECKING:
    from stages.export import Config

PEFT_FILE = "pytorch_lora_weights.safetensors"
PROVENANCE = kohya.PROVENANCE  # metadata key / file stem holding the pipeline's fingerprints


def torch_dtype(name: str) -> Any:
    import torch

    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


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
    from safetensors.torch import load_file

    from shared.formats.tensorfile import save_file  # sorted metadata (the same bytes every time), umask's mode

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

    if scale == 1.0:
        return
    for m in module.modules():
        if isinstance(m, BaseTunerLayer):
            if not hasattr(m, "scale_layer"):   # e.g. (IA)^3: a product, not an added update
                raise ConfigError(f"merge_scale {scale:g}: this adapter type ({type(m).__module__.split('.')[-2]}) "
                                  f"has no update to scale; merge it at 1")
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

    from shared.formats.tensorfile import save_file  # sorted metadata (the same bytes every time), umask's mode

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


def write_vae_single_file(vae: Any, path: Path, dtype: str, provenance: dict) -> None:
    """The VAE in the original layout (its config is written beside it by vae.build: `<out>/vae-config/`)."""
    from shared.formats.tensorfile import save_file

    state = {k: v.to(torch_dtype(dtype)).contiguous() for k, v in sgm.vae_state(vae).items()}
    save_file(state, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base/vae",
                                          PROVENANCE: json.dumps(provenance, sort_keys=True)})


def load_vae_single_file(path: Path, config: Path) -> Any:
    """The single file through diffusers' own loader (an independent check of sgm.vae_key), offline."""
    from diffusers import AutoencoderKL

    models.quiet_libraries()
    return AutoencoderKL.from_single_file(str(path), config=str(config), local_files_only=True)


def write_vae_diffusers(vae: Any, folder: Path, dtype: str, provenance: dict) -> None:
    """An AutoencoderKL folder (save_pretrained) in `dtype`; the VAE is left in float32."""
    import torch

    vae.to(torch_dtype(dtype)).save_pretrained(str(folder), safe_serialization=True)
    vae.to(torch.float32)
    (folder / f"{PROVENANCE}.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")


def load_vae_diffusers(folder: Path, config: Path) -> Any:
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)


# --- the registry ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VaeFormat:
    """How a format holds a VAE fine-tune (train --target vae)."""
    path: Callable[[Path, str], Path]                 # (out, name) -> where it goes
    write: Callable[[Any, Path, str, dict], None]     # (AutoencoderKL, path, dtype, provenance)
    load: Callable[[Path, Path], Any]                 # (path, the VAE's config folder) -> AutoencoderKL


@dataclass(frozen=True)
class ExportFormat:
    """A format users pick by name (`export --format ...`)."""
    name: str
    help: str
    kind: str                            # "lora": a LoRA file clients load onto the base; "model": the whole model
    path: Callable[[Path, str], Path]    # (out, name) -> where it goes inside the output folder
    write: Callable[[Any, Path], dict]   # (build.Job, path) -> what the manifest records of it beyond the file
    #: lora: load(pipe, path) puts it onto a base StableDiffusionXLPipeline; model: load(path, parts) -> an object
    #: with those parts (unet, text_encoder, ...) as attributes
    load: Callable[..., Any]
    default_for: tuple[str, ...] = ()    # trained kinds (lora, full, vae) it is written for without --format
    recognise: Callable[[list[str]], bool] | None = None   # a .safetensors's keys are of this format (compare)
    vae: VaeFormat | None = None         # how it holds a VAE fine-tune; None: it cannot
    adapters: tuple[str, ...] | None = None   # lora: the adapter types (ADAPTERS) it holds; None: every one


FORMATS: Registry[ExportFormat] = Registry("export format")


def _train_config(job: Any) -> dict:
    return job.ckpt.train.config if job.ckpt.train else {}


def _write_kohya(job: Any, path: Path) -> dict:
    write_kohya(path, job.weights, job.ckpt.spec.alpha, job.unet_config, job.info, job.provenance, job.cfg.dtype)
    return {"names": _kohya_names(job, path)}


def _kohya_names(job: Any, path: Path) -> dict:
    """The file's modules are exactly the trained ones (job.expected), and each is a module of real SDXL (full
    size: every name; a reduced model: its preset's names, checked against full-size SDXL)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        found = kohya.modules(f.keys())
    config = job.unet_config
    wanted = {kohya.module_name(c, m, config) for c, mods in job.expected.items() for m in mods}
    if found != wanted:
        raise VerificationError(f"{path.name}: holds {len(found)} modules, trained {len(wanted)} (first "
                                f"difference: {sorted(found ^ wanted)[0]})")
    unet = {n for n in found if n.startswith(kohya.PREFIX["unet"])}
    if kohya.is_full_size(config):
        problems = sorted(unet - set(kohya.full_size_names(job.ckpt.spec.preset)))
    else:
        problems = kohya.full_size_problems(job.ckpt.spec.preset)
    problems += sorted(found - unet - kohya.full_size_te_names())
    if problems:
        raise VerificationError(f"{path.name}: {len(problems)} names are not modules of full-size SDXL "
                                f"(first: {problems[0]})")
    return {"modules": len(found), "full_size_layout": "file" if kohya.is_full_size(config) else "preset"}


def _write_peft(job: Any, path: Path) -> dict:
    write_peft(path, job.weights, job.ckpt.spec.alpha, job.provenance, job.cfg.dtype)
    return {}


def _write_diffusers(job: Any, path: Path) -> dict:
    train = _train_config(job)
    write_diffusers(path, job.model, job.cfg.dtype, train.get("prediction"), train.get("schedule"), job.provenance)
    return {}


def _write_single_file(job: Any, path: Path) -> dict:
    write_single_file(path, job.model, job.cfg.dtype, job.info, job.provenance)
    return {}


for _entry in (
    ExportFormat("kohya", "kohya / SGM LoRA names with alphas and ss_* metadata (ComfyUI, A1111, Forge).", "lora",
                 lambda out, name: out / f"{name}.kohya.safetensors", _write_kohya, verify.load_kohya,
                 default_for=("lora",), adapters=("lora",),
                 recognise=lambda keys: any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_"))
                                            for k in keys)),
    ExportFormat("peft", "diffusers' pytorch_lora_weights.safetensors (load_lora_weights).", "lora",
                 lambda out, name: out / "peft" / PEFT_FILE, _write_peft, verify.load_peft, default_for=("lora",),
                 adapters=("lora",),
                 recognise=lambda keys: any(".lora_A." in k or ".lora_B." in k for k in keys)),
    ExportFormat("diffusers", "a diffusers pipeline folder (a LoRA merged in at merge_scale).", "model",
                 lambda out, name: out / "diffusers", _write_diffusers, verify.load_diffusers, default_for=("vae",),
                 vae=VaeFormat(lambda out, name: out / "vae", write_vae_diffusers, load_vae_diffusers)),
    ExportFormat("single-file", "one SGM-layout .safetensors checkpoint (a LoRA merged in at merge_scale).",
                 "model", lambda out, name: out / f"{name}.sdxl.safetensors", _write_single_file,
                 verify.load_single_file, default_for=("full", "vae"),
                 recognise=lambda keys: models.UNET_CONV_IN in keys,
                 vae=VaeFormat(lambda out, name: out / f"{name}.vae.safetensors", write_vae_single_file,
                               load_vae_single_file)),
):
    FORMATS.add(_entry)


def formats_for(cfg: Config, method: str, adapter: str = "lora") -> tuple[str, ...]:
    """The formats to write for a training of `method` (lora | full | vae; lora: of the adapter type `adapter`):
    the asked ones, else the formats whose entry is a default for it and can hold it; a format that cannot hold
    it is refused in one line."""
    usable = [e.name for e in FORMATS.entries() if _holds(e, method, adapter)]
    chosen = cfg.format or tuple(e.name for e in FORMATS.entries() if method in e.default_for and e.name in usable)
    wrong = [f for f in chosen if f not in usable]
    if wrong:
        what = {"lora": f"{adapter} adapter" if adapter != "lora" else "LoRA", "full": "full fine-tune",
                "vae": "VAE fine-tune"}[method]
        raise ConfigError(f"--format {wrong[0]} cannot hold {cfg.input}, a {what}; use --format "
                          f"{' or '.join(usable)}")
    if not chosen and method == "lora":   # no LoRA file holds this adapter type: it is merged into the model
        chosen = formats_for(cfg, "full")
        warn(f"no LoRA file format holds a {adapter} adapter: it is merged into the base model "
             f"({', '.join(chosen)}); choose with --format")
    return chosen


def _holds(entry: ExportFormat, method: str, adapter: str) -> bool:
    """Whether a format can hold a training of `method`: a LoRA file only an adapter of its types, a model
    format an adapter (merged) or a full fine-tune, and a VAE fine-tune where it has a VAE writer."""
    if method == "vae":
        return entry.vae is not None
    if entry.kind == "lora":
        return method == "lora" and (entry.adapters is None or adapter in entry.adapters)
    return True
