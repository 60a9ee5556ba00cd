"""LoRA on the SDXL UNet through peft: which modules a preset targets, applying it, and its weights.

Presets (which tool's default each matches is in docs/train.md):
- `attn`: the attention projections (to_q, to_k, to_v, to_out.0) of every transformer block, self and cross
  (diffusers' train_text_to_image_lora_sdxl, OneTrainer's attn-only);
- `self-attn`: the self-attention projections only (attn1);
- `kohya`: every Linear inside the transformer models (proj_in / proj_out, both attentions, the feed-forward),
  what kohya's `networks.lora` targets by default;
- `attn+conv`: `attn` plus the 3x3 and 1x1 convolutions of the ResNet blocks and the down/upsamplers (what
  kohya calls LoRA-C3Lier / LoCon);
- `kohya+conv`: `kohya` plus those convolutions (kohya's `networks.lora` with conv_dim). The weights are peft's own state dict (`…lora_A.weight`, `…lora_B.weight`, and
`…lora_magnitude_vector` with DoRA), keyed by diffusers UNet module names, so train (checkpoints) and export
(kohya / diffusers names) agree on one format.

The text encoders, when trained (train's textenc.py), get a LoRA of the same spec on `TEXT_ENCODER`: every CLIP
encoder layer's q/k/v/out_proj and fc1/fc2 (kohya's text-encoder targets).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Callable

from shared.core.errors import ConfigError
from shared.core.registry import Registry

PRESETS = ("attn", "self-attn", "kohya", "attn+conv", "kohya+conv")
ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
CONV = ("conv1", "conv2", "conv_shortcut")  # in ResnetBlock2D; plus downsamplers/upsamplers `.conv`
TEXT_ENCODER = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")  # in each CLIP encoder layer


@dataclass(frozen=True)
class LoraSpec:
    """A LoRA's shape: what train's `--lora-*` options set, what a checkpoint manifest records and what export
    rebuilds. Serialised one way: `to_dict` (the manifest's `lora`), and `to_json` = that dict as JSON text (the
    safetensors metadata's `lora`)."""
    preset: str = "attn"      # one of PRESETS: which UNet modules get an adapter
    rank: int = 8             # r, the adapter's inner width
    alpha: float = 8.0        # the update is scaled by alpha / rank
    dropout: float = 0.0      # dropout on the adapter's input (training only)
    dora: bool = False        # DoRA: a learned magnitude per output channel
    kind: str = "lora"        # a name in ADAPTERS: the adapter's algorithm

    def to_dict(self) -> dict:
        """The spec's values; `kind` only when it is not a LoRA (what specs recorded before kinds existed)."""
        values = asdict(self)
        if self.kind == "lora":
            del values["kind"]
        return values

    @classmethod
    def from_dict(cls, data: Any) -> "LoraSpec":
        """The spec `to_dict` wrote; a ValueError naming what is missing, unknown or of the wrong type."""
        names = {f.name: f.type for f in fields(cls)}
        if isinstance(data, dict) and "kind" not in data:
            data = {**data, "kind": "lora"}
        if not isinstance(data, dict) or set(data) != set(names):
            got = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"a LoRA spec has the keys {sorted(names)}, not {got}")
        kinds = {"str": str, "int": int, "float": (int, float), "bool": bool}
        for name, kind in names.items():
            value = data[name]
            if not isinstance(value, kinds[kind]) or kind in ("int", "float") and isinstance(value, bool):
                raise ValueError(f"LoRA spec {name}: {value!r} is not a {kind}")
        return cls(**{**data, "alpha": float(data["alpha"])})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "LoraSpec":
        return cls.from_dict(json.loads(text))


