"""Samplers that match the trained objective, as small pure functions of tensors and sigmas (k-diffusion's
style), used by train's sample images and by `sdxl compare`.

The state is the UNet's own input z = x_σ / sqrt(1 + σ²) = α·x0 + s·ε (α = 1/sqrt(1+σ²), s = σ/sqrt(1+σ²)),
which stays finite at σ = ∞ (zero terminal SNR: z = ε, and v = −x0 there), so no sampler divides by σ.
- ε-prediction: Euler or DPM++ 2M (Lu et al. 2022, "DPM-Solver++") over Karras σ (Karras et al. 2022, ρ = 7).
- v-prediction with zero terminal SNR (Lin et al. 2023): "trailing" timesteps (the first at the last training
  step, SNR 0), the zero-terminal-SNR schedule's σ, and guidance rescale φ = 0.7 against over-exposure.
- NovelAI's progressive ladder (Ossa et al. 2024): 20000, 17.8, 12.4, 9.2, 7.2, 5.4, 3.9, 2.1, 0.9, 0.0292.
- Rectified flow: Euler on t from 1 to 0 through the trained shift t' = s·t / (1 + (s − 1)·t).
Euler in z is DDIM: z' = α'·x̂0 + s'·ε̂ (the same as k-diffusion's Euler in x_σ); DPM++ 2M replaces x̂0 by its
multistep extrapolation. Written by hand: diffusers' schedulers each hold one of these, with state; here one
function takes a model callable and returns the sample, which an ideal denoiser can test exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from shared.models.schedules import (NOVELAI_SIGMA_MAX, SCHEDULES, alpha_s, flow_shift, karras_sigmas,
                                     resolution_scale, schedule)

PREDICTIONS = ("epsilon", "v_prediction", "flow")
SAMPLERS = ("auto", "euler", "dpmpp_2m")
LADDERS = ("auto", "karras", "trailing", "novelai")
NOVELAI_LADDER = (20000.0, 17.8, 12.4, 9.2, 7.2, 5.4, 3.9, 2.1, 0.9, 0.0292)
ZTSNR_GUIDANCE_RESCALE = 0.7
TRAIN_STEPS = 1000
LATENT_FACTOR = 8  # pixels per latent cell (SDXL's VAE)

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (UNet input, timestep) -> prediction


@dataclass(frozen=True)
class Objective:
    """What the model was trained to predict (recorded by train; export copies it into its metadata)."""
    prediction: str = "epsilon"   # epsilon | v_prediction | flow
    schedule: str = "sdxl"        # sdxl | ztsnr | novelai (the training sigmas)
    flow_shift: float = 1.0       # flow: the trained shift of t
    resolution_base: int = 0      # resolution-aware noise: σ (flow: shift) times sqrt(H·W)/base; 0 = off

    def __post_init__(self) -> None:
        if self.prediction not in PREDICTIONS:
            raise ValueError(f"unknown prediction type {self.prediction!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}")

    @property
    def zero_terminal_snr(self) -> bool:
        return self.schedule in ("ztsnr", "novelai")

    def to_dict(self) -> dict:
        return {"prediction": self.prediction, "schedule": self.schedule, "flow_shift": self.flow_shift,
                "resolution_base": self.resolution_base}

    @classmethod
    def from_config(cls, config: dict | None) -> "Objective":
        """From a train config (or `to_dict`'s record); keys it lacks take the defaults (SDXL's ε)."""
        config = config or {}
        base = config.get("resolution_base") if config.get("resolution_noise", True) else 0
        return cls(config.get("prediction") or "epsilon", config.get("schedule") or "sdxl",
                   float(config.get("flow_shift") or 1.0), int(base or 0))

    @classmethod
    def from_scheduler(cls, config: dict) -> "Objective":
        """A diffusers scheduler config's objective: its prediction type, with zero terminal SNR when it
        rescales the betas to it (v-prediction only: ε cannot be trained there)."""
        v_pred = config.get("prediction_type") == "v_prediction"
        ztsnr = bool(config.get("rescale_betas_zero_snr"))
        return cls("v_prediction" if v_pred else "epsilon", "ztsnr" if ztsnr and v_pred else "sdxl")

    def scale(self, height: int, width: int) -> float:
        """The resolution-aware factor of an image of this size (1 when off)."""
        return resolution_scale(height, width, self.resolution_base) if self.resolution_base else 1.0


@dataclass(frozen=True)
class Sampler:
    """How to sample: the step rule, the σ ladder and the guidance rescale φ (0 = plain CFG)."""
    method: str             # euler | dpmpp_2m (flow: euler)
    ladder: str             # karras | trailing | novelai | flow
    guidance_rescale: float


def choose(objective: Objective, method: str = "auto", ladder: str = "auto",
           guidance_rescale: float | None = None) -> Sampler:
    """The sampler matching the objective, with the asked parts in place of `auto`. A choice that cannot
    sample this objective is a ValueError naming both."""
    if method not in SAMPLERS or ladder not in LADDERS:
        raise ValueError(f"unknown sampler {method!r} or sigma ladder {ladder!r}")
    if objective.prediction == "flow":
        if method == "dpmpp_2m" or ladder not in ("auto",):
            raise ValueError(f"a rectified-flow model samples with flow-matching Euler on its shifted t; "
                             f"sampler {method} / sigmas {ladder} apply to epsilon and v-prediction models")
        return Sampler("euler", "flow", guidance_rescale or 0.0)
    ztsnr = objective.zero_terminal_snr
    if ladder == "novelai" and objective.prediction != "v_prediction":
        raise ValueError("the NovelAI sigma ladder starts at σ 20000, where an epsilon-prediction model sees "
                         "only noise; it needs a v-prediction model")
    default_ladder = "trailing" if ztsnr else "karras"
    default_method = "euler" if ztsnr else "dpmpp_2m"
    rescale = guidance_rescale if guidance_rescale is not None else (ZTSNR_GUIDANCE_RESCALE if ztsnr else 0.0)
    return Sampler(default_method if method == "auto" else method, default_ladder if ladder == "auto" else ladder,
                   rescale)


def _finite_table(table: torch.Tensor) -> torch.Tensor:
    """The training sigmas with an infinite last σ read as NovelAI's practical infinity (for interpolation)."""
    return torch.where(torch.isfinite(table), table, torch.full_like(table, NOVELAI_SIGMA_MAX))


