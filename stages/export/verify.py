"""Each written file loaded back through diffusers' own loaders, its outputs compared with the trained model's.

Probe: fixed seeded inputs (a 32x32 latent, timestep 500, random `encoder_hidden_states`, `text_embeds` and
SDXL `time_ids` for the UNet; random token ids for the text encoders; an 8x8 latent for the VAE decoder).
Everything runs in float32 (TF32 off). The reference is the trained model with its weights rounded to the
written dtype, i.e. exactly what the file should hold, so one tolerance serves every dtype: a file passes when
each output's largest |Δ| is within `tolerance` x max(1, largest |output|). What the rounding itself changed
(against the unrounded trained model) is measured and recorded beside it, not judged.
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from shared.formats import kohya
from shared.models import loading as models
from shared.models.lora import is_adapter_parameter
from shared.core.errors import PipelineError

TOLERANCE = 1e-3  # default; relative to max(1, largest |output|)
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
LOADER_PARTS = ("unet", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")


class VerificationError(PipelineError):
    """A written file does not reproduce the trained model when loaded back."""


@contextmanager
def exact_math() -> Iterator[None]:
    """float32 matmuls and convolutions without TF32, so that equal weights give (nearly) equal outputs."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def probe(unet_config: Any, seed: int = 0) -> dict:
    """Fixed inputs for a UNet of this config and for the text encoders."""
    import torch

    g = torch.Generator().manual_seed(seed)
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    return {"sample": torch.randn(1, unet_config.in_channels, 32, 32, generator=g),
            "timestep": torch.tensor([500]),
            "encoder_hidden_states": torch.randn(1, 77, unet_config.cross_attention_dim, generator=g),
            "text_embeds": torch.randn(1, pooled, generator=g),
            "time_ids": torch.tensor([[256.0, 256.0, 0.0, 0.0, 256.0, 256.0]]),
            "input_ids": torch.randint(0, 49407, (1, 77), generator=g),
            "latent": torch.randn(1, unet_config.out_channels, 8, 8, generator=g)}


def outputs(parts: dict[str, Any], inputs: dict, device: str) -> dict:
    """Probe outputs (CPU, float32) of the given modules: the UNet's prediction, each text encoder's
    penultimate hidden states (plus the second one's pooled projection), the VAE's decoded image."""
    import torch

    out = {}
    with torch.no_grad():
        for name, module in parts.items():
            module.to(device=device, dtype=torch.float32)
            x = {k: v.to(device) for k, v in inputs.items()}
            if name == "vae":
                out[name] = module.decode(x["latent"]).sample.cpu()
            elif name == "unet":
                cond = {"text_embeds": x["text_embeds"], "time_ids": x["time_ids"]}
                out[name] = module(x["sample"], x["timestep"], encoder_hidden_states=x["encoder_hidden_states"],
                                   added_cond_kwargs=cond).sample.cpu()
            else:
                result = module(x["input_ids"], output_hidden_states=True)
                out[name] = result.hidden_states[-2].cpu()
                if getattr(result, "text_embeds", None) is not None:
                    out[name + ".pooled"] = result.text_embeds.cpu()
    return out


def _round(module: Any, dtype: Any, lora_only: bool) -> dict:
    """Round the module's floating weights (or only its LoRA weights) to `dtype`, in place, keeping float32
    storage; returns the originals. Weights that overflow `dtype` are an error naming them."""
    import torch

    saved = {}
    for name, p in module.named_parameters():
        if not p.is_floating_point() or (lora_only and not is_adapter_parameter(name)):
            continue
        rounded = p.data.to(dtype).to(p.dtype)
        if not bool(rounded.isfinite().all()):
            raise VerificationError(f"weight {name} overflows {str(dtype).removeprefix('torch.')}; export with "
                                    f"--dtype bfloat16 or float32")
        saved[name] = p.data
        p.data = rounded
    return saved


@contextmanager
def rounded(parts: dict[str, Any], dtype: Any) -> Iterator[None]:
    """The parts' LoRA weights rounded to `dtype` while inside (what a LoRA file of that dtype holds)."""
    saved = {name: _round(module, dtype, lora_only=True) for name, module in parts.items()}
    try:
        yield
    finally:
        for name, originals in saved.items():
            params = dict(parts[name].named_parameters())
            for key, value in originals.items():
                params[key].data = value


def round_weights(parts: dict[str, Any], dtype: Any) -> None:
    """Round every weight of the parts to `dtype` for good (what a full-model file of that dtype holds)."""
    for module in parts.values():
        _round(module, dtype, lora_only=False)


def difference(got: dict, ref: dict) -> tuple[float, float, str]:
    """(largest |Δ|, that |Δ| relative to max(1, largest |output|), which output) over the reference's outputs."""
    worst = (0.0, 0.0, "")
    for key, expected in ref.items():
        if key not in got:
            return float("inf"), float("inf"), key
        diff = (got[key] - expected).abs()
        value = float(diff.max()) if bool(diff.isfinite().all()) else float("inf")
        relative = value / max(1.0, float(expected.abs().max()))
        if relative >= worst[1]:
            worst = (value, relative, key)
    return worst


def compare(label: str, got: dict, ref: dict, tolerance: float) -> float:
    """The largest |Δ| of `got` against `ref`; a VerificationError naming it when beyond `tolerance`."""
    value, relative, where = difference(got, ref)
    if relative > tolerance:
        raise VerificationError(f"{label}: its {where} output differs from the trained model's by {value:.3g} "
                                f"(relative {relative:.3g} > tolerance {tolerance:g}); the file does not hold "
                                f"what was trained (--no-verify keeps it unchecked)")
    return value


