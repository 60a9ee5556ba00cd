"""How the trained weights are stepped: the optimizer (by name, with per-group learning rates), the learning-rate
schedule (diffusers'), the EMA of the weights, and the limits of a step (gradient clipping, the bad-step guard).
Every one is a checkpoint part (state_dict / load_state_dict; the optimizers' own, stored without pickle).

Optimizers: `adamw` (torch; fused kernel on CUDA), `adamw8bit` / `paged_adamw8bit` / `lion` (bitsandbytes, 8-bit
states), `adafactor` (transformers'), `prodigy` (prodigyopt), `schedulefree_adamw` (schedulefree). For bf16
weights (a full fine-tune with weights_dtype bfloat16) `adamw` and `adafactor` round their update stochastically
and/or keep a Kahan buffer (bf16.py) unless both are turned off."""
from __future__ import annotations

import contextlib
import importlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch

from shared.core.errors import ConfigError
from shared.core.log import warn
from shared.core.registry import Registry
from shared.core.config import opt
from shared.core.groups import borrowed
from stages.train import bf16, fused
from stages.train.model import TrainedWeights

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
#: bitsandbytes keeps the state of a parameter with fewer elements than this in float32, and quantizes the rest
#: in blocks of BNB_BLOCK elements (one float32 absmax each)
BNB_MIN_8BIT, BNB_BLOCK = 4096, 256


#: the optimizers by name (their entries are added below, after the makers)
OPTIMIZERS: Registry[Optimizer] = Registry("optimizer")


@dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """The optimizer, its learning-rate schedule, clipping, the EMA and the bad-step guard: options of `sdxl
    train` (config.py composes them)."""
    optimizer: str = opt("adamw", "The optimizer (those of other packages say which `pip install` they need).",
                         choices=OPTIMIZERS)
    learning_rate: float = opt(1e-4, "Peak learning rate of every parameter group without its own (unet_lr, "
                                     "adapter_lr); prodigy: the multiplier of its estimated step (1.0 usual).", gt=0)
    unet_lr: float | None = opt(None, "Peak learning rate of the UNet's own weights (method full) "
                                      "[default: learning_rate].", gt=0)
    adapter_lr: float | None = opt(None, "Peak learning rate of the LoRA weights on the UNet (method lora) "
                                         "[default: learning_rate].", gt=0)
    vae_lr: float | None = opt(None, "Target vae: peak learning rate of the VAE's weights [default: "
                                     "learning_rate].", gt=0)
    lr_schedule: str = opt("constant", "Learning-rate schedule after warmup (diffusers' schedules): constant, linear "
                                       "or cosine to 0, cosine_with_restarts (lr_cycles cycles), polynomial (power "
                                       "lr_power down to lr_end); constant_with_warmup is constant.", choices=SCHEDULES)
    warmup_steps: int = opt(0, "Linear warmup steps from 0 to the peak learning rate.", ge=0)
    lr_cycles: int = opt(1, "cosine_with_restarts: number of cosine cycles (hard restarts).", ge=1)
    lr_power: float = opt(1.0, "polynomial: power of the decay (1 = linear).", gt=0)
    lr_end: float = opt(1e-7, "polynomial: learning rate at the last step (below learning_rate).", ge=0)
    adam_beta1: float = opt(0.9, "AdamW β1.", ge=0, lt=1)
    adam_beta2: float = opt(0.999, "AdamW β2.", ge=0, lt=1)
    adam_eps: float = opt(1e-8, "AdamW ε.", gt=0)
    weight_decay: float = opt(0.01, "AdamW decoupled weight decay.", ge=0)
    stochastic_rounding: bool = opt(True, "bf16 weights (full fine-tune, weights_dtype bfloat16) with adamw or "
                                          "adafactor: round each update (and AdamW's bf16 moments) to bf16 "
                                          "stochastically, so updates below bf16's resolution add up in "
                                          "expectation instead of being lost; false = round to nearest.")
    kahan_summation: bool = opt(False, "bf16 weights with adamw or adafactor: keep each update's rounding error in "
                                       "a bf16 buffer (2 more bytes per weight) and add it into the next update.")
    adafactor_relative_step: bool = opt(False, "adafactor: its own step size 1/sqrt(step) instead of "
                                               "learning_rate and its schedule (kohya's full fine-tune: false).")
    adafactor_scale_parameter: bool = opt(False, "adafactor: scale the step by each weight's RMS.")
    adafactor_warmup_init: bool = opt(False, "adafactor with relative step: warm the step up from 1e-6 per step.")
    prodigy_d_coef: float = opt(1.0, "prodigy: multiplier of the estimated step size d.", gt=0)
    prodigy_decouple: bool = opt(True, "prodigy: AdamW-style decoupled weight decay.")
    prodigy_bias_correction: bool = opt(True, "prodigy: Adam's bias correction.")
    prodigy_safeguard_warmup: bool = opt(True, "prodigy: leave the learning rate out of d's denominator during "
                                               "warmup.")
    fused_backward: bool = opt(False, "Step each weight inside the backward pass as soon as its gradient is ready, "
                                      "and free that gradient: the whole model's gradients never exist together "
                                      "(adamw, adafactor; needs accumulate 1 and max_grad_norm 0; one process).",
                               fingerprint=False)
    max_grad_norm: float = opt(1.0, "Clip the gradient's global norm to this; 0 = no clipping.", ge=0)
    max_bad_steps: int = opt(5, "Stop after this many optimizer steps in a row with a NaN/inf loss or "
                                "gradient (each is skipped and counted).", fingerprint=False, ge=1)
    ema_decay: float = opt(0.0, "Keep an exponential moving average of the trained weights (e.g. 0.999); 0 = off.",
                           ge=0, lt=1)
    ema_device: str = opt("device", "Where the EMA (float32, 4 bytes per trained weight) is kept: beside the "
                                    "weights, or in CPU memory (device memory spared; each update copies the "
                                    "weights over).", choices=("device", "cpu"), fingerprint=False)
    ema_every: int = opt(1, "Update the EMA every N optimizer steps (its decay raised to the power N, so it "
                            "averages over as many steps).", ge=1)
    accumulate: int = borrowed()
    mixed_precision: str = borrowed()
    text_encoder_lr: float | None = opt(None, "Peak learning rate of the trained text encoders (their LoRA or "
                                              "their own weights; 5e-6 is usual for a full fine-tune) "
                                              "[default: learning_rate].", gt=0)
    text_encoder_2_lr: float | None = opt(None, "Peak learning rate of text encoder 2 (OpenCLIP ViT-bigG) alone "
                                                "[default: text_encoder_lr].", gt=0)

    def problem(self) -> str | None:
        """Why this combination cannot be trained (None: it can)."""
        entry = OPTIMIZERS[self.optimizer]
        if self.fused_backward:
            if not entry.fusable:
                fusable = " and ".join(OPTIMIZERS.where(fusable=True))
                return (f"fused_backward works with {fusable}, not {self.optimizer} (each parameter gets its own "
                        f"optimizer there)")
            if self.accumulate > 1:
                return (f"fused_backward steps each weight as soon as its gradient is ready, so it cannot "
                        f"accumulate {self.accumulate} micro-batches: set accumulate 1 (and a larger batch_size), "
                        f"or turn fused_backward off")
            if self.max_grad_norm > 0:
                return ("fused_backward steps each weight before the global gradient norm exists, so it cannot "
                        "clip to max_grad_norm: set max_grad_norm 0, or turn fused_backward off")
            if self.mixed_precision == "fp16":
                return "fused_backward cannot unscale fp16 gradients before the step: use mixed_precision bf16 or no"
        if entry.schedule_free and self.lr_schedule not in ("constant", "constant_with_warmup"):
            return (f"{self.optimizer} replaces the learning-rate schedule (it warms up for warmup_steps itself): "
                    f"set lr_schedule constant, not {self.lr_schedule}")
        if self.kahan_summation and not entry.rounds_bf16:
            rounding = " and ".join(OPTIMIZERS.where(rounds_bf16=True))
            return f"kahan_summation is a buffer of {rounding}, not of {self.optimizer}"
        return entry.problem(self) if entry.problem else None

    def group_lr(self, name: str) -> float:
        """The peak learning rate of the parameter group `name` (see model.trainable_groups)."""
        if name.startswith(("te1", "te2")):   # the text encoders' groups (textenc.py): te1, te2_adapter, ...
            own = self.text_encoder_2_lr if name.startswith("te2") else None
            own = own if own is not None else self.text_encoder_lr
            return own if own is not None else self.learning_rate
        own = {"unet": self.unet_lr, "adapter": self.adapter_lr, "vae": self.vae_lr}.get(name)
        return own if own is not None else self.learning_rate