def sigma_to_timestep(sigma: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """The (fractional) training step of each σ: linear interpolation of log σ over the schedule's steps, as
    k-diffusion does; σ beyond the table's ends is clamped to its first / last step."""
    logs = _finite_table(table).double().log()
    s = torch.as_tensor(sigma, dtype=torch.float64).clamp(min=float(table[0]))
    s = torch.where(torch.isfinite(s), s, torch.full_like(s, NOVELAI_SIGMA_MAX))
    ls = s.log().clamp(float(logs[0]), float(logs[-1]))
    hi = torch.searchsorted(logs, ls).clamp(1, len(logs) - 1)
    lo = hi - 1
    w = (ls - logs[lo]) / (logs[hi] - logs[lo])
    return lo.double() + w


def timestep_to_sigma(t: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """σ at a (fractional) training step: the table at whole steps (∞ included), log-linear between them."""
    t = torch.as_tensor(t, dtype=torch.float64).clamp(0, len(table) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(table) - 1)
    w = t - lo.double()
    logs = _finite_table(table).double().log()
    between = (logs[lo] * (1 - w) + logs[hi] * w).exp()
    return torch.where(w == 0, table.double()[lo], between)


@dataclass(frozen=True)
class Ladder:
    """Descending noise levels, one more than the model calls: σ for ε / v (ending at 0), t for flow (ending
    at 0), and the timestep the UNet is given at each call."""
    levels: torch.Tensor      # float64 [n + 1]
    timesteps: torch.Tensor   # float64 [n]


def ladder(objective: Objective, kind: str, steps: int, scale: float = 1.0) -> Ladder:
    """The noise levels of `steps` model calls (the NovelAI ladder is its own 10 calls, whatever `steps`).
    `scale` is resolution-aware noise's factor: σ times it (flow: the shift), each call given the timestep of
    the σ it sees, as in training."""
    if kind == "flow":
        t = flow_shift(torch.linspace(1, 0, steps + 1, dtype=torch.float64), objective.flow_shift * scale)
        return Ladder(t, t[:-1] * TRAIN_STEPS)  # the timestep train gives the UNet: t·1000
    table = schedule(objective.schedule, TRAIN_STEPS)
    if kind == "trailing":  # diffusers' "trailing" spacing: round(arange(T, 0, −T/n)) − 1
        steps_at = torch.round(torch.arange(TRAIN_STEPS, 0, -TRAIN_STEPS / steps, dtype=torch.float64)) - 1
        levels = table[steps_at.long()]
        if scale != 1.0:
            levels = levels * scale
            return Ladder(torch.cat([levels, levels.new_zeros(1)]), sigma_to_timestep(levels, table))
        return Ladder(torch.cat([levels, levels.new_zeros(1)]), steps_at)
    if kind == "karras":
        top = min(float(_finite_table(table)[-1]), NOVELAI_SIGMA_MAX)
        levels = karras_sigmas(steps, float(table[0]), top)
    elif kind == "novelai":
        levels = torch.tensor(NOVELAI_LADDER, dtype=torch.float64)
    else:
        raise ValueError(f"unknown sigma ladder {kind!r}")
    levels = levels * scale
    return Ladder(torch.cat([levels, levels.new_zeros(1)]), sigma_to_timestep(levels, table))


def denoised(out: torch.Tensor, z: torch.Tensor, sigma: float, prediction: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x̂0, ε̂) from the model output at state z and level σ: ε: x̂0 = (z − s·ε̂)/α; v: x̂0 = α·z − s·v̂,
    ε̂ = s·z + α·v̂ (finite at σ = ∞)."""
    alpha, s = (float(v) for v in alpha_s(torch.tensor(sigma, dtype=torch.float64)))
    if prediction == "epsilon":
        if alpha == 0:
            raise ValueError("an epsilon-prediction model cannot be sampled from σ = ∞ (zero terminal SNR)")
        return (z - s * out) / alpha, out
    if prediction == "v_prediction":
        return alpha * z - s * out, s * z + alpha * out
    raise ValueError(f"unknown prediction type {prediction!r}")


def sample(model: Model, noise: torch.Tensor, objective: Objective, sampler: Sampler, steps: int) -> torch.Tensor:
    """The clean sample (x0, in the latent space) from the starting noise; `model(z, timestep)` returns the
    objective's prediction (with classifier-free guidance already applied, see `guided`)."""
    scale = objective.scale(noise.shape[-2] * LATENT_FACTOR, noise.shape[-1] * LATENT_FACTOR)
    lad = ladder(objective, sampler.ladder, steps, scale)
    if sampler.ladder == "flow":
        return flow_euler(model, noise, lad)
    return sigma_steps(model, noise, lad, objective.prediction, second_order=sampler.method == "dpmpp_2m")


def sigma_steps(model: Model, noise: torch.Tensor, lad: Ladder, prediction: str, second_order: bool) -> torch.Tensor:
    """Euler (DDIM) or DPM++ 2M over σ, in z. The start z = noise (unit variance, as diffusers starts)."""
    sig = [float(v) for v in lad.levels]
    z, previous = noise.double(), None
    for i in range(len(sig) - 1):
        sigma, nxt = sig[i], sig[i + 1]
        out = model(z.to(noise.dtype), lad.timesteps[i:i + 1].to(noise.dtype)).double()
        x0, eps = denoised(out, z, sigma, prediction)
        d = x0
        if second_order and previous is not None and nxt > 0 and math.isfinite(sig[i - 1]):
            r = math.log(sig[i - 1] / sigma) / math.log(sigma / nxt)  # h_last / h, in log σ
            d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous
        ratio = nxt / sigma if math.isfinite(sigma) else 0.0  # e^(−h)
        a_n, s_n = (float(v) for v in alpha_s(torch.tensor(nxt, dtype=torch.float64)))
        z = s_n * eps + a_n * (ratio * x0 + (1 - ratio) * d)
        previous = x0
    return z.to(noise.dtype)


def flow_euler(model: Model, noise: torch.Tensor, lad: Ladder) -> torch.Tensor:
    """Rectified-flow Euler: x_t' = x_t + (t' − t)·v̂ with v̂ the predicted ε − x0, from t = 1 (pure noise)."""
    t = [float(v) for v in lad.levels]
    x = noise.double()
    for i in range(len(t) - 1):
        v = model(x.to(noise.dtype), lad.timesteps[i:i + 1].to(noise.dtype)).double()
        x = x + (t[i + 1] - t[i]) * v
    return x.to(noise.dtype)


def guided(uncond: torch.Tensor, cond: torch.Tensor, scale: float, rescale: float = 0.0) -> torch.Tensor:
    """Classifier-free guidance, uncond + scale·(cond − uncond); with rescale φ > 0 (Lin et al. 2023, §3.4)
    the result's per-sample std is pulled toward the conditional prediction's: φ·g·std(cond)/std(g) + (1 − φ)·g."""
    g = uncond + scale * (cond - uncond)
    if not rescale:
        return g
    dims = tuple(range(1, g.ndim))
    matched = g * cond.std(dim=dims, keepdim=True) / g.std(dim=dims, keepdim=True).clamp(min=1e-12)
    return rescale * matched + (1 - rescale) * g
