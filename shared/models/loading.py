"""SDXL models: `builtin:tiny`, `builtin:sdxl-random`, or a diffusers folder — all loaded by one code path.

A builtin model is first materialised (once, deterministically from a fixed seed) as an ordinary diffusers
SDXL folder in the cache (`$SDXL_CACHE`, default `~/.cache/sdxl-stages`), and then loaded exactly as a user's
folder is. So the loader that real SDXL weights go through is the one every test exercises.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core.errors import PipelineError, os_error_line

COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
BUILTIN_VERSION = 2  # bump when a builtin's architecture or seed changes
SEED = 20240601


@dataclass
class SDXLModel:
    """The parts of an SDXL pipeline that stages use (any may be None when not asked for)."""
    source: str
    unet: Any = None
    vae: Any = None
    text_encoder: Any = None
    text_encoder_2: Any = None
    tokenizer: Any = None
    tokenizer_2: Any = None
    scheduler: Any = None


def cache_dir() -> Path:
    """The model cache ($SDXL_CACHE); one that exists but is not a folder is a one-line error."""
    folder = Path(os.environ.get("SDXL_CACHE", Path.home() / ".cache" / "sdxl-stages")).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PipelineError(f"SDXL_CACHE={folder}: not a folder; point SDXL_CACHE at a writable folder")
    return folder


def _cache_write_error(error: OSError) -> PipelineError:
    """A write into the model cache that failed (permissions, a file in the way, a full disk), in one line."""
    said = os_error_line(error) or f"{cache_dir()}: {error.strerror or error}"
    return PipelineError(f"{said}; the model cache (SDXL_CACHE) must be a writable folder")


def tiny_configs() -> dict[str, dict]:
    """Component configs of `builtin:tiny`: SDXL's shapes (text_time conditioning, two CLIP encoders whose
    penultimate states concatenate into the cross-attention width, an 8x VAE) at toy widths."""
    text = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3,
                vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=1, projection_dim=32)
    return {
        "unet": dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64),
                     layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                     use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                     transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 48,
                     cross_attention_dim=32 + 48, norm_num_groups=16),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32),
                    layers_per_block=1, norm_num_groups=16, sample_size=256, scaling_factor=0.13025,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(text, hidden_act="quick_gelu"),
        "text_encoder_2": dict(text, hidden_size=48, intermediate_size=96, projection_dim=48, hidden_act="gelu"),
    }


def sdxl_configs() -> dict[str, dict]:
    """Component configs of SDXL 1.0 base (for `builtin:sdxl-random`: full sizes, random weights)."""
    text = dict(vocab_size=49408, max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407,
                pad_token_id=1)
    return {
        "unet": dict(sample_size=128, in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280),
                     layers_per_block=2, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                                           "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     attention_head_dim=(5, 10, 20), use_linear_projection=True, addition_embed_type="text_time",
                     addition_time_embed_dim=256, transformer_layers_per_block=(1, 2, 10),
                     projection_class_embeddings_input_dim=2816, cross_attention_dim=2048),
        "vae": dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                    layers_per_block=2, sample_size=1024, scaling_factor=0.13025, force_upcast=True,
                    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4),
        "text_encoder": dict(text, hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                             num_hidden_layers=12, projection_dim=768, hidden_act="quick_gelu"),
        "text_encoder_2": dict(text, hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
                               num_hidden_layers=32, projection_dim=1280, hidden_act="gelu"),
    }


def scheduler_config() -> dict:
    """SDXL's training schedule: 1000 scaled-linear steps, beta 0.00085 -> 0.012, epsilon prediction."""
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                prediction_type="epsilon", timestep_spacing="leading", steps_offset=1)


MODEL_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
MODEL_INDEX = {"_class_name": "StableDiffusionXLPipeline", "_diffusers_version": "0.30.0",
               "force_zeros_for_empty_prompt": True,
               "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
               "text_encoder": ["transformers", "CLIPTextModel"],
               "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
               "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
               "scheduler": ["diffusers", "EulerDiscreteScheduler"]}


