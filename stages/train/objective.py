"""The training objective as small pure functions: timestep sampling, targets, weights (the schedules and sigmas
themselves live in shared/models/schedules.py, shared with the samplers).

k-diffusion's σ view throughout: x_σ = x0 + σ·ε, fed to the UNet as x_σ / sqrt(σ² + 1); σ = sqrt((1 − ᾱ)/ᾱ),
SNR = 1/σ². Sources: Lin et al. 2023 (zero terminal SNR), Ossa et al. 2024 / NovelAI V3 (σ_max ≈ 20000 as a
practical infinity), Karras et al. 2022 (sigma ladder), Hang et al. 2023 (min-SNR-γ), Esser et al. 2024 / SD3
(rectified flow, logit-normal timesteps, resolution shift).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shared.core.config import SEED_RANGE, opt
from shared.core.registry import Registry
from shared.models.schedules import (  # noqa: F401  (part of the objective's vocabulary)
    NOVELAI_SIGMA_MAX, alpha_s, flow_shift, karras_sigmas, resolution_scale, rescale_zero_terminal_snr,
    scaled_linear_alphas_cumprod, schedule, sigmas)


# --- the registries: loss functions and loss weightings, one entry per name ---------------------------------

@dataclass(frozen=True)
class Loss:
    """A loss function users pick by name (`loss = ...`): the loss of each element of the prediction against the
    target, given each sample's noise level (σ, or t for flow) and the objective (for schedules of a threshold);
    the step averages it over the elements of each sample."""
    name: str
    help: str
    elementwise: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, ObjectiveConfig], torch.Tensor]


@dataclass(frozen=True)
class Weighting:
    """A per-sample loss weighting by noise level users pick by name (`loss_weighting = ...`): the weight of each
    sample from its σ (t for flow) and the objective; `problem` says why a config cannot use it."""
    name: str
    help: str
    weight: Callable[[torch.Tensor, ObjectiveConfig], torch.Tensor]
    problem: Callable[[ObjectiveConfig], str | None] = lambda cfg: None


LOSSES: Registry[Loss] = Registry("loss")
WEIGHTINGS: Registry[Weighting] = Registry("loss weighting")

LOSSES.add(Loss("l2", "squared error (the usual diffusion loss).",
                lambda pred, target, level, cfg: (pred.float() - target.float()) ** 2))
WEIGHTINGS.add(Weighting("none", "every noise level weighs 1.", lambda level, cfg: torch.ones_like(level).float()))


def _min_snr_problem(cfg: ObjectiveConfig) -> str | None:
    if cfg.prediction == "flow":
        return "min_snr weighting (min_snr_gamma) applies to epsilon / v prediction, not to flow"
    if not cfg.min_snr_gamma:
        return "loss_weighting min_snr needs its γ: set min_snr_gamma (5 is usual)"
    return None


WEIGHTINGS.add(Weighting("min_snr", "min-SNR-γ (Hang et al. 2023; γ = min_snr_gamma).",
                         lambda level, cfg: min_snr_weight(level, cfg.min_snr_gamma, cfg.prediction), _min_snr_problem))


@dataclass(frozen=True, kw_only=True)
class ObjectiveConfig:
    """What a training step optimises and the per-sample draws it makes (options of `sdxl train`; used by
    step.py, which passes these functions plain values)."""
    prediction: str = opt("epsilon", "What the UNet predicts: noise, v (needed with zero-terminal-SNR), or "
                                     "the rectified-flow velocity ε − x0.", choices=("epsilon", "v_prediction", "flow"))
    schedule: str = opt("sdxl", "Noise schedule: SDXL's scaled linear (σ 0.029 … 14.6), zero terminal SNR, or "
                                "NovelAI's (zero terminal SNR with σ_max 20000).", choices=("sdxl", "ztsnr", "novelai"))
    timesteps: str = opt("uniform", "Timestep sampling.", choices=("uniform", "logit_normal"))
    logit_mean: float = opt(0.0, "Mean of the logit-normal timestep distribution.")
    logit_std: float = opt(1.0, "Standard deviation of the logit-normal timestep distribution.", gt=0)
    flow_shift: float = opt(1.0, "Rectified flow only: SD3's timestep shift (> 1 puts more weight on noise).", gt=0)
    min_snr_gamma: float = opt(0.0, "γ of min-SNR-γ loss weighting (5 is usual); 0 = off.", ge=0)
    noise_offset: float = opt(0.0, "Noise offset (0.03–0.1 typical); 0 = off.", ge=0)
    tag_weighting: bool = opt(True, "Weight each sample's loss by its tag-frequency weight from ingest.")
    caption_dropout: float = opt(0.0, "Probability of training a sample with the empty caption's embedding.",
                                 ge=0, le=1)
    flip_rate: float = opt(0.5, "Probability of using the flipped latent (when encode stored latent_flip).", ge=0, le=1)
    seed: int = opt(0, "Seed of shard order, shuffling, noise, timesteps, caption and flip choices.", **SEED_RANGE)
    resolution_noise: bool = opt(False, "Resolution-aware noise: multiply σ (flow: the shift) by sqrt(H·W)/"
                                        "resolution_base of each batch's bucket (twice the side, twice the σ; "
                                        "NovelAI V3, SD3); the UNet is given the timestep of the σ it sees.")
    resolution_base: int = opt(1024, "The image side at which resolution-aware noise leaves σ unchanged.", ge=64)
    prior_loss_weight: float = opt(1.0, "DreamBooth prior preservation: the loss weight λ of class images (an "
                                         "ingest source with role = \"class\"); instance images weigh 1.",
                                   ge=0, le=1000)
    loss: str = opt("l2", "The loss of the prediction against the target, per element.", choices=LOSSES)
    loss_weighting: str = opt("none", "The per-sample loss weighting by noise level (min_snr_gamma > 0 alone "
                                      "selects min_snr).", choices=WEIGHTINGS)

    @property
    def weighting(self) -> str:
        """The weighting in force: `loss_weighting`, where min_snr_gamma > 0 alone (the key that came first)
        selects min_snr."""
        return "min_snr" if self.loss_weighting == "none" and self.min_snr_gamma else self.loss_weighting


def sample_u(batch: int, mode: str, generator: torch.Generator, mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
    """Continuous t in [0, 1): uniform, or logit-normal (t = sigmoid(u), u ~ N(mean, std²))."""
    if mode == "uniform":
        return torch.rand(batch, generator=generator, dtype=torch.float64)
    if mode == "logit_normal":
        return torch.sigmoid(torch.randn(batch, generator=generator, dtype=torch.float64) * std + mean)
    raise ValueError(f"unknown timestep sampling {mode!r}")


def offset_noise(shape: tuple, offset: float, generator: torch.Generator, dtype=torch.float32) -> torch.Tensor:
    """ε + offset·n, n ~ N(0, 1) of shape [B, C, 1, 1] (one shift of mean colour per sample and channel)."""
    noise = torch.randn(shape, generator=generator, dtype=dtype)
    if offset:
        noise = noise + offset * torch.randn(shape[:2] + (1,) * (len(shape) - 2), generator=generator, dtype=dtype)
    return noise


def _col(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigma.to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def model_input(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """(x0 + σ·ε) / sqrt(σ² + 1) = α·x0 + s·ε: the UNet's input (equal to sqrt(ᾱ)·x0 + sqrt(1 − ᾱ)·ε)."""
    alpha, s = alpha_s(sigma)
    return _col(alpha, x0) * x0 + _col(s, x0) * noise


