"""encode's models on this rank's device: the VAE, both SDXL text encoders and (with --clip) a CLIP model, with
the precision policy (an fp16 VAE only when its config says it is fp16-safe; NaN/inf outputs are errors that
name the fix). Outputs come back as numpy in float32 (latents, states) for the pure packing in items.py.

Every model call has a fixed batch shape: `batch_size` images (a short batch is padded by repeating its first
image), text windows in groups of exactly `windows_per_call` (filled with empty captions). Kernels pick their
algorithm, and with it the order of their sums, by the batch size; at one size a row's result does not
depend on the other rows. So an item's arrays do not depend on which items shared its batch, which is what
lets a later run reuse them (reuse.py) and still equal a fresh encode to the byte."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from shared.core.errors import ConfigError, DataError
from shared.formats.samples import ENCODER_PARTS, WINDOW_TOKENS
from shared.models import loading as models
from shared.models.text import encode_captions, tokenize_pair
from stages.encode.config import Config
from stages.encode.items import Text, item_seed


class Encoders:
    """The loaded VAE and text encoders (and CLIP) on this rank's device, with the precision policy."""

    def __init__(self, cfg: Config, device: str):
        import torch

        self.cfg, self.device = cfg, torch.device(device)
        self.model = models.load_model(cfg.model, ENCODER_PARTS if cfg.vae is None else ENCODER_PARTS[1:])
        if cfg.vae is not None:
            self.model.vae = models.load_vae(cfg.vae)
        vae = self.model.vae
        if cfg.vae_dtype == "float16" and vae.config.get("force_upcast", True):
            raise ConfigError("vae_dtype float16: this VAE is not marked fp16-safe (its config has force_upcast "
                              "= true) and SDXL's VAE overflows in fp16; use --vae-dtype float32 (or bfloat16), "
                              "or --vae with an fp16-fixed VAE")
        self.vae_dtype = getattr(torch, cfg.vae_dtype)
        vae.to(self.device, self.vae_dtype)
        for part in ("text_encoder", "text_encoder_2"):
            getattr(self.model, part).to(self.device, getattr(torch, cfg.text_dtype))
        self.batch = cfg.batch_size
        self.windows_per_call = max(cfg.max_windows, cfg.batch_size * (1 + cfg.caption_variants))
        self.scale = float(vae.config.scaling_factor)
        self.shift = float(vae.config.get("shift_factor") or 0.0)
        self.clip = self.clip_tokenizer = None
        if cfg.clip:
            self._load_clip()

    def _load_clip(self) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        if self.cfg.clip_model is None:
            if not self.cfg.model.startswith("builtin:"):
                raise ConfigError("--clip needs --clip-model FOLDER (a transformers CLIPModel such as "
                                  "clip-vit-large-patch14) with a non-builtin model")
            self.clip, self.clip_tokenizer = models.tiny_clip(), self.model.tokenizer
        else:
            folder = Path(self.cfg.clip_model).expanduser()
            try:
                self.clip = CLIPModel.from_pretrained(folder).eval()
                self.clip_tokenizer = CLIPTokenizer.from_pretrained(folder)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{folder}: cannot load a CLIPModel with its tokenizer "
                                  f"({str(e).splitlines()[0][:160]})") from None
        self.clip.to(self.device)

    @property
    def latent_channels(self) -> int:
        return self.model.vae.config.latent_channels

    @property
    def te_dim(self) -> int:
        """Width of the concatenated penultimate states (2048 on SDXL)."""
        return self.model.text_encoder.config.hidden_size + self.model.text_encoder_2.config.hidden_size

    @property
    def pooled_dim(self) -> int:
        return self.model.text_encoder_2.config.projection_dim

    @property
    def clip_dim(self) -> int:
        """Width of the CLIP embeddings (0 without --clip)."""
        return self.clip.config.projection_dim if self.clip is not None else 0

    def latents(self, pixels: Any, ids: list[str], flipped: bool = False) -> np.ndarray:
        """Scaled latents [B, C, H/8, W/8] (float32) of uint8 [B, H, W, 3] pixels; NaN/inf is an error naming
        the fix."""
        import torch

        x = _padded(pixels.to(self.device, non_blocking=True), self.batch).permute(0, 3, 1, 2)
        if flipped:
            x = x.flip(-1)
        x = x.to(self.vae_dtype) / 127.5 - 1.0
        with torch.no_grad():
            dist = self.model.vae.encode(x).latent_dist
            z, std = dist.mean[:len(ids)], dist.std[:len(ids)]
            if self.cfg.latent == "sample":
                noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
                    item_seed(self.cfg.seed, i + (":flip" if flipped else ""), "latent"))) for i in ids])
                z = z + std * noise.to(z.device, z.dtype)
            z = (z.float() - self.shift) * self.scale
        bad = [ids[k] for k in range(len(ids)) if not torch.isfinite(z[k]).all()]
        if bad:
            raise DataError(f"the VAE produced NaN/inf latents for {len(bad)} item(s) (first: {bad[0]}) in "
                            f"{self.cfg.vae_dtype}; encode with --vae-dtype float32 (the SDXL VAE overflows "
                            f"in float16)")
        return z.cpu().numpy()

    def texts(self, captions: list[str]) -> list[Text]:
        """Each caption through both text encoders, in `max_windows` windows at most; `windows_per_call`
        windows per call of the encoders (captions grouped in order, each group filled with empty captions)."""
        out = []
        for group in self._window_groups(captions):
            fill = self.windows_per_call - sum(n for _, n in group)
            texts = [c for c, _ in group] + [""] * fill
            for c, r in zip(texts, encode_captions(self.model, texts, self.cfg.max_windows)[:len(group)]):
                hidden, pooled = r["hidden"].float().cpu().numpy(), r["pooled"].float().cpu().numpy()
                if not (np.isfinite(hidden).all() and np.isfinite(pooled).all()):
                    raise DataError(f"the text encoders produced NaN/inf for caption {c[:60]!r} in "
                                    f"{self.cfg.text_dtype}; use --text-dtype float32")
                out.append(Text(c, hidden, pooled, r["ids"].numpy(), r["windows"], r["truncated"]))
        return out

    def _window_groups(self, captions: list[str]) -> list[list[tuple[str, int]]]:
        """Consecutive captions with their window counts, grouped to at most `windows_per_call` windows each."""
        groups: list[list[tuple[str, int]]] = [[]]
        for c in captions:
            n = len(tokenize_pair(self.model, c, self.cfg.max_windows)[0])
            if sum(k for _, k in groups[-1]) + n > self.windows_per_call:
                groups.append([])
            groups[-1].append((c, n))
        return [g for g in groups if g]

    def clip_embeddings(self, pixels: Any, captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """L2-normalised CLIP image and caption embeddings (OpenAI CLIP preprocessing: shortest side to the
        model's image size, bicubic, centre crop, CLIP mean/std)."""
        import torch
        import torch.nn.functional as F

        size = self.clip.config.vision_config.image_size
        n = len(captions)
        x = _padded(pixels.to(self.device), self.batch).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=x.device).view(1, 3, 1, 1)
        tokens = self.clip_tokenizer(captions + [""] * (x.shape[0] - n), padding="max_length", truncation=True,
                                     max_length=WINDOW_TOKENS, return_tensors="pt").to(self.device)
        with torch.no_grad():
            image = self.clip.get_image_features(pixel_values=(x - mean) / std)
            text = self.clip.get_text_features(**tokens)
        image = getattr(image, "pooler_output", image)[:n]
        text = getattr(text, "pooler_output", text)[:n]
        return (F.normalize(image.float(), dim=-1).cpu().numpy(), F.normalize(text.float(), dim=-1).cpu().numpy())

    def numerics(self) -> dict:
        """What decides the last bits of the arrays besides the weights and the options: the batch shape, the
        device (and CPU threads), the libraries that compute them. A sample is reused only where these match."""
        import importlib.metadata as meta

        import torch

        if self.device.type == "cuda":
            tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            where = f"{torch.cuda.get_device_name(self.device)}, tf32 (matmul, cudnn) {tf32}"
        else:
            where = f"cpu, {torch.get_num_threads()} threads"
        versions = {}
        for lib in ("torch", "diffusers", "transformers", "pillow", "nvidia-dali-cuda120"):
            try:
                versions[lib] = meta.version(lib)
            except meta.PackageNotFoundError:
                pass
        return {"batch_size": self.batch, "windows_per_call": self.windows_per_call, "device": where,
                "libraries": versions}


def _padded(x: Any, size: int) -> Any:
    """`x` [n, ...] with its first row repeated up to `size` rows (unchanged when n >= size)."""
    import torch

    n = x.shape[0]
    return x if n >= size else torch.cat([x, x[:1].expand(size - n, *x.shape[1:])])