def build_components(configs: dict[str, dict], names: tuple[str, ...] = MODEL_PARTS,
                     seed: int = SEED) -> dict[str, Any]:
    """Random-init models from configs, each from its own fixed seed (same weights on every machine,
    whichever subset is built). The caller's global RNG is left as it was: whether a builtin had to be built
    (a cold cache) must not change what the caller draws next."""
    import torch

    quiet_libraries()
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    makers = {"unet": lambda c: UNet2DConditionModel(**c), "vae": lambda c: AutoencoderKL(**c),
              "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig(**c)),
              "text_encoder_2": lambda c: CLIPTextModelWithProjection(CLIPTextConfig(**c))}
    built = {}
    with torch.random.fork_rng(devices=[]):
        for name in names:
            torch.manual_seed(seed + MODEL_PARTS.index(name))
            built[name] = makers[name](configs[name]).eval()
    return built


def _write_pipeline_files(folder: Path) -> None:
    """What a diffusers SDXL folder holds besides the four models: tokenizers, scheduler, model_index.json."""
    from diffusers import EulerDiscreteScheduler

    from shared.models.clip_vocab import write_tokenizer

    write_tokenizer(folder / "tokenizer", "<|endoftext|>")
    write_tokenizer(folder / "tokenizer_2", "!")
    EulerDiscreteScheduler(**scheduler_config()).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(json.dumps(MODEL_INDEX, indent=1))