def param_groups(cfg: OptimizerConfig, named: dict[str, list[torch.nn.Parameter]]) -> list[dict]:
    """Optimizer parameter groups, one per non-empty named group, each with its own learning rate."""
    return [{"name": name, "params": params, "lr": cfg.group_lr(name)} for name, params in named.items() if params]


def require(optimizer: str) -> Any:
    """The optional package `optimizer` needs, or a one-line error naming `pip install <pkg>`."""
    package = OPTIMIZERS[optimizer].package
    assert package is not None, optimizer
    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"optimizer {optimizer} needs the {package} package: pip install {package}") from None


def make_optimizer(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int = 0
                   ) -> torch.optim.Optimizer:
    """The configured optimizer over `groups` (param_groups' dicts). `seed` keys the stochastic rounding;
    `first_index` is the index of the groups' first parameter among all trained ones (fused backward)."""
    opt = OPTIMIZERS[cfg.optimizer].make(cfg, groups, seed, first_index)
    if hasattr(opt, "train"):
        opt.train()  # schedule-free starts in train mode (weights at y)
    return opt


def make_stepper(cfg: OptimizerConfig, groups: list[dict], seed: int, world: int) -> torch.optim.Optimizer:
    """The configured optimizer, or with fused_backward one per parameter stepped in the backward pass."""
    if not cfg.fused_backward:
        return make_optimizer(cfg, groups, seed)
    if world > 1:
        raise ConfigError(f"fused_backward steps each weight before DistributedDataParallel has averaged its "
                          f"gradient over the {world} processes: train on one process, or turn it off")
    return fused.FusedBackward(groups, lambda one, index: make_optimizer(cfg, one, seed, index))


def rounds_bf16(cfg: OptimizerConfig, groups: list[dict]) -> bool:
    """Whether the bf16-aware optimizer steps these groups (bf16 weights and rounding or compensation asked)."""
    bf16_weights = any(p.dtype == torch.bfloat16 for g in groups for p in g["params"])
    return OPTIMIZERS[cfg.optimizer].rounds_bf16 and bf16_weights and (cfg.stochastic_rounding or
                                                                      cfg.kahan_summation)


def _adamw(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int) -> torch.optim.Optimizer:
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if rounds_bf16(cfg, groups):
        return bf16.RoundingAdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps,
                                  weight_decay=cfg.weight_decay, seed=seed, stochastic=cfg.stochastic_rounding,
                                  kahan=cfg.kahan_summation, first_index=first_index)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=betas, eps=cfg.adam_eps,
                             weight_decay=cfg.weight_decay, fused=True if on_cuda else None)


