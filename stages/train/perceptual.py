"""The VAE target's losses: reconstruction (L1 / L2), an LPIPS-style perceptual distance on VGG16 features, and
the KL of the encoder's posterior.

The perceptual distance follows Zhang et al. 2018 ("The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric"): VGG16 activations after relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3 of both images, each
unit-normalised over its channels, squared difference, weighted per channel (LPIPS' learned 1x1 "lin" layers when
given, else 1), averaged over space and summed over layers with per-layer weights. The network is defined here
with torchvision's `features.N` numbering so that its weights load from a torchvision VGG16 file, an LPIPS file
(`net.sliceK.N.*` + `linK.model.1.weight`) or a bare file with both, as .safetensors or a weights-only torch file.
Nothing is downloaded: the user names the file.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from shared.core.errors import InputError

#: VGG16's convolutional trunk up to relu5_3 (torchvision `features` indices 0..29); "M" is a 2x2 max-pool
TRUNK = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
#: torchvision indices of the ReLUs LPIPS taps (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3), and their widths
TAPS = (3, 8, 15, 22, 29)
WIDTHS = (64, 128, 256, 512, 512)
#: LPIPS' input normalisation for images in [-1, 1]
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
#: the first torchvision index of each LPIPS slice (slice k covers [START[k-1], START[k]) )
SLICE_START = (0, 4, 9, 16, 23, 30)


def _trunk() -> nn.Sequential:
    layers: list[nn.Module] = []
    channels = 3
    for item in TRUNK:
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
            channels = int(item)
    return nn.Sequential(*layers)


class Perceptual(nn.Module):
    """LPIPS-style distance between two batches of images in [-1, 1] (N, 3, H, W) -> (N,). Frozen: it has no
    trainable parameters, gradients flow to its inputs only."""

    def __init__(self, layer_weights: tuple[float, ...] = (1.0,) * 5):
        super().__init__()
        if len(layer_weights) != len(TAPS):
            raise ValueError(f"need {len(TAPS)} layer weights, got {len(layer_weights)}")
        self.features = _trunk()
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(1, c, 1, 1)) for c in WIDTHS])
        self.register_buffer("layer_weights", torch.tensor(layer_weights, dtype=torch.float32), persistent=False)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def taps(self, x: torch.Tensor, count: int = len(TAPS)) -> list[torch.Tensor]:
        """The activations at the first `count` tapped ReLUs (the trunk runs no further than the last of them)."""
        out = []
        x = (x - self.shift.to(x.dtype)) / self.scale.to(x.dtype)
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in TAPS:
                out.append(x)
                if len(out) == count:
                    break
        return out

    @property
    def used(self) -> int:
        """Taps up to the last one of non-zero weight (the deeper layers, the costly ones, are not run)."""
        nonzero = [k for k, w in enumerate(self.layer_weights.tolist()) if w != 0.0]
        return nonzero[-1] + 1 if nonzero else 0

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        total = a.new_zeros(a.shape[0])
        used = self.used
        for weight, lin, fa, fb in zip(self.layer_weights, self.lins, self.taps(a, used), self.taps(b, used)):
            if float(weight) == 0.0:
                continue
            diff = (unit(fa) - unit(fb)) ** 2
            total = total + weight.to(a.dtype) * (diff * lin.to(a.dtype)).sum(1).mean((1, 2))
        return total


def unit(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """`x` divided by its L2 norm over channels (LPIPS' normalize_tensor)."""
    return x / (x.pow(2).sum(1, keepdim=True).sqrt() + eps)


# ---------------------------------------------------------------- weights


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors or weights-only torch file; one line naming the file otherwise."""
    if not path.is_file():
        raise InputError(f"{path}: no such perceptual-network weights file (give a torchvision VGG16 or LPIPS file)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - both loaders raise their own types for a corrupt file
        raise InputError(f"{path}: not a readable weights file ({str(e).splitlines()[0][:120] if str(e) else type(e).__name__})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise InputError(f"{path}: not a state dict of tensors")
    return state


def canonical(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's trunk and lin weights under this module's names (`features.N.*`, `lins.K`): torchvision VGG16
    (`features.N.*`, a `vgg.` or `net.` prefix allowed), LPIPS (`net.sliceK.N.*`, `linK.model.1.weight`)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        while parts and parts[0] in ("module", "perceptual_loss", "vgg", "net", "model") and len(parts) > 2:
            parts = parts[1:]
        if parts[0] == "features" and len(parts) == 3 and parts[1].isdigit() and int(parts[1]) < SLICE_START[-1]:
            out[".".join(parts)] = value
        elif parts[0].startswith("slice") and len(parts) == 3 and parts[1].isdigit():
            out[f"features.{parts[1]}.{parts[2]}"] = value  # LPIPS keeps torchvision's indices inside slices
        elif parts[0].startswith("lin") and parts[0][3:].isdigit() and parts[-1] == "weight":
            out[f"lins.{int(parts[0][3:])}"] = value
    return out


def load(path: Path, layer_weights: tuple[float, ...] = (1.0,) * 5) -> Perceptual:
    """The perceptual network with the trunk (and, when present, LPIPS' lin weights) from `path`. Every trunk
    weight must be present and of VGG16's shape: a partial or foreign file is one line naming what is missing."""
    net = Perceptual(layer_weights)
    found = canonical(read_weights(path))
    want = {k: v for k, v in net.state_dict().items() if k.startswith("features.")}
    missing = sorted(set(want) - set(found), key=_order)
    if missing:
        raise InputError(f"{path}: not VGG16 weights: {len(missing)} of its {len(want)} trunk tensors are missing "
                         f"(first: {missing[0]}); give a torchvision VGG16 or LPIPS file")
    for key, value in found.items():
        expected = net.state_dict()[key].shape
        if tuple(value.shape) != tuple(expected):
            raise InputError(f"{path}: {key} has shape {tuple(value.shape)}, VGG16's is {tuple(expected)}")
    net.load_state_dict({**net.state_dict(), **{k: v.float() for k, v in found.items()}})
    return net.requires_grad_(False).eval()


def _order(key: str) -> tuple[int, str]:
    parts = key.split(".")
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0, key)


# ---------------------------------------------------------------- the loss


def reconstruction(pred: torch.Tensor, target: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-sample L1 or L2 (mean over channels and pixels) -> (N,)."""
    err = (pred.float() - target.float())
    err = err.abs() if kind == "l1" else err.pow(2)
    return err.flatten(1).mean(1)


def kl(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, 1)) per sample, averaged over latent elements -> (N,)."""
    logvar = logvar.float().clamp(-30.0, 20.0)  # the range diffusers' DiagonalGaussianDistribution clamps to
    return (0.5 * (mean.float().pow(2) + logvar.exp() - 1.0 - logvar)).flatten(1).mean(1)


def vae_loss(pred: torch.Tensor, target: torch.Tensor, kind: str, perceptual: Perceptual | None, w_perceptual: float,
             mean: torch.Tensor | None = None, logvar: torch.Tensor | None = None, w_kl: float = 0.0
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """The VAE target's per-sample loss and its parts (batch means, for the log)."""
    rec = reconstruction(pred, target, kind)
    loss, parts = rec, {"reconstruction": float(rec.detach().mean())}
    if w_perceptual:
        if perceptual is None:
            raise ValueError("a perceptual weight needs the perceptual network")
        p = perceptual(pred.float().clamp(-1, 1), target.float())
        loss, parts["perceptual"] = loss + w_perceptual * p, float(p.detach().mean())
    if w_kl and mean is not None and logvar is not None:
        k = kl(mean, logvar)
        loss, parts["kl"] = loss + w_kl * k, float(k.detach().mean())
    return loss, parts
