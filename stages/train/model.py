"""What is trained: the model's UNet with a LoRA (peft) or all of it, in which dtype (its frozen base optionally
quantized, quant.py), with which attention kernel, compiled per block or not, and its trained weights as a
checkpoint part (plain tensors; checkpoints hold no pickle)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.core.errors import ConfigError
from shared.models import lora, loading as models
from shared.core.config import opt
from shared.core.groups import borrowed, derived
from stages.train import quant

ATTENTION = ("sdpa", "xformers", "eager")
DTYPES = ("float32", "bfloat16")
COMPILE = ("off", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True, kw_only=True)
class UnetConfig:
    """The UNet being trained and how it is held (options of `sdxl train`; `adapter` is made from the
    lora_* keys and `dora`)."""
    model: str | None = opt(None, "The model whose UNet is trained: builtin:tiny, builtin:sdxl-random, a "
                                  "diffusers SDXL folder or a single-file checkpoint.", pipeline=True,
                            fingerprint=False)
    method: str = opt("lora", "Train a LoRA on the UNet, or fine-tune the whole UNet.", choices=("lora", "full"))
    adapter: lora.LoraSpec | None = derived()
    weights_dtype: str = opt("float32", "dtype of the UNet's weights (LoRA weights stay float32).", choices=DTYPES)
    mixed_precision: str = opt("no", "Autocast the forward pass: no, bf16, or fp16 (with a gradient scaler).",
                               choices=("no", "bf16", "fp16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in the backward pass (less memory, slower).",
                                       fingerprint=False)
    tf32: bool = opt(True, "Allow TF32 matmuls on NVIDIA GPUs.", fingerprint=False)
    seed: int = borrowed()
    quantize_base: str = opt("no", "Method lora: store the frozen UNet's weights quantized, the LoRA in float32 "
                                   "beside them: fp8 (float8 e4m3 with a scale per output channel, Linear and "
                                   "Conv2d, upcast layer by layer), nf4 / int8 (bitsandbytes' 4-bit NormalFloat "
                                   "(QLoRA) / LLM.int8() Linear layers).", choices=quant.KINDS)
    attention: str = opt("sdpa", "Attention kernel: torch's scaled_dot_product_attention, xformers (when "
                                 "installed), or eager (plain softmax(QK^T)V math).", choices=ATTENTION,
                         fingerprint=False)
    compile: str = opt("off", "torch.compile each UNet block (ResNet, transformer, up/downsampler) with this mode; "
                              "off = eager.", choices=COMPILE, fingerprint=False)

    def problem(self) -> str | None:
        """Why these choices cannot be trained (None: they can)."""
        if self.quantize_base != "no" and self.method == "full":
            return (f"quantize_base {self.quantize_base} freezes a quantized base under a LoRA, but method full "
                    f"trains every weight: use method lora, or quantize_base no")
        return None


@dataclass(frozen=True, kw_only=True)
class AdapterOptions:
    """Method lora: the adapter's kind and shape (what `adapter`, a LoraSpec, is made from), the LoRA file it may
    start from and the LoRA files written with each checkpoint."""
    adapter_type: str = opt("lora", "Method lora: the adapter's kind.", choices=lora.ADAPTERS)
    lora_preset: str = opt("attn", "LoRA targets: attn (attention projections), self-attn (self-attention "
                                   "only), kohya (every Linear of the transformer blocks, as kohya's "
                                   "networks.lora), and attn+conv / kohya+conv (those plus the ResNet and "
                                   "down/upsampler convolutions).", choices=lora.PRESETS)
    lora_rank: int = opt(16, "LoRA rank (network dim).", ge=1)
    lora_alpha: float = opt(16.0, "LoRA alpha; the update is scaled by alpha / rank.", gt=0)
    lora_dropout: float = opt(0.0, "Dropout on the LoRA branch.", ge=0, lt=1)
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (a learned magnitude per output channel).")
    init_lora: Path | None = opt(None, "Start the LoRA from this LoRA file (kohya, as ComfyUI loads it, or peft / "
                                       "diffusers) instead of zero: same rank, targets and DoRA as configured (a "
                                       "different alpha is rescaled); its content is an input of the run.",
                                 fingerprint=False)
    lora_files: bool = opt(False, "With each checkpoint, also write the kohya LoRA file (what ComfyUI / A1111 / "
                                  "Forge load; the metadata export writes) to <out>/loras/<out name>-step-NNNNNN"
                                  ".safetensors, and …-ema from the EMA weights when EMA is on (method lora).",
                           fingerprint=False)
    lora_file_dtype: str = opt("float16", "dtype of those LoRA files' weights.",
                               choices=("float16", "bfloat16", "float32"), fingerprint=False)
    method: str = borrowed()

    def problem(self) -> str | None:
        """Why these choices cannot be trained (None: they can)."""
        if self.method != "lora" and (self.init_lora is not None or self.lora_files):
            what = "init_lora starts a LoRA" if self.init_lora is not None else "lora_files writes LoRA files"
            return (f"{what}; this run fine-tunes the whole UNet (method full)" +
                    ("" if self.init_lora is not None else ": export it with sdxl export --format single-file"))
        if self.adapter_type != "lora" and (self.init_lora is not None or self.lora_files):
            what = "init_lora reads" if self.init_lora is not None else "lora_files writes"
            return (f"{what} LoRA files, which hold no adapter_type {self.adapter_type}: leave it out (export the "
                    f"adapter after training)")
        if self.dora and not lora.ADAPTERS[self.adapter_type].dora:
            return f"dora decomposes a LoRA's weights; adapter_type {self.adapter_type} has no DoRA form"
        return None


def build_unet(cfg: UnetConfig, device: torch.device) -> Any:
    """The model's UNet prepared for training: LoRA injected (base frozen) or fully trainable, in
    `weights_dtype` (LoRA weights in float32), gradient checkpointing as asked, on `device`."""
    unet = models.load_model(cfg.model, ("unet",)).unet
    quantized = cfg.quantize_base != "no"
    # a base to be quantized waits on the host, so the device never holds it at full precision
    unet.to("cpu" if quantized else device, getattr(torch, cfg.weights_dtype))
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    set_attention(unet, cfg.attention)
    unet = prepare(unet, cfg)
    if quantized:
        quant.quantize_base(unet, cfg.quantize_base)
        unet.to(device)   # bitsandbytes' layers quantize here
    compile_blocks(unet, cfg.compile)
    return unet


def set_attention(unet: Any, backend: str) -> None:
    """The attention kernel: torch's scaled_dot_product_attention (diffusers' default), xformers' memory-efficient
    attention, or the plain math of softmax(QKᵀ/√d)V (the fallback that runs everywhere)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    if backend == "xformers":
        import importlib.util

        if importlib.util.find_spec("xformers") is None:
            raise ConfigError("attention xformers: xformers is not installed (pip install xformers); or use "
                              "attention sdpa")
        unet.enable_xformers_memory_efficient_attention()
    else:
        unet.set_attn_processor(AttnProcessor2_0() if backend == "sdpa" else AttnProcessor())