def _adafactor(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int) -> torch.optim.Optimizer:
    """kohya's full fine-tune recipe is relative_step, scale_parameter and warmup_init off with a fixed lr; with
    relative_step the group's lr is kept for the logs but unused (Adafactor's 1/sqrt(step) decides)."""
    kw = dict(relative_step=cfg.adafactor_relative_step, scale_parameter=cfg.adafactor_scale_parameter,
              warmup_init=cfg.adafactor_warmup_init, weight_decay=cfg.weight_decay)
    if rounds_bf16(cfg, groups):
        return bf16.RoundingAdafactor(groups, lr=cfg.learning_rate, seed=seed, stochastic=cfg.stochastic_rounding,
                                      kahan=cfg.kahan_summation, first_index=first_index, **kw)
    from transformers.optimization import Adafactor

    lrs = [g["lr"] for g in groups]
    if cfg.adafactor_relative_step:  # transformers refuses an lr with relative_step
        groups = [{k: v for k, v in g.items() if k != "lr"} for g in groups]
    opt = Adafactor(groups, lr=None if cfg.adafactor_relative_step else cfg.learning_rate, **kw)
    for group, lr in zip(opt.param_groups, lrs):
        group["lr"] = lr
    return opt


def _bnb(name: str) -> Callable[..., torch.optim.Optimizer]:
    def make(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int) -> torch.optim.Optimizer:
        kind = getattr(require("adamw8bit").optim, name)
        kw = {} if name.startswith(("Lion", "PagedLion")) else {"eps": cfg.adam_eps}
        # on the CPU bitsandbytes falls back from paged memory, and says so at every step
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return kind(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                    weight_decay=cfg.weight_decay, **kw)
    return make


def _prodigy(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int) -> torch.optim.Optimizer:
    if cfg.learning_rate < 0.1:
        warn(f"prodigy estimates the step size itself and learning_rate {cfg.learning_rate:g} scales it; "
             f"1.0 is usual")
    return require("prodigy").Prodigy(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                      eps=cfg.adam_eps, weight_decay=cfg.weight_decay, decouple=cfg.prodigy_decouple,
                                      use_bias_correction=cfg.prodigy_bias_correction,
                                      safeguard_warmup=cfg.prodigy_safeguard_warmup, d_coef=cfg.prodigy_d_coef)


def _schedulefree(cfg: OptimizerConfig, groups: list[dict], seed: int, first_index: int) -> torch.optim.Optimizer:
    return require("schedulefree_adamw").AdamWScheduleFree(
        groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps,
        weight_decay=cfg.weight_decay, warmup_steps=cfg.warmup_steps)


# --- the registry: one entry per optimizer name ------------------------------------------------------------

StateBytes = Callable[[OptimizerConfig, torch.Size, torch.dtype, bool], int]


@dataclass(frozen=True)
class Optimizer:
    """An optimizer users pick by name (`optimizer = ...`): everything the rest of the code needs of it. Its
    checkpoint state is the torch optimizer's own state_dict (tensors stored without pickle)."""
    name: str
    help: str                     # one sentence for --help
    make: Callable[[OptimizerConfig, list[dict], int, int], torch.optim.Optimizer]  # (cfg, groups, seed, first)
    state_bytes: StateBytes       # --plan: the state one parameter gets (cfg, shape, dtype, bf16 rounding on)
    package: str | None = None    # the pip package it needs beyond the required dependencies
    fusable: bool = False         # can step one parameter alone inside the backward pass (fused.py)
    rounds_bf16: bool = False     # rounds bf16 weights stochastically / keeps a Kahan buffer (bf16.py)
    shardable: bool = False       # steps FSDP's sharded parameters (parallel fsdp)
    schedule_free: bool = False   # replaces the learning-rate schedule (its own warmup; eval/train modes)
    #: --plan: why its step allocates nothing besides its state (cfg, groups) -> reason, None = measure the step
    in_place: Callable[[OptimizerConfig, list[dict]], str | None] = lambda cfg, groups: None
    plan_all_params: bool = False  # --plan measures its step on all parameters (one foreach), not the largest
    problem: Callable[[OptimizerConfig], str | None] | None = None  # its own options' consistency




def _kahan(cfg: OptimizerConfig, n: int, size: int, dtype: torch.dtype, rounding: bool) -> int:
    return n * size if rounding and cfg.kahan_summation and dtype == torch.bfloat16 else 0


