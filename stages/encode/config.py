"""encode's configuration: every option of `sdxl encode`, with its range, checked when the config is made."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.core import graph
from shared.core.config import SEED_RANGE, opt
from shared.core.errors import ConfigError
from shared.formats.samples import PIXEL_FORMATS, WINDOW_TOKENS

DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Config:
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    input: Path | None = opt(None, "A folder holding a plan (bucket's output, or that of a stage that rewrites the "
                                   "plan) [default: the output of the stage before encode in the stage graph: "
                                   "<workdir>/bucket unless a plugin stage rewrites the plan].", flag="--in",
                             fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/encode].", flag="--out",
                              fingerprint=False)
    model: str | None = opt(None, "builtin:tiny, builtin:sdxl-random or a diffusers SDXL folder (its weights "
                                  "are fingerprinted as an input).", pipeline=True, fingerprint=False)
    vae: str | None = opt(None, "A diffusers AutoencoderKL folder to use instead of the model's VAE "
                                "(e.g. an fp16-fixed SDXL VAE).", fingerprint=False, nonempty=True)
    format: str = opt("wds", "Output: WebDataset tar shards, a zarr v3 store, or both.",
                      choices=("wds", "zarr", "both"))
    shard_samples: int = opt(256, "Samples per shard (one bucket per shard); the unit of work of ranks and of "
                                  "resumption.", ge=1)
    storage_dtype: str = opt("float16", "dtype of stored latents and embeddings.", choices=("float16", "float32"))
    zarr_compression: str = opt("lz4", "zarr codec: lz4 (blosc lz4 + byte shuffle; fast to read), blosc (blosc "
                                       "zstd + bit shuffle; smaller, several times slower to read), zstd or none.",
                                choices=("lz4", "blosc", "zstd", "none"))
    zarr_level: int = opt(5, "zarr compression level (lz4 and blosc take 0-9, zstd 0-22).", ge=0, le=22)
    vae_dtype: str = opt("float32", "VAE precision. float16 only for a VAE whose config says it is fp16-safe "
                                    "(force_upcast = false, e.g. sdxl-vae-fp16-fix).", choices=DTYPES)
    text_dtype: str = opt("float32", "Text encoders' precision.", choices=DTYPES)
    latent: str = opt("mean", "Latent of the VAE's distribution: its mean, or a sample (seeded per item).",
                      choices=("mean", "sample"))
    flip: bool = opt(False, "Also encode the horizontally flipped crop as its own latent (latent_flip).")
    crops_per_item: int = opt(1, "Crops encoded per item: the planned one, then random crops of the same bucket "
                                 "size from the resized image (seeded per item by `seed`); train picks one per "
                                 "epoch. Each costs a VAE pass (and one more with flip).", ge=1, le=64)
    max_windows: int = opt(3, "Longest caption in 75-token windows (3 = 225 tokens, as kohya's "
                              f"max_token_length); 1 = truncate at {WINDOW_TOKENS} tokens. Longer captions are cut and "
                              "counted.",
                           ge=1)
    caption_variants: int = opt(0, "Tag-shuffled variants encoded per item besides the caption as written "
                                   "(0 = only the caption as written).", ge=0)
    keep_tags: int = opt(1, "Leading tags kept in place when shuffling variants.", ge=0)
    tag_join: str = opt(", ", "Separator placed between tags in shuffled variants.", nonempty=True)
    seed: int = opt(0, "Seed of caption shuffles and sampled latents (per item, so ranks agree).", **SEED_RANGE)
    pixels: str = opt("none", "Also store each planned crop's pixels (uint8 RGB, the crop its latent was encoded "
                              "from), for VAE training (train --target vae): a lossless png or webp member per "
                              "sample in tar shards, a uint8 array in zarr (compressed by zarr_compression); "
                              "none = latents only.", choices=PIXEL_FORMATS)
    token_ids: bool = opt(False, "Also store both tokenizers' ids per variant (for text-encoder training).")
    clip: bool = opt(False, "Also store CLIP image and caption embeddings with their cosine similarity.")
    clip_model: str | None = opt(None, "A transformers CLIPModel folder (e.g. clip-vit-large-patch14) for "
                                       "--clip [default with a builtin model: a tiny random CLIP].",
                                 fingerprint=False, nonempty=True)
    reuse: bool = opt(True, "Reuse the samples of the previous output at --out whose item (content, crop, "
                            "captions), model and shaping options are unchanged: only new or changed items are "
                            "encoded, and the output equals a fresh encode. --no-reuse encodes every item.",
                      fingerprint=False)
    decoder: str = opt("auto", "Image decoder: DALI (GPU when present, else CPU), PIL, or auto (DALI when "
                               "installed). The resolved decoder is fingerprinted.",
                       choices=("auto", "dali", "pil"), fingerprint=False)
    batch_size: int = opt(8, "Images per encoder batch.", fingerprint=False, ge=1)
    workers: int = opt(2, "Decode processes (PIL) or threads (DALI) working ahead of the encoder.",
                       fingerprint=False, ge=0)
    device: str = opt("auto", "auto (the launcher's LOCAL_RANK GPU when CUDA is present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("encode needs a model: --model builtin:tiny | builtin:sdxl-random | FOLDER "
                              "(or `model` in [pipeline])")
        if self.zarr_compression in ("lz4", "blosc") and self.zarr_level > 9:  # each field's own range: config.build
            raise ConfigError(f"zarr_level: {self.zarr_level} is outside [0, 9], the levels of "
                              f"{self.zarr_compression} (zstd takes up to 22: --zarr-compression zstd)")
        object.__setattr__(self, "input", self.input or graph.default_input(self.workdir, "encode"))
        object.__setattr__(self, "output", self.output or self.workdir / "encode")

    @property
    def wds(self) -> bool:
        return self.format in ("wds", "both")

    @property
    def zarr(self) -> bool:
        return self.format in ("zarr", "both")