def target(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, prediction: str) -> torch.Tensor:
    """ε for epsilon prediction; v = α·ε − s·x0 with α = 1/sqrt(1+σ²), s = σ/sqrt(1+σ²) for v-prediction."""
    if prediction == "epsilon":
        return noise
    if prediction == "v_prediction":
        alpha, s = alpha_s(sigma)
        return _col(alpha, x0) * noise - _col(s, x0) * x0
    raise ValueError(f"unknown prediction type {prediction!r}")


def snr(sigma: torch.Tensor) -> torch.Tensor:
    """1/σ² (0 at σ = ∞)."""
    return 1.0 / sigma.double() ** 2


def min_snr_weight(sigma: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """min-SNR-γ loss weight per sample: ε: min(SNR, γ)/SNR; v: min(SNR, γ)/(SNR + 1); x0: min(SNR, γ).
    The ε weight is written as 1 where SNR ≤ γ, so it stays finite (= 1) at SNR 0."""
    r = snr(sigma)
    clipped = r.clamp(max=gamma)
    if prediction == "epsilon":
        w = torch.where(r <= gamma, torch.ones_like(r), gamma / r)
    elif prediction == "v_prediction":
        w = clipped / (r + 1)
    elif prediction == "sample":
        w = clipped
    else:
        raise ValueError(f"unknown prediction type {prediction!r}")
    return w.float()


def weighting_problem(cfg: ObjectiveConfig) -> str | None:
    """Why the weighting in force cannot train this objective (None: it can)."""
    if cfg.min_snr_gamma and cfg.weighting != "min_snr":
        return f"min_snr_gamma is the γ of min_snr weighting, but loss_weighting is {cfg.loss_weighting}: set one"
    return WEIGHTINGS[cfg.weighting].problem(cfg)


def flow_input(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rectified flow: x_t = (1 − t)·x0 + t·ε and its target ε − x0."""
    tt = _col(t, x0)
    return (1 - tt) * x0 + tt * noise, noise - x0
