"""`sdxl train`'s configuration: option groups, each declared once beside the code that uses it, composed into one
flat frozen config (shared/core/groups.py) whose keys are the CLI flags and pipeline.toml's `[train]` keys.

The groups, in the order `--help` lists them: `RunOptions` (here: folders, devices, the run's own switches),
`UnetConfig` and `AdapterOptions` (model.py), `TextConfig` (textenc.py), `ObjectiveConfig` (objective.py),
`OptimizerConfig` (optim.py), `DataConfig` (feed.py), `OffloadConfig` (offload.py), `CheckpointConfig`
(checkpoint.py), `LogConfig` (logs.py), `HoldoutConfig` (holdout.py), `PreviewConfig` (previews.py), `VaeConfig`
(vae.py). Each option is one `opt(...)` field of its group; a group that reads another's option borrows it. The
config makes each group back as a typed view (`cfg.optim`, `cfg.objective`, ...); functions take their group.

Fields marked fingerprint=False do not change the trained weights (paths, logging, checkpoint cadence,
kernels); every other field does, so a finished output is reused only when all of them are unchanged, and a
checkpoint is resumed only by a config whose fingerprinted fields equal the checkpoint's (see checkpoint.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from shared.core import graph
from shared.core.config import opt
from shared.core.errors import ConfigError
from shared.core.groups import compose, view
from shared.formats import location
from shared.models.lora import LoraSpec
from stages.train import objective, sharding
from stages.train.checkpoint import CheckpointConfig
from stages.train.feed import DataConfig
from stages.train.holdout import HoldoutConfig
from stages.train.logs import LogConfig
from stages.train.model import AdapterOptions, UnetConfig
from stages.train.objective import ObjectiveConfig
from stages.train.offload import OffloadConfig
from stages.train.optim import OPTIMIZERS, OptimizerConfig
from stages.train.previews import PreviewConfig
from stages.train.textenc import TextConfig
from stages.train.vae import VaeConfig, unet_only_problem


@dataclass(frozen=True, kw_only=True)
class RunOptions:
    """The run's own options: where it reads and writes, where it runs, and what it only reports."""
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/train].", flag="--out", fingerprint=False)
    allow_encoder_mismatch: bool = opt(False, "Train even though the shards were encoded with another VAE or "
                                              "text encoders than the model's.", fingerprint=False)
    parallel: str = opt("ddp", "With several processes: ddp (each holds the whole UNet, gradients averaged) or fsdp "
                               "(torch's fully_shard, per block: each holds 1/N of the weights, gradients and "
                               "AdamW state; method full, adamw, float32 weights). Checkpoints are the same.",
                        choices=sharding.PARALLEL, fingerprint=False)
    comment: str = opt("", "Free-text training comment (kept in the manifest and exported LoRA metadata).",
                       fingerprint=False)
    device: str = opt("auto", "auto (the launcher's LOCAL_RANK GPU when CUDA is present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)
    plan: bool = opt(False, "Print the predicted peak GPU memory of this run (weights, gradients, optimizer "
                            "state, EMA, activations at the largest bucket and batch, measured on fake tensors) "
                            "and exit without training; needs no GPU.", fingerprint=False)


class _Checks:
    """The checks across groups, the defaults that depend on others, and the groups as typed views."""

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("train needs a model: --model builtin:tiny | builtin:sdxl-random | FOLDER | FILE "
                              "(or `model` in [pipeline])")
        # each field's own range is checked by shared.core.config.build; these concern several fields
        problem = self._problem() or self._memory_problem()
        if problem:
            raise ConfigError(problem)
        where = self.input or graph.default_input(self.workdir, "train")
        object.__setattr__(self, "input", where if location.is_url(where) else Path(where))
        object.__setattr__(self, "output", self.output or self.workdir / "train")

    def _problem(self) -> str | None:
        """The first reason, across the groups, why this config cannot be trained (None: it can)."""
        if self.prediction == "epsilon" and self.schedule != "sdxl":
            return (f"schedule {self.schedule} reaches zero SNR, where epsilon prediction is trivial (the input is "
                    f"the noise); use --prediction v_prediction")
        if self.holdout and self.holdout_count:
            return f"holdout {self.holdout:g} and holdout_count {self.holdout_count}: give one of them"
        if self.lr_schedule == "polynomial" and self.lr_end >= self.learning_rate:
            return (f"lr_end {self.lr_end:g} must be below learning_rate {self.learning_rate:g} (the polynomial "
                    f"schedule decays from one to the other)")
        return (objective.weighting_problem(self.objective) or view(self, AdapterOptions).problem() or
                self.vae_target.problem() or (unet_only_problem(self) if self.target == "vae" else None) or
                self.optim.problem() or self.unet.problem() or
                sharding.problem(self.parallel, self.method, self.optimizer, OPTIMIZERS[self.optimizer].shardable,
                                 self.weights_dtype, self.mixed_precision,
                                 self.ema_decay > 0 and self.ema_device == "cpu"))

    def _memory_problem(self) -> str | None:
        """Memory savers that cannot work together (None: these can)."""
        if self.blocks_to_swap and self.fused_backward:
            return ("fused_backward steps each weight on the device inside the backward pass, but a swapped block's "
                    "weights are stepped on the CPU: turn one of fused_backward and blocks_to_swap off")
        if self.blocks_to_swap and (self.compile != "off" or self.quantize_base in ("nf4", "int8")):
            what = f"compile {self.compile}" if self.compile != "off" else f"quantize_base {self.quantize_base}"
            return (f"blocks_to_swap moves a block's tensors between host and device by hand, which {what} does "
                    f"not allow (its own kernels / quantized parameters): use one of them")
        clash = ("fused_backward" if self.fused_backward else "blocks_to_swap" if self.blocks_to_swap else
                 "parallel fsdp" if self.parallel == "fsdp" else "")
        if self.text.trained and clash:
            return f"train_text_encoder {self.train_text_encoder} is not supported with {clash}: turn one of them off"
        return None

    @cached_property
    def objective(self) -> ObjectiveConfig:
        return view(self, ObjectiveConfig)

    @cached_property
    def adapter(self) -> LoraSpec | None:
        """The LoRA's shape (method lora), else None."""
        if self.method != "lora":
            return None
        return LoraSpec(self.lora_preset, self.lora_rank, self.lora_alpha, self.lora_dropout, self.dora,
                        self.adapter_type)

    @cached_property
    def unet(self) -> UnetConfig:
        return view(self, UnetConfig)

    @cached_property
    def text(self) -> TextConfig:
        return view(self, TextConfig)

    @cached_property
    def offload(self) -> OffloadConfig:
        return view(self, OffloadConfig)

    @cached_property
    def optim(self) -> OptimizerConfig:
        return view(self, OptimizerConfig)

    @cached_property
    def data(self) -> DataConfig:
        return view(self, DataConfig)

    @cached_property
    def checkpointing(self) -> CheckpointConfig:
        return view(self, CheckpointConfig)

    @cached_property
    def logging(self) -> LogConfig:
        return view(self, LogConfig)

    @cached_property
    def holdout_set(self) -> HoldoutConfig:
        return view(self, HoldoutConfig)

    @cached_property
    def previews(self) -> PreviewConfig:
        return view(self, PreviewConfig)

    @property
    def decode_pixels(self) -> bool:
        """Whether train decodes the crops' stored images: the VAE target trains on them, the UNet does not."""
        return self.target == "vae"

    @cached_property
    def vae_target(self) -> VaeConfig:
        return view(self, VaeConfig)




#: the train stage's config: every option of the groups, flat
Config = compose("Config", (RunOptions, UnetConfig, AdapterOptions, TextConfig, ObjectiveConfig, OptimizerConfig,
                            DataConfig, OffloadConfig, CheckpointConfig, LogConfig, HoldoutConfig, PreviewConfig,
                            VaeConfig), _Checks, __name__)
