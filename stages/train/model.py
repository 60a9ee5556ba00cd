"""What is trained and how it is stepped: the UNet (LoRA via peft, or all of it), precision, AdamW, EMA, and
their states as plain tensors + JSON (checkpoints hold no pickle)."""
from __future__ import annotations

import contextlib
import json
from typing import Any, Iterator

import torch

from shared.models import lora, loading as models
from shared.core.errors import ConfigError


def lora_spec(cfg: Any) -> lora.LoraSpec:
    return lora.LoraSpec(cfg.lora_preset, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.dora)


def build_unet(cfg: Any, device: torch.device) -> Any:
    """The model's UNet prepared for training: LoRA injected (base frozen) or fully trainable, in
    `weights_dtype` (LoRA weights in float32), gradient checkpointing as asked, on `device`."""
    unet = models.load_model(cfg.model, ("unet",)).unet
    unet.to(device, getattr(torch, cfg.weights_dtype))
    if cfg.method == "lora":
        with torch.random.fork_rng(devices=[]):  # the adapter's init follows `seed` alone (not what ran before)
            torch.manual_seed(cfg.seed)
            lora.apply_lora(unet, lora_spec(cfg))
        for p in unet.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        unet.requires_grad_(True)
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if device.type == "cuda" and cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    unet.train()
    return unet


def trainable(unet: Any) -> list[torch.nn.Parameter]:
    return [p for p in unet.parameters() if p.requires_grad]


def weights_state(unet: Any, cfg: Any) -> dict[str, torch.Tensor]:
    """The trained weights as checkpoints and export store them: `unet.` + peft's LoRA keys, or + the UNet's
    own parameter names for a full fine-tune."""
    state = lora.lora_state(unet) if cfg.method == "lora" else unet.state_dict()
    return {"unet." + k: v.detach().contiguous() for k, v in state.items()}


def load_weights_state(unet: Any, cfg: Any, state: dict[str, torch.Tensor]) -> None:
    own = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    if cfg.method == "lora":
        lora.load_lora_state(unet, own)
    else:
        missing, unexpected = unet.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint weights do not fit this UNet ({(missing or unexpected)[0]})")


def make_optimizer(cfg: Any, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state_dict as named tensors plus JSON (param groups, non-tensor values)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, entries in sd["state"].items():
        for name, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value.detach().contiguous()
            else:
                scalars[f"{pid}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    groups = [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in meta["param_groups"]]
    opt.load_state_dict({"state": state, "param_groups": groups})


class EMA:
    """Exponential moving average of the trained weights (float32), with the usual warmup of the decay:
    decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().float().clone() for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model's trained parameters temporarily replaced by the averages."""
        saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s.to(p.dtype))
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    @torch.no_grad()
    def take_from_params(self) -> None:
        for s, p in zip(self.shadow, self.params):
            s.copy_(p.detach().float())


def scaler_state(scaler: Any) -> dict | None:
    if scaler is None:
        return None
    sd = scaler.state_dict()
    return {k: (float(v) if isinstance(v, float) else v) for k, v in sd.items()}


def dumps(obj: Any) -> str:
    return json.dumps(obj, indent=1, sort_keys=True)