def _adamw_bytes(cfg: OptimizerConfig, shape: torch.Size, dtype: torch.dtype, rounding: bool) -> int:
    n, size = shape.numel(), dtype.itemsize
    return 2 * n * size + _kahan(cfg, n, size, dtype, rounding) if rounding else 2 * n * size + 4  # + torch's step


def _bnb_bytes(moments: int) -> StateBytes:
    def state(cfg: OptimizerConfig, shape: torch.Size, dtype: torch.dtype, rounding: bool) -> int:
        n = shape.numel()
        if n < BNB_MIN_8BIT:
            return moments * 4 * n
        return moments * (n + 4 * math.ceil(n / BNB_BLOCK) + 4 * 256)      # uint8 state, absmax, quantile map
    return state


def _adafactor_bytes(cfg: OptimizerConfig, shape: torch.Size, dtype: torch.dtype, rounding: bool) -> int:
    n = shape.numel()
    second = 4 * (shape[:-1].numel() + (shape[:-2] + shape[-1:]).numel()) if len(shape) >= 2 else 4 * n
    return second + 4 + _kahan(cfg, n, dtype.itemsize, dtype, rounding)   # + the RMS scalar


def _copies(k: int) -> StateBytes:
    """k tensors like the parameter (prodigy: s, p0, exp_avg, exp_avg_sq; schedule-free: z, exp_avg_sq)."""
    return lambda cfg, shape, dtype, rounding: k * shape.numel() * dtype.itemsize


def _adafactor_problem(cfg: OptimizerConfig) -> str | None:
    if cfg.adafactor_warmup_init and not cfg.adafactor_relative_step:
        return "adafactor_warmup_init warms up Adafactor's relative step: set adafactor_relative_step true too"
    return None


_IN_PLACE_8BIT = "bitsandbytes' kernels update in place"
for _entry in (
    Optimizer("adamw", "torch's AdamW (its fused kernel on CUDA).", _adamw, _adamw_bytes, fusable=True,
              rounds_bf16=True, shardable=True,
              in_place=lambda cfg, groups: None if rounds_bf16(cfg, groups) else "torch's fused AdamW kernel (CUDA)"),
    Optimizer("adamw8bit", "bitsandbytes' AdamW with 8-bit states.", _bnb("AdamW8bit"), _bnb_bytes(2),
              package="bitsandbytes", in_place=lambda cfg, groups: _IN_PLACE_8BIT),
    Optimizer("paged_adamw8bit", "the same in paged memory.", _bnb("PagedAdamW8bit"), _bnb_bytes(2),
              package="bitsandbytes", in_place=lambda cfg, groups: _IN_PLACE_8BIT),
    Optimizer("adafactor", "transformers' Adafactor (factored second moments).", _adafactor, _adafactor_bytes,
              fusable=True, rounds_bf16=True, problem=_adafactor_problem),
    Optimizer("prodigy", "prodigyopt's Prodigy (estimates its step size; learning_rate 1.0 usual).", _prodigy,
              _copies(4), package="prodigyopt"),
    Optimizer("lion", "bitsandbytes' Lion with 8-bit states.", _bnb("Lion8bit"), _bnb_bytes(1),
              package="bitsandbytes", in_place=lambda cfg, groups: _IN_PLACE_8BIT),
    Optimizer("schedulefree_adamw", "schedulefree's AdamW (no learning-rate schedule).", _schedulefree, _copies(2),
              package="schedulefree", schedule_free=True, plan_all_params=True),
):
    OPTIMIZERS.add(_entry)


@contextlib.contextmanager
def eval_mode(opt: torch.optim.Optimizer | None) -> Iterator[None]:
    """Schedule-free's weights as they are evaluated and saved (x, not the gradient point y) for the block's
    time (nested blocks switch once); other optimizers have no modes. Entering and leaving it is part of the run
(a resume does the same)."""
    switch = opt is not None and hasattr(opt, "eval") and bool(opt.param_groups[0].get("train_mode"))
    if switch:
        opt.eval()
    try:
        yield
    finally:
        if switch:
            opt.train()


