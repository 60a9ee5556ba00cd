"""Noise schedules in k-diffusion's σ view, shared by training (stages/train/objective.py) and sampling
(shared/models/sampling.py): x_σ = x0 + σ·ε, fed to the UNet as x_σ / sqrt(σ² + 1); σ = sqrt((1 − ᾱ)/ᾱ),
SNR = 1/σ². Sources: Lin et al. 2023 (zero terminal SNR), Ossa et al. 2024 / NovelAI V3 (σ_max ≈ 20000 as a
practical infinity), Karras et al. 2022 (sigma ladder), Esser et al. 2024 / SD3 (rectified-flow shift).
"""
from __future__ import annotations

import math

import torch

NOVELAI_SIGMA_MAX = 20000.0
SCHEDULES = ("sdxl", "ztsnr", "novelai")
BASE_SIDE = 1024  # SDXL's base resolution, the side at which resolution-aware scaling is 1


def scaled_linear_alphas_cumprod(steps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012) -> torch.Tensor:
    """SDXL's schedule: betas = linspace(sqrt(beta_start), sqrt(beta_end), steps)², ᾱ = cumprod(1 − β)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, steps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023: shift and scale sqrt(ᾱ) so the last step is 0 (SNR 0) and the first is unchanged."""
    root = alphas_cumprod.sqrt()
    first, last = root[0].clone(), root[-1].clone()
    root = (root - last) * first / (first - last)
    return root ** 2


def sigmas(alphas_cumprod: torch.Tensor, sigma_max: float | None = None) -> torch.Tensor:
    """σ per step; an infinite σ (ᾱ = 0 after zero-terminal-SNR rescaling) becomes `sigma_max` when given
    (NovelAI: 20000)."""
    s = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    if sigma_max is not None:
        s = torch.where(torch.isfinite(s), s.clamp(max=sigma_max), torch.full_like(s, sigma_max))
    return s


def schedule(kind: str, steps: int = 1000) -> torch.Tensor:
    """Training sigmas per step for `kind`: `sdxl` (scaled linear, σ 0.0292 … 14.6), `ztsnr` (rescaled to zero
    terminal SNR, last σ = ∞) or `novelai` (zero terminal SNR with the last σ set to 20000)."""
    ac = scaled_linear_alphas_cumprod(steps)
    if kind == "sdxl":
        return sigmas(ac)
    ac = rescale_zero_terminal_snr(ac)
    if kind == "ztsnr":
        return sigmas(ac)
    if kind == "novelai":
        return sigmas(ac, NOVELAI_SIGMA_MAX)
    raise ValueError(f"unknown schedule {kind!r}")


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """σ_i = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ, i = 0 … n−1 (descending)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def resolution_scale(height: int, width: int, base: int = BASE_SIDE) -> float:
    """Resolution-aware σ factor: sqrt(H·W)/base (double the side, double σ)."""
    return math.sqrt(height * width) / base


def flow_shift(t: torch.Tensor, shift: float) -> torch.Tensor:
    """SD3's resolution shift: t' = shift·t / (1 + (shift − 1)·t)."""
    return shift * t / (1 + (shift - 1) * t)


def alpha_s(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α = 1/sqrt(1+σ²) and s = σ/sqrt(1+σ²) (float64), written so that σ = ∞ gives α = 0, s = 1."""
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    alpha = 1.0 / (sigma ** 2 + 1).sqrt()
    return alpha, (1.0 - alpha ** 2).sqrt()