def blocks(unet: Any) -> list[tuple[str, torch.nn.Module]]:
    """The UNet's blocks (ResNet, transformer, up/downsampler): the unit of compilation and of block swap."""
    from stages.train.offload import swap_units

    return swap_units(unet)


def compile_blocks(unet: Any, mode: str) -> int:
    """torch.compile each block in place (`Module.compile`: its hooks and state_dict keys are unchanged), so a
    graph break or recompilation stays inside one block; the number compiled."""
    if mode == "off":
        return 0
    found = blocks(unet)
    for _, module in found:
        module.compile(mode=None if mode == "default" else mode, dynamic=False)
    return len(found)


def prepare(unet: Any, cfg: UnetConfig) -> Any:
    """An UNet already in its place and dtype made trainable as `cfg` says (also what the memory planner does to
    a UNet of fake tensors): the LoRA injected, its weights float32, or every weight trainable; checkpointing."""
    make_trainable(unet, cfg.method, cfg.adapter, cfg.seed)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def make_trainable(module: Any, method: str, adapter: lora.LoraSpec | None, seed: int,
                   targets: list[str] | None = None) -> None:
    """Method lora: the LoRA injected into `module` (at `targets`, default the adapter's preset), initialised from
    `seed` alone (not from what ran before), its weights float32; method full: every weight trainable."""
    if method == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            lora.apply_lora(module, adapter, targets)
        for p in module.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        module.requires_grad_(True)


def trainable(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_groups(unet: Any, method: str) -> dict[str, list[torch.nn.Parameter]]:
    """The trained parameters by group, each with its own learning rate (optim.OptimizerConfig.group_lr):
    `adapter` (the LoRA on the UNet) or `unet` (its own weights). The text encoders' groups (textenc.py
    `TextEncoders.groups`) join these when they are trained."""
    return {"adapter" if method == "lora" else "unet": trainable(unet)}


class TrainedWeights:
    """The trained weights as checkpoints and export store them: `unet.` + peft's LoRA keys, or + the UNet's own
    parameter names for a full fine-tune; the trained text encoders' likewise under `text_encoder.` /
    `text_encoder_2.`. A checkpoint part; loading copies into the live parameters (the optimizer's and the EMA's
    references stay valid)."""

    def __init__(self, unet: Any, method: str, text: dict[str, Any] | None = None):
        self.unet, self.method, self.text = unet, method, dict(text or {})

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, module in {"unet": self.unet, **self.text}.items():
            own = lora.lora_state(module) if self.method == "lora" else module.state_dict()
            out.update({f"{name}.{k}": v.detach().contiguous() for k, v in own.items()})
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        from stages.train import sharding

        for name, module in {**self.text, "unet": self.unet}.items():
            own = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
            if name != "unet" and not own:
                raise ConfigError(f"checkpoint holds no {name} weights, but this run trains it")
            if self.method == "lora":
                lora.load_lora_state(module, own)
                continue
            if sharding.is_sharded(module):   # FSDP: every process keeps its shard of the full tensors
                missing, unexpected = sharding.load_full(module, own), []
            else:
                missing, unexpected = module.load_state_dict(own, strict=False)
            if missing or unexpected:
                raise ConfigError(f"checkpoint weights do not fit {'this UNet' if name == 'unet' else name} "
                                  f"({(missing or unexpected)[0]})")