def save_folder(components: dict[str, Any], folder: Path, replace: bool = True) -> Path:
    """Write a complete diffusers SDXL folder (safetensors weights), atomically. With replace=False an
    existing folder wins (several ranks may materialise the same builtin at once)."""
    staging = folder.with_name(f"{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in MODEL_PARTS:
        components[name].save_pretrained(staging / name, safe_serialization=True)
    if not all((staging / name / "config.json").is_file() for name in MODEL_PARTS):
        # transformers writes on rank 0 only once a process group exists: a launch's ranks take rank 0's copy
        shutil.rmtree(staging)
        return _wait_for(folder)
    _write_pipeline_files(staging)
    if folder.exists():
        if not replace:
            shutil.rmtree(staging)
            return folder
        shutil.rmtree(folder)
    try:
        os.replace(staging, folder)
    except OSError:  # another process put its copy in place first; the same seed made the same weights
        if replace or not (folder / "model_index.json").exists():
            raise
        shutil.rmtree(staging)
    return folder


def _wait_for(folder: Path, timeout: float = 600.0) -> Path:
    """`folder` once another process (rank 0 of the launch) has put it in place; an error after `timeout` s."""
    import time

    deadline = time.monotonic() + timeout
    while not (folder / "model_index.json").exists():
        if time.monotonic() > deadline:
            raise PipelineError(f"{folder}: rank 0 did not write the builtin model in {timeout:.0f} s (this rank's "
                                f"text encoders are saved by rank 0 only); run once on one process to fill the cache")
        time.sleep(0.2)
    return folder


def builtin_folder(name: str) -> Path:
    """The cached diffusers folder of a builtin model, made on first use."""
    if name != "tiny":
        raise PipelineError(f"builtin:{name} is not materialised on disk; only builtin:tiny is")
    folder = cache_dir() / f"builtin-tiny-v{BUILTIN_VERSION}"
    if not (folder / "model_index.json").exists():
        try:
            save_folder(build_components(tiny_configs()), folder, replace=False)
        except OSError as e:
            raise _cache_write_error(e) from None
    return folder


def load_model(spec: str, parts: tuple[str, ...] = COMPONENTS, dtype: Any = None) -> SDXLModel:
    """Load `spec` (builtin:tiny | builtin:sdxl-random | a diffusers SDXL folder | a single-file SDXL
    .safetensors) with the asked parts."""
    if spec == "builtin:sdxl-random":
        model = SDXLModel(spec, **build_components(sdxl_configs(), tuple(p for p in MODEL_PARTS if p in parts)))
        if "tokenizer" in parts or "tokenizer_2" in parts:
            tiny = load_folder(builtin_folder("tiny"), ("tokenizer", "tokenizer_2"), None)
            model.tokenizer, model.tokenizer_2 = tiny.tokenizer, tiny.tokenizer_2
        return model
    if spec.startswith("builtin:"):
        return load_folder(builtin_folder(spec.split(":", 1)[1]), parts, dtype, source=spec)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_folder(path, parts, dtype)
    if path.is_file():
        return load_single_file(path, parts, dtype)
    raise PipelineError(f"--model {spec}: not found; expected builtin:tiny, builtin:sdxl-random, a diffusers "
                        f"SDXL folder or a single-file SDXL .safetensors checkpoint")


UNET_CONV_IN = "model.diffusion_model.input_blocks.0.0.weight"
OPEN_CLIP_KEY = "conditioner.embedders.1.model.ln_final.weight"


def single_file_config(path: Path) -> Path:
    """The diffusers config folder that describes a single-file SDXL checkpoint: SDXL 1.0's, or the tiny
    builtin's (told apart by the UNet's first convolution). Anything else is a one-line error."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            width = f.get_slice(UNET_CONV_IN).get_shape()[0] if UNET_CONV_IN in keys else None
    except Exception as e:  # safetensors raises its own error types for non-safetensors files
        raise PipelineError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    if width is None or OPEN_CLIP_KEY not in keys:
        raise PipelineError(f"{path}: not a single-file SDXL checkpoint (expected {UNET_CONV_IN} and the OpenCLIP "
                            f"text encoder under conditioner.embedders.1)")
    if width == tiny_configs()["unet"]["block_out_channels"][0]:
        return builtin_folder("tiny")
    if width == 320:
        return config_folder()
    raise PipelineError(f"{path}: a UNet whose first block is {width} wide is not SDXL (320)")


def config_folder() -> Path:
    """A diffusers SDXL 1.0 folder with configs, tokenizers and scheduler but no weights (made once, offline):
    what diffusers' single-file loader needs to interpret an SDXL checkpoint without downloading."""
    folder = cache_dir() / f"sdxl-config-v{BUILTIN_VERSION}"
    if (folder / "model_index.json").exists():
        return folder
    quiet_libraries()
    staging = folder.with_name(f"{folder.name}.staging-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _write_sdxl_configs(staging)
    except OSError as e:
        raise _cache_write_error(e) from None
    try:
        os.replace(staging, folder)
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def _write_sdxl_configs(staging: Path) -> None:
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    configs = sdxl_configs()
    with init_empty_weights():
        UNet2DConditionModel(**configs["unet"]).save_config(staging / "unet")
        AutoencoderKL(**configs["vae"]).save_config(staging / "vae")
    CLIPTextConfig(**configs["text_encoder"]).save_pretrained(staging / "text_encoder")
    CLIPTextConfig(**configs["text_encoder_2"]).save_pretrained(staging / "text_encoder_2")
    _write_pipeline_files(staging)


def load_single_file(path: Path, parts: tuple[str, ...], dtype: Any) -> SDXLModel:
    """A single-file (SGM layout) SDXL checkpoint through diffusers' own single-file loader, offline."""
    from diffusers import StableDiffusionXLPipeline

    config = single_file_config(path)
    quiet_libraries()
    skip = {name: None for name in MODEL_PARTS if name not in parts}
    kw = {"torch_dtype": dtype} if dtype is not None else {}
    try:
        pipe = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config), local_files_only=True,
                                                          **skip, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise PipelineError(f"{path}: cannot load as single-file SDXL ({str(e).splitlines()[0][:200]})") from None
    model = SDXLModel(str(path))
    for name in parts:
        part = getattr(pipe, name)
        setattr(model, name, part.eval() if hasattr(part, "eval") else part)
    return model


def quiet_libraries() -> None:
    """No download/loading progress bars or advice from diffusers and transformers: stages print their own."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def load_folder(folder: Path, parts: tuple[str, ...], dtype: Any, source: str | None = None) -> SDXLModel:
    """Load the asked components of a diffusers SDXL folder; a missing or wrong part is a one-line error."""
    quiet_libraries()
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel,
               "text_encoder_2": CLIPTextModelWithProjection}
    model = SDXLModel(source or str(folder))
    for name in parts:
        sub = folder / name
        if not sub.is_dir():
            raise PipelineError(f"{sub}: missing; a diffusers SDXL folder needs {', '.join(COMPONENTS)}")
        if name in loaders:
            check_weights(sub, f"the {name} of a diffusers SDXL folder")
        try:
            if name in loaders:
                kw = {"torch_dtype": dtype} if dtype is not None else {}
                part = loaders[name].from_pretrained(sub, use_safetensors=True, **kw).eval()
            elif name.startswith("tokenizer"):
                part = CLIPTokenizer.from_pretrained(sub)
            else:
                part = EulerDiscreteScheduler.from_pretrained(sub)
        except (OSError, ValueError, EnvironmentError) as e:
            raise PipelineError(f"{sub}: cannot load {name} ({str(e).splitlines()[0][:200]})") from None
        setattr(model, name, part)
    if model.unet is not None and model.unet.config.get("addition_embed_type") != "text_time":
        raise PipelineError(f"{folder / 'unet'}: not an SDXL UNet (no text_time conditioning)")
    return model


def _file_hash(path: Path) -> str:
    """sha256 of a file, cached by (path, size, mtime, inode, ctime) in the cache folder: a 5 GB UNet is hashed
    once; a file edited in place with its size and mtime put back still has a new ctime (no one can set it)."""
    from shared.core.artifacts import sha256_file

    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}|{st.st_ctime_ns}"
    cache = cache_dir() / "file-hashes.json"
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    known[key] = sha256_file(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, cache)
    except OSError as e:
        raise _cache_write_error(e) from None
    return known[key]


def component_identity(folder: Path) -> str:
    """A hash of a component folder's files (configs, weights, vocabularies)."""
    import hashlib

    if not folder.is_dir():
        raise PipelineError(f"{folder}: missing; a diffusers SDXL folder needs {', '.join(COMPONENTS)}")
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode("utf-8", "surrogateescape"))
        h.update(_file_hash(f).encode())
    return h.hexdigest()[:16]


