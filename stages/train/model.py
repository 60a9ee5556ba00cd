"""What is trained: the model's UNet with a LoRA (peft) or all of it, in which dtype, and its trained weights as
a checkpoint part (plain tensors; checkpoints hold no pickle)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from shared.core.errors import ConfigError
from shared.models import lora, loading as models


@dataclass(frozen=True)
class UnetConfig:
    """The UNet being trained and how it is held (flat keys of the same names; `adapter` is made from the
    lora_* keys and `dora`)."""
    model: str                     # builtin:tiny | builtin:sdxl-random | a diffusers folder | a single file
    method: str                    # lora (an adapter on the frozen UNet) | full (every UNet weight)
    adapter: lora.LoraSpec | None  # the LoRA's shape (method lora), else None
    weights_dtype: str             # the UNet's dtype (float32 | bfloat16); LoRA weights stay float32
    mixed_precision: str           # autocast of the forward pass: no | bf16 | fp16 (with a gradient scaler)
    gradient_checkpointing: bool   # recompute activations in the backward pass
    tf32: bool                     # TF32 matmuls on NVIDIA GPUs
    seed: int                      # the adapter's initialisation follows it alone


def build_unet(cfg: UnetConfig, device: torch.device) -> Any:
    """The model's UNet prepared for training: LoRA injected (base frozen) or fully trainable, in
    `weights_dtype` (LoRA weights in float32), gradient checkpointing as asked, on `device`."""
    unet = models.load_model(cfg.model, ("unet",)).unet
    unet.to(device, getattr(torch, cfg.weights_dtype))
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return prepare(unet, cfg)


def prepare(unet: Any, cfg: UnetConfig) -> Any:
    """An UNet already in its place and dtype made trainable as `cfg` says (also what the memory planner does to
    a UNet of fake tensors): the LoRA injected, its weights float32, or every weight trainable; checkpointing."""
    if cfg.method == "lora":
        with torch.random.fork_rng(devices=[]):  # the adapter's init follows `seed` alone (not what ran before)
            torch.manual_seed(cfg.seed)
            lora.apply_lora(unet, cfg.adapter)
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    return unet


def trainable(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def trainable_groups(unet: Any, method: str) -> dict[str, list[torch.nn.Parameter]]:
    """The trained parameters by group, each with its own learning rate (optim.OptimizerConfig.group_lr):
    `adapter` (the LoRA on the UNet) or `unet` (its own weights). The text encoders' groups join here when they
    are trained."""
    return {"adapter" if method == "lora" else "unet": trainable(unet)}


class TrainedWeights:
    """The trained weights as checkpoints and export store them: `unet.` + peft's LoRA keys, or + the UNet's own
    parameter names for a full fine-tune. A checkpoint part; loading copies into the live parameters (the
    optimizer's and the EMA's references stay valid)."""

    def __init__(self, unet: Any, method: str):
        self.unet, self.method = unet, method

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = lora.lora_state(self.unet) if self.method == "lora" else self.unet.state_dict()
        return {"unet." + k: v.detach().contiguous() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
        if self.method == "lora":
            lora.load_lora_state(self.unet, own)
            return
        missing, unexpected = self.unet.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint weights do not fit this UNet ({(missing or unexpected)[0]})")
