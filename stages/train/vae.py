"""The VAE as the training target (`--target vae`): the model's AutoencoderKL with its decoder (or encoder and
decoder) trainable, trained on the planned crops' pixels that encode stored (`--pixels png|webp`) with a
reconstruction (L1 / L2) + perceptual (LPIPS-style VGG16, perceptual.py) + KL loss; its validation (PSNR and
perceptual distance per item) and the grid original | base VAE | fine-tuned VAE.

The loop (loop.py) is the UNet's: the same loader, plan, optimizer, EMA, checkpoints and exact resume; this
module gives it the module to train (`Reconstruction`, a wrapper DDP can hold), the trained weights as a
checkpoint part (`vae.` + the AutoencoderKL's own names, the whole VAE, so a checkpoint is the fine-tuned VAE),
the batch (`assemble`) and the loss. Every random choice of a sample (flip, the posterior's noise) comes from
the generator keyed by (seed, step, micro-batch, id, occurrence) as in step.py; evaluation decodes the
posterior's mean, so its numbers are comparable across the run and across a resume.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from shared.core.errors import ConfigError, InputError
from shared.formats.samples import Sample
from shared.models import loading as models
from shared.models.render import to_uint8
from shared.core.config import opt
from shared.core.groups import borrowed
from stages.train import offload as OF, perceptual as P
from stages.train.step import Precision, sample_generator
from stages.train.targets import TARGETS, Setting, TargetKind

if TYPE_CHECKING:
    from stages.train.config import Config

PARTS = ("decoder", "encoder+decoder")
GRID = "vae-grid.png"
GRID_ITEMS = 4


@dataclass(frozen=True, kw_only=True)
class VaeConfig:
    """The VAE target: options of `sdxl train` (config.py composes them)."""
    target: str = opt("unet", "What is trained.", choices=TARGETS)
    model: str = borrowed()
    vae_train: str = opt("decoder", "Target vae: fine-tune the decoder (latents encoded before stay valid) or the "
                                    "encoder and the decoder (re-encode afterwards).", choices=PARTS)
    vae_loss: str = opt("l1", "Target vae: the reconstruction term, mean absolute (l1) or squared (l2) error.",
                        choices=("l1", "l2"))
    perceptual_weight: float = opt(1.0, "Target vae: weight of the LPIPS-style perceptual distance (VGG16 "
                                        "features); needs perceptual_weights; 0 = off.", ge=0, le=1000)
    perceptual_weights: Path | None = opt(None, "Target vae: the perceptual network's weights, a local file: "
                                                "torchvision VGG16 or LPIPS (vgg) weights, .safetensors or a "
                                                "weights-only torch file (nothing is downloaded); its content is "
                                                "an input of the run.", fingerprint=False)
    perceptual_layers: str = opt("1,1,1,1,1", "Target vae: weight of each VGG16 layer of the perceptual distance, "
                                               "comma-separated (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3); "
                                               "layers after the last non-zero one are not run.", nonempty=True)
    kl_weight: float = opt(0.0, "Target vae, encoder+decoder: weight of the KL divergence of the encoder's "
                                "posterior from N(0, 1) (1e-6 as SD's VAE); 0 = off.", ge=0, le=1)
    weights_dtype: str = borrowed()
    gradient_checkpointing: bool = borrowed()
    flip_rate: float = borrowed()
    seed: int = borrowed()

    def problem(self) -> str | None:
        """Why these choices cannot be trained (None: they can)."""
        if self.target != "vae":
            return None
        if self.perceptual_weight and self.perceptual_weights is None:
            return (f"perceptual_weight {self.perceptual_weight:g} needs the perceptual network's weights: "
                    f"--perceptual-weights FILE (torchvision VGG16 or LPIPS weights, .safetensors or a weights-only "
                    f".pth), or --perceptual-weight 0")
        try:
            layers = self.layer_weights
        except ValueError:
            return f"perceptual_layers {self.perceptual_layers!r}: expected {len(P.TAPS)} numbers, comma-separated"
        if len(layers) != len(P.TAPS):
            return (f"perceptual_layers {self.perceptual_layers!r}: {len(P.TAPS)} weights (relu1_2 … relu5_3), got "
                    f"{len(layers)}")
        if any(not math.isfinite(w) or w < 0 or w > 1000 for w in layers):
            return f"perceptual_layers {self.perceptual_layers!r}: each weight must be finite and in [0, 1000]"
        if self.kl_weight and self.vae_train == "decoder":
            return "kl_weight acts on the encoder, which vae_train decoder leaves frozen: use encoder+decoder"
        return None

    @property
    def layer_weights(self) -> tuple[float, ...]:
        """perceptual_layers as numbers (a ValueError for a non-number)."""
        return tuple(float(v) for v in self.perceptual_layers.split(",") if v.strip())


#: options of the UNet target that a VAE run cannot honour (name, value that is fine)
UNET_ONLY = (("init_lora", None), ("lora_files", False), ("quantize_base", "no"), ("blocks_to_swap", 0),
             ("compile", "off"), ("sample_prompts", None), ("parallel", "ddp"), ("fused_backward", False),
             ("plan", False), ("train_text_encoder", "none"), ("shuffle_tags", False), ("tag_dropout", 0.0))


def unet_only_problem(cfg: Config) -> str | None:
    """The first UNet-only option set on a VAE run (one line), or None."""
    for name, fine in UNET_ONLY:
        if getattr(cfg, name) != fine:
            return f"{name} applies to the UNet target; --target vae does not use it (leave it at its default)"
    return None


class Reconstruction(torch.nn.Module):
    """x -> (its reconstruction, the posterior's mean and log-variance): z = mean + std · noise, decoded. The
    encoder runs without gradients when it is frozen. One module, so DistributedDataParallel can wrap it."""

    def __init__(self, vae: Any, train_encoder: bool):
        super().__init__()
        self.vae, self.train_encoder = vae, train_encoder

    def forward(self, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            dist = self.vae.encode(x).latent_dist
            z = dist.mean + dist.std * noise.to(dist.mean.dtype)
        return self.vae.decode(z).sample, dist.mean, dist.logvar


def build_vae(cfg: VaeConfig, device: torch.device) -> Any:
    """The model's VAE on `device` in `weights_dtype`, its decoder (+ post_quant_conv) trainable, and with
    encoder+decoder its encoder (+ quant_conv) too; the rest frozen."""
    vae = models.load_model(cfg.model, ("vae",)).vae
    vae.to(device, getattr(torch, cfg.weights_dtype))
    vae.requires_grad_(False)
    parts = ["decoder", "post_quant_conv"] + (["encoder", "quant_conv"] if cfg.vae_train == "encoder+decoder" else [])
    for name in parts:
        module = getattr(vae, name, None)
        if module is not None:
            module.requires_grad_(True)
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    vae.train()
    return vae


class VaeWeights:
    """The fine-tuned VAE as checkpoints and export store it: `vae.` + every AutoencoderKL parameter (the frozen
    ones too: a checkpoint is a whole VAE). A checkpoint part; loading copies into the live parameters."""

    def __init__(self, vae: Any):
        self.vae = vae

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"vae." + k: v.detach().contiguous() for k, v in self.vae.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = {k[len("vae."):]: v for k, v in state.items() if k.startswith("vae.")}
        missing, unexpected = self.vae.load_state_dict(own, strict=False)
        if missing or unexpected:
            raise ConfigError(f"checkpoint weights do not fit this VAE ({(missing or unexpected)[0]})")


@dataclass
class VaeBatch:
    pixels: torch.Tensor   # [B, 3, H, W] in [-1, 1]
    noise: torch.Tensor    # [B, C, H/8, W/8]: the posterior's draw

    def to(self, device: torch.device) -> "VaeBatch":
        return VaeBatch(self.pixels.to(device, non_blocking=True), self.noise.to(device, non_blocking=True))


def pixels_of(sample: Sample) -> torch.Tensor:
    """A sample's stored crop as [3, H, W] float32 in [-1, 1]."""
    if sample.pixels is None:
        raise InputError(f"sample {sample.key} holds no pixels; encode with --pixels png (or webp)")
    return torch.from_numpy(np.asarray(sample.pixels, np.float32)).permute(2, 0, 1) / 127.5 - 1.0


class VaeTraining:
    """The VAE target of one run: the module trained, its losses and its measurements."""

    def __init__(self, cfg: VaeConfig, device: torch.device, precision: Precision):
        self.cfg, self.device, self.precision = cfg, device, precision
        self.vae = build_vae(cfg, device)
        self.model = Reconstruction(self.vae, cfg.vae_train == "encoder+decoder")
        self.channels = int(self.vae.config.latent_channels)
        self.perceptual = (P.load(Path(cfg.perceptual_weights), cfg.layer_weights).to(device)
                           if cfg.perceptual_weights is not None else None)

    @classmethod
    def check_data(cls, layout: Any, where: Any) -> None:
        if layout.pixels == "none":
            raise InputError(f"{where}: the shards hold no pixels, which --target vae trains on; encode with "
                             f"--pixels png (or webp)")

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The trained parameters as one group, `vae` (its learning rate: vae_lr)."""
        return {"vae": [p for p in self.vae.parameters() if p.requires_grad]}

    def weights(self) -> VaeWeights:
        return VaeWeights(self.vae)

    def assemble(self, samples: list[Sample], step: int, micro: int) -> VaeBatch:
        """A batch of one bucket's crops with this step's draws: a flip and the posterior's noise per sample."""
        pixels, noise, seen = [], [], {}
        for s in samples:
            occurrence = seen.get(s.key, 0)
            seen[s.key] = occurrence + 1
            g = sample_generator(self.cfg.seed, step, micro, s.key, occurrence)
            x = pixels_of(s)
            if float(torch.rand(1, generator=g)) < self.cfg.flip_rate:
                x = x.flip(-1)
            pixels.append(x)
            noise.append(torch.randn((self.channels, x.shape[1] // 8, x.shape[2] // 8), generator=g))
        return VaeBatch(torch.stack(pixels), torch.stack(noise))

    def per_sample(self, model: Any, x: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, dict, torch.Tensor]:
        """The per-sample loss, its parts (batch means) and the reconstruction."""
        with self.precision.autocast:
            recon, mean, logvar = model(x.to(self.precision.dtype), noise)
        cfg = self.cfg
        loss, parts = P.vae_loss(recon.float(), x.float(), cfg.vae_loss, self.perceptual, cfg.perceptual_weight,
                                 mean, logvar, cfg.kl_weight)
        return loss, parts, recon

    def loss(self, model: Any, batch: VaeBatch) -> tuple[torch.Tensor, torch.Tensor, None]:
        """(the batch's mean loss, the per-sample losses, None: no timestep positions to bin the loss by)."""
        each, _, _ = self.per_sample(model, batch.pixels, batch.noise)
        return each.mean(), each.detach(), None

    @torch.no_grad()
    def measure(self, samples: list[Sample], vae: Any | None = None) -> dict[str, float]:
        """Mean loss, reconstruction PSNR (dB, pixels in [0, 1]) and perceptual distance of `samples`, each
        decoded from its posterior's mean (no draw, no flip); `vae` defaults to the one being trained."""
        model = Reconstruction(vae, False) if vae is not None else self.model
        was = model.training
        model.eval()
        rows = []
        for s in samples:
            x = pixels_of(s)[None].to(self.device)
            zero = torch.zeros((1, self.channels, x.shape[2] // 8, x.shape[3] // 8), device=self.device)
            loss, _, recon = self.per_sample(model, x, zero)
            rows.append((float(loss[0]), psnr(recon.float(), x), self.distance(recon.float(), x)))
        model.train(was)
        if not rows:
            return {}
        cols = np.array(rows, np.float64)
        out = {"loss": float(cols[:, 0].mean()), "psnr": float(cols[:, 1].mean())}
        if self.perceptual is not None:
            out["perceptual"] = float(cols[:, 2].mean())
        return out

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> float:
        return float(self.perceptual(a.clamp(-1, 1), b)[0]) if self.perceptual is not None else float("nan")

    @torch.no_grad()
    def reconstructions(self, samples: list[Sample], vae: Any) -> list[np.ndarray]:
        """Each sample decoded from its posterior's mean by `vae`, as uint8 [H, W, 3]."""
        out = []
        for s in samples:
            x = pixels_of(s)[None].to(self.device)
            with self.precision.autocast:
                z = vae.encode(x.to(next(vae.parameters()).dtype)).latent_dist.mean
                y = vae.decode(z).sample
            out.append(to_uint8(y[0].float()))
        return out


def psnr(pred: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of one image pair in [-1, 1], measured on [0, 1] (pred clamped)."""
    mse = float((((pred.clamp(-1, 1) - target) / 2) ** 2).mean())
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def grid(rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Rows of (original, base VAE, fine-tuned VAE), 2-pixel white gutters, one image."""
    pad = 2
    h = max(r[0].shape[0] for r in rows)
    w = max(r[0].shape[1] for r in rows)
    out = np.full((len(rows) * (h + pad) + pad, 3 * (w + pad) + pad, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, image in enumerate(row):
            top, left = pad + i * (h + pad), pad + j * (w + pad)
            out[top:top + image.shape[0], left:left + image.shape[1]] = image
    return out


# ---------------------------------------------------------------- the VAE as the loop's target

class VaeTarget:
    """The VAE target (targets.Target): VaeTraining driven by the loop, its measurements as the evaluation and
    the original | base | fine-tuned grid at the end."""
    method = "vae"
    sharded = False

    def __init__(self, at: Setting):
        VaeTraining.check_data(at.data.index.layout, at.data.folder)
        self.training = VaeTraining(at.cfg.vae_target, at.device, at.precision)
        self.module = self.training.model
        self.device, self.staging = at.device, at.staging
        torch.manual_seed(at.cfg.seed + at.rank.rank)  # nothing draws from it; as the UNet target, for the RNG part
        self.offload = OF.install(at.cfg.offload, self.module, at.device, at.rank.world)

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return self.training.groups()

    def weights(self) -> VaeWeights:
        return self.training.weights()

    def assemble(self, samples: list[Sample], step: int, micro: int, epoch: int) -> VaeBatch:
        return self.training.assemble(samples, step, micro)

    def loss(self, model: Any, batch: VaeBatch) -> tuple[torch.Tensor, torch.Tensor, None]:
        return self.training.loss(model, batch)

    def after_backward(self, world: int) -> None:
        return None

    def evaluate(self, step: int, sets: list[tuple[str, list[Sample], list]], log: Any) -> None:
        """Loss, PSNR and perceptual distance per set (eval_* on the fixed training samples, val_* on the held-out
        set), noted in the progress ([step, loss, psnr, perceptual]: the first entry is the base VAE's, step 0)
        and in metrics.jsonl / TensorBoard / WandB."""
        row: dict[str, float] = {}
        for name, samples, history in sets:
            m = self.training.measure(samples)
            if m:
                prefix = name.removesuffix("_loss")
                history.append([step, m["loss"], m["psnr"], m.get("perceptual")])
                row.update({f"{prefix}_{k}": v for k, v in m.items()})
        if log is not None and row:
            log.measures(step, row, "vae")

    def sample_images(self, step: int, total: int, ema: Any, log: Any) -> None:
        return None

    def resumed_at(self, step: int) -> None:
        return None

    def finish(self, eval_set: list[Sample], held: list[Sample], ema: Any) -> None:
        """`samples/vae-grid.png`: held-out items (else the fixed training samples), up to GRID_ITEMS, as
        original | base VAE | fine-tuned VAE (its EMA when EMA is on: what export writes with --weights ema)."""
        items = (held or eval_set)[:GRID_ITEMS]
        if not items:
            return
        training = self.training
        base = build_vae(VaeConfig(**{**vars(training.cfg), "vae_train": "decoder", "gradient_checkpointing": False}),
                         self.device).eval()
        before = training.reconstructions(items, base)
        del base
        training.vae.eval()
        with ema.swapped() if ema is not None else contextlib.nullcontext():
            after = training.reconstructions(items, training.vae)
        training.vae.train()
        rows = [(np.asarray(s.pixels, np.uint8), b, a) for s, b, a in zip(items, before, after)]
        from PIL import Image

        folder = self.staging / "samples"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(grid(rows), "RGB").save(folder / GRID)

    def summary(self, progress: Any) -> dict:
        """What the manifest says of a VAE run: per set, its first (the base VAE) and last measurements."""
        out: dict[str, Any] = {"vae_train": self.training.cfg.vae_train}
        if (self.staging / "samples" / GRID).is_file():
            out["grid"] = f"samples/{GRID}"
        for name, history in (("eval", progress.eval), ("val", progress.val)):
            if history:
                first, last = history[0], history[-1]
                out[name] = {k: {"before": first[i], "after": last[i]}
                             for i, k in enumerate(("loss", "psnr", "perceptual"), start=1) if first[i] is not None}
        return {"vae": out}


TARGETS.add(TargetKind("vae", "the VAE on the crops' pixels (encode --pixels png|webp; the vae_* and "
                              "perceptual_* keys).", VaeTarget))