def after_restore(opt: torch.optim.Optimizer) -> None:
    """A restored schedule-free optimizer holds the saved x (eval mode); training continues from y."""
    if hasattr(opt, "train"):
        opt.train()


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimizerConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule `cfg.lr_schedule` over `total` steps; `constant` warms up too (diffusers' own `constant`
    ignores warmup, so it is its constant_with_warmup), and `polynomial` ends at `lr_end` (which diffusers'
    get_scheduler does not pass on). Schedule-free warms up itself, so its schedule is a constant 1."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if OPTIMIZERS[cfg.optimizer].schedule_free:
        return get_scheduler("constant", opt)
    if cfg.lr_schedule == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(opt, cfg.warmup_steps, total, lr_end=cfg.lr_end,
                                                         power=cfg.lr_power)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total,
                         num_cycles=cfg.lr_cycles)


class LRSchedule:
    """The learning rate of each optimizer step: peak · f(step), f a pure function of the step (diffusers'
    schedules are LambdaLRs; each group's peak is its own learning rate). As a checkpoint part its state is the
    step; the peaks, shape and length come from the config, so a resume forced with another learning rate or
    length follows the new config (as torchtitan's does). `step()` once per optimizer step, skipped steps
    included, keeps the schedule on the step count."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimizerConfig, total: int):
        self.scheduler = make_scheduler(opt, cfg, total)

    @property
    def lr(self) -> float:
        """The learning rate of the coming step (of the first group)."""
        return float(self.scheduler.get_last_lr()[0])

    def step(self) -> None:
        with warnings.catch_warnings():  # a first step skipped for a non-finite gradient is no misuse
            warnings.filterwarnings("ignore", message=re.escape("Detected call of `lr_scheduler.step()`"))
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"step": self.scheduler.last_epoch, "lr": self.lr}  # lr: for reading; recomputed on load

    def load_state_dict(self, state: dict) -> None:
        """Go to `step` (after the optimizer's state is loaded: this sets its learning rate)."""
        self.scheduler.last_epoch = int(state["step"]) - 1
        self.step()


class EMA:
    """Exponential moving average of the trained weights (float32, on `device`: the weights' own, or the CPU to
    spare device memory), updated every `every` optimizer steps with the usual warmup of the decay,
    decay_t = min(decay, (1 + t) / (10 + t)), raised to the power `every` so that the average spans the same
    number of steps whatever the interval. Its checkpoint state is the averages under the names of the trained
    weights (what export reads as `--weights ema`)."""

    def __init__(self, weights: TrainedWeights, params: list[torch.nn.Parameter], decay: float, every: int = 1,
                 device: torch.device | str | None = None):
        self.weights, self.params, self.decay, self.every = weights, params, decay, every
        self.shadow = [p.detach().to(device or p.device, torch.float32, copy=True) for p in params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After optimizer step `step` (0-based): average in the weights when step + 1 is a multiple of `every`."""
        if (step + 1) % self.every:
            return
        d = min(self.decay, (1 + step) / (10 + step)) ** self.every
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().to(s.device, torch.float32), alpha=1 - d)

    @contextlib.contextmanager
    def swapped(self) -> Iterator[None]:
        """The model's trained parameters temporarily replaced by the averages (the live ones wait on the CPU)."""
        saved = [p.detach().to("cpu", copy=True) for p in self.params]
        with torch.no_grad():
            for p, s in zip(self.params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.swapped():
            return {k: v.to("cpu", copy=True) for k, v in self.weights.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = [p.detach().to("cpu", copy=True) for p in self.params]
        self.weights.load_state_dict(state)
        for s, p, live in zip(self.shadow, self.params, saved):
            s.copy_(p.detach())
            p.copy_(live)