def model_identity(spec: str, parts: tuple[str, ...], vae: str | None = None) -> dict[str, str]:
    """Per component, what identifies its weights: a builtin's name and version, or a hash of the files.
    Stages record it so that outputs made with other weights are never mixed up with these."""
    if spec.startswith("builtin:"):
        if spec not in ("builtin:tiny", "builtin:sdxl-random"):
            raise PipelineError(f"--model {spec}: unknown builtin; expected builtin:tiny or builtin:sdxl-random")
        ident = {p: f"{spec}@v{BUILTIN_VERSION}" for p in parts}
    else:
        folder = Path(spec).expanduser()
        if folder.is_file():
            single_file_config(folder)  # a clear error now for a file that is not SDXL
            ident = {p: "file:" + _file_hash(folder)[:16] for p in parts}
        elif folder.is_dir():
            ident = {p: component_identity(folder / p) for p in parts}
        else:
            raise PipelineError(f"--model {spec}: not found; expected builtin:tiny, builtin:sdxl-random, a "
                                f"diffusers SDXL folder or a single-file SDXL .safetensors checkpoint")
    if vae is not None and "vae" in parts:
        ident["vae"] = component_identity(vae_folder(vae))
    return ident


def check_weights(folder: Path, what: str) -> None:
    """One line naming `folder` when it lacks a config.json or safetensors weights, before diffusers (whose
    own message for this goes to its log as well as into the exception) is asked to load it."""
    if not (folder / "config.json").is_file():
        raise PipelineError(f"{folder}: no config.json; expected {what}")
    if not any(folder.glob("*.safetensors")):
        raise PipelineError(f"{folder}: no .safetensors weights; expected {what} (safetensors only: .bin "
                            f"weights are pickles and are not loaded)")


def vae_folder(vae: str | Path) -> Path:
    """The folder of --vae, checked: an existing diffusers AutoencoderKL folder with config and weights."""
    folder = Path(vae).expanduser()
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        raise PipelineError(f"--vae {vae}: {what}; expected a diffusers AutoencoderKL folder (config.json and "
                            f"diffusion_pytorch_model.safetensors, e.g. sdxl-vae-fp16-fix)")
    check_weights(folder, "a diffusers AutoencoderKL folder for --vae")
    return folder


def load_vae(folder: str | Path) -> Any:
    """A standalone diffusers AutoencoderKL folder (e.g. an fp16-fixed SDXL VAE)."""
    quiet_libraries()
    from diffusers import AutoencoderKL

    folder = vae_folder(folder)
    try:
        return AutoencoderKL.from_pretrained(folder, use_safetensors=True).eval()
    except (OSError, ValueError, EnvironmentError) as e:
        raise PipelineError(f"{folder}: cannot load a VAE (expected a diffusers AutoencoderKL folder with "
                            f"config.json and safetensors weights; {str(e).splitlines()[0][:160]})") from None


def tiny_clip() -> Any:
    """`builtin:tiny`'s stand-in for CLIP ViT-L/14: a small random-init CLIPModel from a fixed seed."""
    import torch
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                         num_hidden_layers=2, vocab_size=49408, max_position_embeddings=77),
                        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4,
                                           num_hidden_layers=2, image_size=64, patch_size=16),
                        projection_dim=32)
    with torch.random.fork_rng(devices=[]):  # the caller's global RNG is not consumed
        torch.manual_seed(SEED + 10)
        return CLIPModel(config).eval()