def lora_modules(module: Any) -> set[str]:
    """Names of the modules that carry a LoRA (peft tuner layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return {name for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}


@contextmanager
def loader_warnings() -> Iterator[list[str]]:
    """Collect what diffusers warns while loading (unexpected or missing keys, dropped tensors)."""
    import diffusers

    records: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record.getMessage())

    logger = logging.getLogger("diffusers")
    handler, level = Collect(logging.WARNING), diffusers.utils.logging.get_verbosity()
    printed = {h: h.level for h in logger.handlers}
    for h in printed:
        h.setLevel(logging.ERROR)  # collected here instead of printed
    diffusers.utils.logging.set_verbosity_warning()
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        diffusers.utils.logging.set_verbosity(level)
        for h, old in printed.items():
            h.setLevel(old)


def base_pipeline(spec: str) -> Any:
    """The base model as a float32 StableDiffusionXLPipeline without VAE, for loading LoRA files into."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    model = models.load_model(spec, LOADER_PARTS, dtype=torch.float32)
    return StableDiffusionXLPipeline(vae=None, **{p: getattr(model, p) for p in LOADER_PARTS})


def load_kohya(pipe: Any, path: Path) -> None:
    """A kohya file into `pipe`. With DoRA, diffusers' `load_lora_weights` drops `dora_scale`; the file then
    goes through diffusers' own kohya converter (which maps `dora_scale` to peft's magnitude) and loaders."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    if not any(k.endswith(".dora_scale") for k in tensors):
        pipe.load_lora_weights(str(path))
        return
    try:
        from diffusers.loaders.lora_conversion_utils import (_convert_non_diffusers_lora_to_diffusers,
                                                             _maybe_map_sgm_blocks_to_diffusers)
    except ImportError:
        raise VerificationError(f"{path.name}: this diffusers version has no kohya DoRA converter to check it "
                                f"with; export --format peft, or --no-verify") from None

    state = _maybe_map_sgm_blocks_to_diffusers(tensors, pipe.unet.config)
    state, alphas = _convert_non_diffusers_lora_to_diffusers(state)
    state = {k: (kohya.magnitude(v) if "lora_magnitude_vector" in k else v) for k, v in state.items()}
    pipe.load_lora_into_unet(state, network_alphas=alphas, unet=pipe.unet, _pipeline=pipe)
    for name in TEXT_ENCODERS:
        if any(k.startswith(name + ".") for k in state):
            pipe.load_lora_into_text_encoder(state, network_alphas=alphas, text_encoder=getattr(pipe, name),
                                             prefix=name, _pipeline=pipe)


def load_peft(pipe: Any, path: Path) -> None:
    """diffusers' own LoRA file into the pipeline."""
    pipe.load_lora_weights(str(path.parent), weight_name=path.name)


def verify_lora(pipe: Any, path: Path, load: Any, expected: dict[str, set[str]], inputs: dict, ref: dict,
                tolerance: float, device: str) -> float:
    """Load a LoRA file into the base pipeline with its format's loader (`load(pipe, path)`, as diffusers does);
    every trained module must get its LoRA and no other, nothing may be reported unexpected, missing or dropped,
    and outputs must match."""
    with loader_warnings() as warned:
        try:
            load(pipe, path)
        except (ValueError, KeyError, RuntimeError) as e:
            raise VerificationError(f"{path.name}: diffusers cannot load it ({str(e).splitlines()[0][:200]})") \
                from None
    try:
        problems = [w.splitlines()[0][:200] for w in warned if not w.startswith("No LoRA keys associated")]
        if problems:
            raise VerificationError(f"{path.name}: diffusers reported while loading it: {problems[0]}")
        for component in ("unet", *TEXT_ENCODERS):
            loaded, wanted = lora_modules(getattr(pipe, component)), expected.get(component, set())
            if loaded != wanted:
                odd = sorted(loaded ^ wanted)[0]
                raise VerificationError(f"{path.name}: loaded {len(loaded)} {component} LoRA modules, trained "
                                        f"{len(wanted)} (first difference: {odd})")
        got = outputs({k: getattr(pipe, k) for k in ref if "." not in k}, inputs, device)
    finally:
        pipe.unload_lora_weights()
    return compare(path.name, got, ref, tolerance)


def load_diffusers(folder: Path, parts: tuple[str, ...]) -> Any:
    """A diffusers folder through `StableDiffusionXLPipeline.from_pretrained` (offline; float32)."""
    from diffusers import StableDiffusionXLPipeline

    models.quiet_libraries()
    return StableDiffusionXLPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)


def load_single_file(path: Path, parts: tuple[str, ...]) -> Any:
    """A single-file checkpoint through diffusers' `from_single_file` (shared.models.loading.load_single_file)."""
    return models.load_single_file(path, parts, None)


def verify_model(load: Any, path: Path, inputs: dict, ref: dict, tolerance: float, device: str) -> float:
    """A whole-model file or folder loaded back by its format's loader (`load(path, parts)`) and its outputs
    compared with the reference's."""
    parts = tuple(k for k in ref if "." not in k)
    model = load(path, parts)
    got = outputs({k: getattr(model, k) for k in parts}, inputs, device)
    return compare(path.name, got, ref, tolerance)