def target_modules(unet: Any, preset: str) -> list[str]:
    """Full module names of the UNet that `preset` puts a LoRA on (sorted)."""
    import torch

    if preset not in PRESETS:
        raise ConfigError(f"lora_preset {preset!r}: expected one of {', '.join(PRESETS)}")
    names = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and _linear_target(name, preset):
            names.append(name)
        elif preset.endswith("+conv") and isinstance(module, torch.nn.Conv2d):
            in_resnet = ".resnets." in name and name.rsplit(".", 1)[-1] in CONV
            sampler = (".downsamplers." in name or ".upsamplers." in name) and name.endswith(".conv")
            if in_resnet or sampler:
                names.append(name)
    return sorted(names)


def _linear_target(name: str, preset: str) -> bool:
    if preset.startswith("kohya"):
        return ".attentions." in name  # every Linear of a Transformer2DModel (kohya: Linear and 1x1 conv there)
    if not name.endswith(ATTENTION):
        return False
    return ".attn1." in name if preset == "self-attn" else ".attn" in name


def text_encoder_targets(text_encoder: Any) -> list[str]:
    """Full module names of a CLIP text encoder that get a LoRA: the attention projections and the MLP of every
    encoder layer (kohya's text-encoder targets: q/k/v/out_proj, fc1, fc2)."""
    import torch

    return sorted(name for name, module in text_encoder.named_modules()
                  if isinstance(module, torch.nn.Linear) and ".encoder.layers." in "." + name
                  and name.rsplit(".", 1)[-1] in TEXT_ENCODER)


@dataclass(frozen=True)
class Adapter:
    """An adapter kind users pick by name (`adapter_type = ...`): how peft builds it on the targeted modules and
    which of the module's parameters are its (the trained ones). Its checkpoint state is peft's state dict of
    the adapter; `--plan` counts the parameters it adds (it is applied to the fake-tensor model as to the real)."""
    name: str
    help: str
    peft_config: Callable[[LoraSpec, list[str]], Any]   # peft's config of this kind for these target modules
    marker: str                                         # in the name of each of its parameters ("lora_")
    dora: bool = False                                  # whether DoRA (the `dora` key) applies to it


ADAPTERS: Registry[Adapter] = Registry("adapter type")


def _lora_config(spec: LoraSpec, targets: list[str]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=spec.dropout, use_dora=spec.dora,
                      init_lora_weights=True, target_modules=targets)


ADAPTERS.add(Adapter("lora", "a low-rank update B·A scaled by alpha / rank (with dora: DoRA's magnitudes too).",
                     _lora_config, "lora_", dora=True))


def is_adapter_parameter(name: str) -> bool:
    """Whether a parameter name is an adapter's (any registered kind's), not the base module's."""
    return any(f".{a.marker}" in f".{name}" for a in ADAPTERS.entries())


def apply_lora(unet: Any, spec: LoraSpec, targets: list[str] | None = None) -> None:
    """Freeze the UNet (or the text encoder, with its `targets`) and inject the adapter of `spec.kind` (peft) as
    `spec` says; only the adapter's weights train."""
    from peft import inject_adapter_in_model

    if spec.rank < 1 or spec.alpha <= 0 or not 0 <= spec.dropout < 1:
        raise ConfigError("lora_rank must be >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1")
    kind = ADAPTERS[spec.kind]
    if spec.dora and not kind.dora:
        raise ConfigError(f"dora decomposes a LoRA's weights; adapter_type {kind.name} has no DoRA form")
    unet.requires_grad_(False)
    config = kind.peft_config(spec, targets if targets is not None else target_modules(unet, spec.preset))
    inject_adapter_in_model(config, unet, adapter_name="default")
    for name, p in unet.named_parameters():
        p.requires_grad_(f".{kind.marker}" in f".{name}")


def lora_state(unet: Any) -> dict:
    """The adapter's weights in peft's saved form (no adapter name in the keys)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach() for k, v in get_peft_model_state_dict(unet, adapter_name="default").items()}


def load_lora_state(unet: Any, state: dict) -> None:
    """Load weights written by `lora_state` into a UNet that `apply_lora` prepared; every key must fit."""
    from peft import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    if unexpected:
        raise ConfigError(f"LoRA weights do not fit this UNet (first unexpected key: {unexpected[0]})")
