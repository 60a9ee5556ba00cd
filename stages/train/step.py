"""One training batch: per-sample random choices, the noised input, the UNet call, the weighted loss.

Every random choice of a sample (caption variant, caption dropout, flip, timestep, noise) comes from a
generator seeded by (seed, step, micro-batch, sample id, occurrence): the same sample at the same step gets
the same draws whichever rank holds it and however the batch is split, and a resumed run needs no generator
state to reproduce them. Which of a sample's encoded crops it trains on (encode's crops_per_item) is drawn
per epoch instead (`crop_index`): the same for every use of the sample in one epoch.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from dataclasses import dataclass, field
from typing import Any, ContextManager

import numpy as np
import torch

from shared.formats.samples import WINDOW_TOKENS, EmptyCaption, Sample
from shared.models.sampling import sigma_to_timestep
from stages.train import objective as obj, textenc
from stages.train.objective import ObjectiveConfig

EVAL_FRACTIONS = (0.1, 0.3, 0.5, 0.7, 0.9)
LATENT_FACTOR = 8  # pixels per latent cell (SDXL's VAE)


@dataclass
class Batch:
    latents: torch.Tensor      # [B, C, h, w] float32 (scaled)
    noise: torch.Tensor        # [B, C, h, w]
    u: torch.Tensor            # [B] float64 in [0, 1): timestep position
    te: torch.Tensor           # [B, L, D]
    pooled: torch.Tensor       # [B, P]
    time_ids: torch.Tensor     # [B, 6]
    tag_weight: torch.Tensor   # [B]
    prior: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))  # [B]: class images
    ids: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))  # [B, 2, L]: text in step

    def to(self, device: torch.device) -> "Batch":
        return Batch(**{k: v.to(device, non_blocking=True) for k, v in vars(self).items()})


@dataclass(frozen=True)
class Precision:
    """The forward pass's dtype and its autocast context, made once (the context is re-entered every call)."""
    dtype: torch.dtype           # of the UNet's inputs (its weights' dtype)
    autocast: ContextManager     # torch.autocast for bf16 / fp16, else a no-op

    @classmethod
    def make(cls, weights_dtype: str, mixed_precision: str, device_type: str) -> "Precision":
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)
        context = torch.autocast(device_type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
        return cls(getattr(torch, weights_dtype), context)


def keyed_generator(name: str) -> torch.Generator:
    """A generator seeded by the sha256 of `name` (a draw's key: the same on every rank and after a resume)."""
    digest = hashlib.sha256(name.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def sample_generator(seed: int, step: int, micro: int, key: str, occurrence: int) -> torch.Generator:
    return keyed_generator(f"{seed}:{step}:{micro}:{key}:{occurrence}")


def crop_index(seed: int, epoch: int, key: str, crops: int) -> int:
    """The crop sample `key` trains on in `epoch`, of its `crops`: epochs go in cycles of `crops`, each a
    permutation of the crops drawn from (seed, cycle, key), so every crop is used once per cycle, whichever rank
    holds the sample, and a resumed run draws the same."""
    if crops <= 1:
        return 0
    cycle, position = divmod(epoch, crops)
    return int(torch.randperm(crops, generator=keyed_generator(f"{seed}:crops:{cycle}:{key}"))[position])


def _padded(te: np.ndarray, length: int, empty_te: np.ndarray) -> np.ndarray:
    """Caption states padded to `length` rows with the empty caption's 77-row window (what a shorter caption's
    missing windows would encode to), as kohya / A1111 pad long prompts."""
    missing = (length - te.shape[0]) // WINDOW_TOKENS
    return np.concatenate([te] + [empty_te] * missing) if missing else te


def assemble(samples: list[Sample], step: int, micro: int, empty: EmptyCaption, cfg: ObjectiveConfig,
             epoch: int = 0, *, text: Any = None) -> Batch:
    """A batch of one bucket's samples with this step's draws (and `epoch`'s crop of each sample). With `text`
    (textenc.TextEncoders: the text encoders run in the step) the batch carries token ids, tags augmented by
    this step's draws, instead of states (`condition` encodes them)."""
    chosen, latents, noise, u, time_ids, ids = [], [], [], [], [], []
    seen: dict[str, int] = {}
    for s in samples:
        occurrence = seen.get(s.key, 0)
        seen[s.key] = occurrence + 1
        g = sample_generator(cfg.seed, step, micro, s.key, occurrence)
        v = int(torch.randint(0, s.te.shape[0], (1,), generator=g))
        drop = float(torch.rand(1, generator=g)) < cfg.caption_dropout
        flip = float(torch.rand(1, generator=g)) < cfg.flip_rate and s.latent_flip is not None
        u.append(obj.sample_u(1, cfg.timesteps, g, cfg.logit_mean, cfg.logit_std))
        lat, crop_time_ids = s.crop(crop_index(cfg.seed, epoch, s.key, s.crops), flip)
        noise.append(obj.offset_noise((1,) + tuple(lat.shape), cfg.noise_offset, g))
        latents.append(torch.from_numpy(np.asarray(lat, np.float32)))
        time_ids.append(crop_time_ids)
        if text is not None:   # after every other draw: runs without text in the step draw as before
            ids.append(empty.ids.astype(np.int64) if drop else
                       textenc.step_ids(s.ids[v], int(s.windows[v]), text.tokens, text.cfg, g))
            continue
        if drop:
            chosen.append((empty.te, empty.pooled))
        else:
            chosen.append((s.te[v][:int(s.windows[v]) * WINDOW_TOKENS], s.pooled[v]))
    if text is not None:
        length = max(i.shape[1] for i in ids)
        te, pooled = np.zeros((0,), np.float32), np.zeros((0,), np.float32)
        ids = np.stack([_padded(i.T, length, empty.ids.T.astype(np.int64)).T for i in ids])
    else:
        length = max(te.shape[0] for te, _ in chosen)
        te = np.stack([_padded(t, length, empty.te) for t, _ in chosen]).astype(np.float32)
        pooled, ids = np.stack([p for _, p in chosen]).astype(np.float32), np.zeros((0,), np.int64)
    return Batch(latents=torch.stack(latents), noise=torch.cat(noise), u=torch.cat(u), te=torch.from_numpy(te),
                 pooled=torch.from_numpy(pooled), ids=torch.from_numpy(ids),
                 time_ids=torch.from_numpy(np.stack(time_ids).astype(np.float32)),
                 tag_weight=torch.tensor([float(s.tag_weight) for s in samples], dtype=torch.float32),
                 prior=torch.tensor([bool(s.prior) for s in samples], dtype=torch.bool))


def condition(batch: Batch, text: Any) -> Batch:
    """The batch with its text states encoded from its token ids by the (trained) text encoders in `text`
    (under autograd); unchanged without `text`."""
    if text is None:
        return batch
    te, pooled = text.encode(batch.ids)
    return dataclasses.replace(batch, te=te, pooled=pooled)


def resolution_factor(latents: torch.Tensor, cfg: ObjectiveConfig) -> float:
    """With resolution_noise, sqrt(H·W)/base of the batch's bucket (one bucket per batch; pixels = latent · 8)."""
    if not cfg.resolution_noise:
        return 1.0
    return obj.resolution_scale(latents.shape[-2] * LATENT_FACTOR, latents.shape[-1] * LATENT_FACTOR,
                                cfg.resolution_base)


def noised(batch: Batch, cfg: ObjectiveConfig, sigmas: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(UNet input, UNet timestep, target, σ or t per sample) for the batch's draws. Resolution-aware noise
    multiplies σ (flow: the shift) by the bucket's factor; the UNet is then given the timestep of the σ it sees
    (flow: of the shifted t), as SD3's shift does."""
    x0 = batch.latents
    k = resolution_factor(x0, cfg)
    if cfg.prediction == "flow":
        t = obj.flow_shift(batch.u, cfg.flow_shift * k)
        x, tgt = obj.flow_input(x0, batch.noise, t)
        return x, (t * 1000).float(), tgt, t
    steps = len(sigmas)
    index = (batch.u * steps).long().clamp(0, steps - 1)
    sigma = sigmas.to(index.device)[index]
    timestep = index
    if k != 1.0:
        sigma = sigma * k
        timestep = sigma_to_timestep(sigma.cpu(), sigmas.cpu()).float().to(index.device)
    return (obj.model_input(x0, batch.noise, sigma), timestep, obj.target(x0, batch.noise, sigma, cfg.prediction),
            sigma)


def predict(unet: Any, x: torch.Tensor, timestep: torch.Tensor, batch: Batch, precision: Precision) -> torch.Tensor:
    dtype = precision.dtype
    with precision.autocast:
        return unet(x.to(dtype), timestep, encoder_hidden_states=batch.te.to(dtype),
                    added_cond_kwargs={"text_embeds": batch.pooled.to(dtype), "time_ids": batch.time_ids.to(dtype)}
                    ).sample


def loss(unet: Any, batch: Batch, cfg: ObjectiveConfig, sigmas: torch.Tensor, precision: Precision
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean weighted loss, per-sample unweighted loss, per-sample timestep position in [0, 1]): the configured
    loss function (LOSSES) averaged over each sample's elements, times its weights (tag frequency, prior
    preservation, the loss weighting of WEIGHTINGS)."""
    x, timestep, tgt, level = noised(batch, cfg, sigmas)
    pred = predict(unet, x, timestep, batch, precision)
    elements = obj.LOSSES[cfg.loss].elementwise(pred, tgt, level, cfg)
    per = elements.float().mean(dim=tuple(range(1, elements.ndim)))
    weight = torch.ones_like(per)
    if cfg.tag_weighting:
        weight = weight * batch.tag_weight
    if cfg.prior_loss_weight != 1.0 and batch.prior.numel():
        weight = weight * prior_weights(batch.prior, cfg.prior_loss_weight).to(per.device)
    if cfg.weighting != "none":
        weight = weight * obj.WEIGHTINGS[cfg.weighting].weight(level, cfg).to(per.device)
    return (per * weight).mean(), per.detach(), batch.u.detach()


def prior_weights(prior: torch.Tensor, weight: float) -> torch.Tensor:
    """DreamBooth prior preservation: a class image's loss weighs `weight` (λ), an instance image's 1."""
    return torch.where(prior, torch.tensor(weight), torch.tensor(1.0))


@torch.no_grad()
def evaluate_each(unet: Any, samples: list[Sample], cfg: ObjectiveConfig, sigmas: torch.Tensor, precision: Precision,
                  device: torch.device, text: Any = None) -> torch.Tensor:
    """Unweighted loss per sample (rows) and fixed timestep position 10 % … 90 % (columns, EVAL_FRACTIONS), with
    noise keyed by the sample's id: numbers comparable across the run and across a resume (caption as written, the
    planned crop, no flip, no dropout; nothing drawn from a shared generator)."""
    was_training = unet.training
    unet.eval()
    rows = []
    k = len(EVAL_FRACTIONS)
    for s in samples:
        lat = torch.from_numpy(np.asarray(s.latent, np.float32))
        te = torch.from_numpy(np.asarray(s.te[0][:int(s.windows[0]) * WINDOW_TOKENS], np.float32))
        pooled = torch.from_numpy(np.asarray(s.pooled[0], np.float32))
        if text is not None:   # the caption as written through the encoders as they are now
            with text.evaluating():
                te, pooled = text.encode(torch.from_numpy(
                    np.asarray(s.ids[0][:, :int(s.windows[0]) * WINDOW_TOKENS], np.int64))[None].to(device))
            te, pooled = te[0].float(), pooled[0].float()
        g = sample_generator(cfg.seed, -1, 0, s.key, 0)
        batch = Batch(latents=lat.expand(k, *lat.shape).clone(), noise=torch.randn((k,) + tuple(lat.shape), generator=g),
                      u=torch.tensor(EVAL_FRACTIONS, dtype=torch.float64), te=te.expand(k, -1, -1).clone(),
                      pooled=pooled.expand(k, -1).clone(),
                      time_ids=torch.from_numpy(np.asarray(s.time_ids, np.float32)).expand(k, -1).clone(),
                      tag_weight=torch.ones(k)).to(device)
        x, timestep, tgt, _ = noised(batch, cfg, sigmas)
        pred = predict(unet, x, timestep, batch, precision)
        rows.append(((pred.float() - tgt.float()) ** 2).mean(dim=tuple(range(1, pred.ndim))).cpu().double())
    unet.train(was_training)
    return torch.stack(rows) if rows else torch.zeros(0, k, dtype=torch.float64)


def evaluate(unet: Any, samples: list[Sample], cfg: ObjectiveConfig, sigmas: torch.Tensor, precision: Precision,
             device: torch.device, text: Any = None) -> float:
    """Mean of `evaluate_each` (NaN for no samples)."""
    each = evaluate_each(unet, samples, cfg, sigmas, precision, device, text)
    return float(each.mean()) if each.numel() else float("nan")
