"""What export reads: a finished training's chosen checkpoint (or one checkpoint folder given directly), its
weights by component, and the trained model rebuilt from the base model in float32."""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core import artifacts
from shared.formats import checkpoints
from shared.models import loading as models
from shared.core.artifacts import Manifest
from shared.core.errors import ConfigError, InputError
from shared.formats.checkpoints import CheckpointManifest
from shared.models.lora import LoraSpec, apply_lora, load_lora_state

TRAIN_VERSIONS = (1,)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
WEIGHTS = re.compile(r"^(final|ema|step-(\d+))$")


@dataclass(frozen=True)
class Checkpoint:
    folder: Path
    file: Path                 # weights.safetensors or ema.safetensors
    kind: str                  # final | ema | step-N | checkpoint (a folder given as --in)
    record: CheckpointManifest  # the checkpoint's own manifest
    train: Manifest | None     # the finished training's manifest (None for a checkpoint given directly)
    base: str                  # base model spec

    @property
    def meta(self) -> dict:
        """The checkpoint's manifest as JSON values."""
        return self.record.to_dict()

    @property
    def method(self) -> str:
        return self.record.method

    @property
    def spec(self) -> LoraSpec | None:
        return self.record.lora

    @property
    def step(self) -> int:
        return self.record.step

    def fingerprint(self) -> str:
        """Checkpoints are written atomically and never rewritten, so their manifest identifies the weights."""
        return artifacts.hash_json({"train": self.train.fingerprint if self.train else None,
                                    "checkpoint": self.record.fingerprint, "step": self.step,
                                    "file": self.file.name, "bytes": self.file.stat().st_size})


def _checkpoints(folder: Path) -> list[str]:
    """Names of the finished checkpoints of a training folder (its own or its staging folder)."""
    return [p.name for p in checkpoints.complete(folder / "checkpoints")]


def _finished_training(folder: Path) -> Manifest:
    fix = f"sdxl train --out {folder}"
    staging = artifacts.staging_dir(folder)
    try:
        return artifacts.require_input(folder, "train", TRAIN_VERSIONS, fix)
    except InputError as e:
        found = _checkpoints(staging) if not folder.exists() and staging.exists() else []
        if found:
            raise InputError(f"{e}; or export one of its checkpoints with --in "
                             f"{staging / 'checkpoints' / found[-1]}") from None
        raise


def _pick(folder: Path, train: Manifest, weights: str) -> tuple[Path, str]:
    """The checkpoint folder and weights file that `weights` (final | ema | step-N) names."""
    match = WEIGHTS.match(weights)
    if match is None:
        raise ConfigError(f"weights {weights!r}: expected final, ema or step-N (e.g. step-500)")
    if match.group(2) is None:
        final = train.extra.get("final_checkpoint")
        if not final:
            raise InputError(f"{folder}: the train manifest names no final_checkpoint; rerun sdxl train")
        ckpt = folder / final
        return ckpt, ckpt / ("ema.safetensors" if weights == "ema" else "weights.safetensors")
    ckpt = folder / "checkpoints" / f"step-{int(match.group(2)):06d}"
    if not ckpt.is_dir():
        have = ", ".join(_checkpoints(folder)) or "none"
        raise InputError(f"{ckpt}: no such checkpoint (kept: {have}); pick one of them with --weights step-N")
    return ckpt, ckpt / "weights.safetensors"


