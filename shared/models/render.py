"""Rendering images with an SDXL UNet through the objective's sampler (shared/models/sampling.py): prompts
encoded as training encodes captions (shared/models/text.py), classifier-free guidance on the UNet's output,
the VAE's decode. Used by train's sample images (the UNet as it is training) and by `sdxl compare`.

Every draw comes from a generator seeded by the prompt's seed (the starting noise, made on the CPU so every
device starts from the same noise); the UNet runs in eval mode (no dropout), so rendering never touches the
global RNG that training's LoRA dropout uses.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from shared.models import sampling, text

LABEL_WIDTH = 160   # a grid's row-label column, pixels
HEADER_HEIGHT = 28  # a grid's column-label row, pixels


@dataclass(frozen=True)
class Prompt:
    """One image to render."""
    prompt: str
    negative: str = ""
    seed: int = 0
    width: int = 1024
    height: int = 1024
    steps: int = 20
    cfg: float = 5.0


@dataclass
class Conditioning:
    """A prompt's and its negative prompt's text states ([1, L, D]) and pooled embeddings ([1, P])."""
    hidden: torch.Tensor
    pooled: torch.Tensor
    neg_hidden: torch.Tensor
    neg_pooled: torch.Tensor

    def to(self, device: Any, dtype: torch.dtype) -> "Conditioning":
        return Conditioning(*(t.to(device, dtype) for t in vars(self).values()))


def encode(model: Any, prompts: list[Prompt]) -> list[Conditioning]:
    """Each prompt and negative prompt through both text encoders (long prompts in 75-token windows); on the
    CPU in float32, so the text encoders can be dropped afterwards."""
    captions = [c for p in prompts for c in (p.prompt, p.negative)]
    done = text.encode_captions(model, captions)
    out = []
    for i in range(0, len(done), 2):
        pos, neg = done[i], done[i + 1]
        out.append(Conditioning(*(t.detach().float().cpu().unsqueeze(0)
                                  for t in (pos["hidden"], pos["pooled"], neg["hidden"], neg["pooled"]))))
    return out


@contextlib.contextmanager
def eval_mode(module: Any) -> Iterator[None]:
    was = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was)


def unet_model(unet: Any, cond: Conditioning, size: tuple[int, int], scale: float, rescale: float,
               dtype: torch.dtype) -> sampling.Model:
    """The sampler's model: the UNet's prediction with classifier-free guidance (skipped at scale 1)."""
    h, w = size
    ids = torch.tensor([text.time_ids((h, w), (0, 0), (h, w))], dtype=dtype, device=cond.hidden.device)

    def run(z: torch.Tensor, t: torch.Tensor, hidden: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        return unet(z.to(hidden.device, dtype), t.to(hidden.device, torch.float32), encoder_hidden_states=hidden,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": ids.expand(z.shape[0], -1)}).sample.float()

    def model(z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        positive = run(z, t, cond.hidden, cond.pooled)
        if scale == 1.0:
            return positive.to(z.device)
        negative = run(z, t, cond.neg_hidden, cond.neg_pooled)
        return sampling.guided(negative, positive, scale, rescale).to(z.device)
    return model


def starting_noise(p: Prompt, channels: int, factor: int) -> torch.Tensor:
    g = torch.Generator("cpu").manual_seed(p.seed)
    return torch.randn((1, channels, p.height // factor, p.width // factor), generator=g, dtype=torch.float32)


def decode(vae: Any, latents: torch.Tensor) -> Any:
    """Latents (scaled as training's) to a PIL image, through the VAE in its own dtype."""
    from PIL import Image

    param = next(vae.parameters())
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    x = latents.to(param.device, param.dtype) / vae.config.scaling_factor + shift
    return Image.fromarray(to_uint8(vae.decode(x).sample[0].float()))


def to_uint8(image: torch.Tensor) -> Any:
    """A decoded image [3, H, W] in [-1, 1] (clamped) as a uint8 array [H, W, 3]."""
    return ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


@torch.no_grad()
def render(unet: Any, vae: Any, cond: Conditioning, p: Prompt, objective: sampling.Objective,
           sampler: sampling.Sampler) -> Any:
    """One image of prompt `p` (its conditioning `cond`) from the UNet as it is now."""
    param = next(unet.parameters())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    noise = starting_noise(p, unet.config.in_channels, factor)
    model = unet_model(unet, cond.to(param.device, param.dtype), (p.height, p.width), p.cfg,
                       sampler.guidance_rescale, param.dtype)
    with eval_mode(unet):
        latents = sampling.sample(model, noise, objective, sampler, p.steps)
    return decode(vae, latents)


def _fit(draw: Any, label: str, width: int) -> str:
    while label and draw.textlength(label) > width:
        label = label[:-2] + "…" if len(label) > 1 else ""
    return label


def grid(rows: list[tuple[str, list[Any]]], columns: list[str], size: tuple[int, int]) -> Any:
    """One image: a header row of column labels (two lines each), then per row its label and its images (each
    resized to `size`)."""
    from PIL import Image, ImageDraw

    w, h = size
    canvas = Image.new("RGB", (LABEL_WIDTH + w * len(columns), HEADER_HEIGHT + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, label in enumerate(columns):
        for k, line in enumerate(label.split("\n")[:2]):
            draw.text((LABEL_WIDTH + j * w + 4, 3 + 12 * k), _fit(draw, line, w - 8), fill="black")
    for i, (label, images) in enumerate(rows):
        draw.text((4, HEADER_HEIGHT + i * h + h // 2 - 6), _fit(draw, label, LABEL_WIDTH - 8), fill="black")
        for j, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((w, h)), (LABEL_WIDTH + j * w, HEADER_HEIGHT + i * h))
    return canvas
