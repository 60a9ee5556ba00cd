"""How the trained weights are stepped: AdamW, the learning-rate schedule (diffusers'), the EMA of the weights,
and the limits of a step (gradient clipping, the non-finite step guard). The schedule and the EMA are checkpoint
parts (state_dict / load_state_dict); AdamW is one as it is."""
from __future__ import annotations

import contextlib
import re
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from stages.train.model import TrainedWeights

SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


@dataclass(frozen=True)
class OptimizerConfig:
    """AdamW, its learning-rate schedule, clipping, the EMA and the bad-step guard (flat keys of the same names)."""
    learning_rate: float   # peak learning rate, reached after warmup
    lr_schedule: str       # one of SCHEDULES, after `warmup_steps` of linear warmup from 0
    warmup_steps: int      # linear warmup steps (every schedule, constant included)
    lr_cycles: int         # cosine_with_restarts: number of cosine cycles (hard restarts)
    lr_power: float        # polynomial: the decay's power (1 = linear)
    lr_end: float          # polynomial: the learning rate at the last step
    adam_beta1: float
    adam_beta2: float
    adam_eps: float
    weight_decay: float    # AdamW's decoupled weight decay
    max_grad_norm: float   # clip the global gradient norm to this; 0 = no clipping
    max_bad_steps: int     # stop after this many non-finite steps in a row
    ema_decay: float       # EMA of the trained weights; 0 = none


def make_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_eps, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: OptimizerConfig, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule `cfg.lr_schedule` over `total` steps; `constant` warms up too (diffusers' own `constant`
    ignores warmup, so it is its constant_with_warmup), and `polynomial` ends at `lr_end` (which diffusers'
    get_scheduler does not pass on)."""
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    if cfg.lr_schedule == "polynomial":
        return get_polynomial_decay_schedule_with_warmup(opt, cfg.warmup_steps, total, lr_end=cfg.lr_end,
                                                         power=cfg.lr_power)
    name = "constant_with_warmup" if cfg.lr_schedule == "constant" else cfg.lr_schedule
    return get_scheduler(name, opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=total,
                         num_cycles=cfg.lr_cycles)


class LRSchedule:
    """The learning rate of each optimizer step: peak · f(step), f a pure function of the step (diffusers'
    schedules are LambdaLRs). As a checkpoint part its state is the step; the peak, shape and length come from
    the config, so a resume forced with another learning rate or length follows the new config (as torchtitan's
    does). `step()` once per optimizer step, skipped steps included, keeps the schedule on the step count."""

    def __init__(self, opt: torch.optim.Optimizer, cfg: OptimizerConfig, total: int):
        self.scheduler = make_scheduler(opt, cfg, total)

    @property
    def lr(self) -> float:
        """The learning rate of the coming step."""
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
    """Exponential moving average of the trained weights (float32), with the usual warmup of the decay:
    decay_t = min(decay, (1 + t) / (10 + t)). Its checkpoint state is the averages under the names of the
    trained weights (what export reads as `--weights ema`)."""

    def __init__(self, weights: TrainedWeights, params: list[torch.nn.Parameter], decay: float):
        self.weights, self.params, self.decay = weights, params, decay
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

    def state_dict(self) -> dict[str, torch.Tensor]:
        with self.swapped():
            return {k: v.to("cpu", copy=True) for k, v in self.weights.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        saved = [p.detach().clone() for p in self.params]
        self.weights.load_state_dict(state)
        for s, p, live in zip(self.shadow, self.params, saved):
            s.copy_(p.detach().float())
            p.copy_(live)