def locate(input: Path, weights: str, model: str | None) -> Checkpoint:
    """The checkpoint to export. `input` is a finished training folder, or one checkpoint folder (allowed
    even inside an unfinished training's staging folder; then `weights` may be final or ema only)."""
    input = Path(input)
    if checkpoints.is_checkpoint(input):
        if weights not in ("final", "ema"):
            raise ConfigError(f"--weights {weights}: --in {input} is one checkpoint already; give the folder of "
                              f"the checkpoint you want as --in instead")
        folder, train = input, None
        file = input / ("ema.safetensors" if weights == "ema" else "weights.safetensors")
        kind = "checkpoint" if weights == "final" else "ema"
    else:
        train = _finished_training(input)
        folder, file = _pick(input, train, weights)
        kind = weights
        if not checkpoints.is_checkpoint(folder):
            raise InputError(f"{folder}: no readable checkpoint manifest; the training output is damaged, rerun "
                             f"sdxl train --out {input}")
    if not file.is_file():
        why = "the training kept no EMA (ema_decay = 0)" if file.name == "ema.safetensors" else "it is missing"
        raise InputError(f"{file}: not found ({why}); choose other --weights")
    record = checkpoints.require_intact(folder)
    if record.method not in ("lora", "full", "vae"):
        raise InputError(f"{folder}: checkpoint method {record.method!r} is none of lora, full and vae")
    base = model or record.model or (train.config.get("model") if train else None)
    if not base:
        raise ConfigError("no base model recorded; give it with --model")
    return Checkpoint(folder, file, kind, record, train, base)


def load_weights(ckpt: Checkpoint) -> dict[str, dict]:
    """The checkpoint's tensors split by component prefix (`unet.`, `text_encoder.`, `text_encoder_2.`)."""
    from safetensors.torch import load_file

    out: dict[str, dict] = {}
    for key, value in load_file(str(ckpt.file)).items():
        component, _, rest = key.partition(".")
        if component not in COMPONENTS or not rest:
            raise InputError(f"{ckpt.file}: unexpected weight {key!r} (expected unet.*, text_encoder.* or "
                             f"text_encoder_2.*)")
        out.setdefault(component, {})[rest] = value.float()
    if "unet" not in out and ckpt.method == "full":
        raise InputError(f"{ckpt.file}: a full fine-tune checkpoint without UNet weights")
    return out


def _inject(model: Any, state: dict, alpha: float) -> None:
    """A peft LoRA on a text encoder, shaped by its saved weights (rank from lora_A, DoRA when a magnitude is
    there); its alpha is the UNet's, as kohya's single network_alpha."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    targets = sorted({k.split(".lora_")[0] for k in state})
    rank = next(v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight"))
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets,
                        use_dora=any("magnitude" in k for k in state))
    inject_adapter_in_model(config, model, adapter_name="default")
    result = set_peft_model_state_dict(model, state, adapter_name="default")
    if getattr(result, "unexpected_keys", None):
        raise InputError(f"text-encoder LoRA weights do not fit the base model ({result.unexpected_keys[0]})")


def trained_model(ckpt: Checkpoint, weights: dict[str, dict], parts: tuple[str, ...]) -> models.SDXLModel:
    """The base model (float32) with the checkpoint applied: LoRA adapters through peft (unmerged), or the
    fine-tuned UNet weights."""
    import torch

    model = models.load_model(ckpt.base, parts, dtype=torch.float32)
    if ckpt.method == "full":
        for name in ("unet", "text_encoder", "text_encoder_2"):   # text encoders: when they were trained
            if name not in weights or getattr(model, name, None) is None:
                continue
            result = getattr(model, name).load_state_dict(weights[name], strict=False)
            if result.missing_keys or result.unexpected_keys:
                bad = (result.missing_keys or result.unexpected_keys)[0]
                raise InputError(f"{ckpt.file}: the {name} weights do not fit {ckpt.base} ({bad}); give the "
                                 f"base model it was trained from with --model")
        return model
    spec = ckpt.spec
    if spec is None:
        raise InputError(f"{ckpt.folder}: a LoRA checkpoint whose manifest has no lora settings")
    apply_lora(model.unet, spec)
    try:
        load_lora_state(model.unet, weights.get("unet", {}))
    except ConfigError as e:
        raise InputError(f"{ckpt.file}: {e}; give the base model it was trained from with --model") from None
    for name in ("text_encoder", "text_encoder_2"):
        if name in weights:
            _inject(getattr(model, name), weights[name], spec.alpha)
    for name in source_parts(model):   # the injected LoRA dropout layers start in train mode
        getattr(model, name).eval()
    return model


def source_parts(model: Any) -> list[str]:
    return [n for n in COMPONENTS if getattr(model, n, None) is not None]
