"""`sdxl encode`: VAE latents, SDXL text embeddings (and optional CLIP embeddings) into shards.

Reads bucket's plan. Items of one bucket are cut into shards of `shard_samples`; shards are the unit of work
of ranks (shard i belongs to rank i mod WORLD_SIZE) and of resumption (a shard is written to a temporary name,
renamed, then marked done; a rerun skips marked shards and redoes the rest). Rank 0 writes the index and the
manifest once every shard is marked. See README "encode" for the arrays stored per sample.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.core import artifacts, outputs, ranks
from shared.models import loading as models
from shared.formats import shards
from shared.core.artifacts import Manifest
from shared.core.config import SEED_RANGE, opt
from stages.encode.decode import dali_batches, pil_batches, resolve_decoder
from shared.core.errors import ConfigError, DataError
from shared.core.faults import checkpoint
from shared.formats.jsonl import read_jsonl
from shared.core.log import progress, say, table, warn
from shared.core.stage import BuildResult, Stage, execute
from shared.models.text import encode_captions, time_ids

VERSION = 3  # 2: index.json holds per-shard repeats and the tag frequency; 3: file hashes, zarr digests
BUCKET_VERSIONS = (1,)
PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Config:
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    input: Path | None = opt(None, "Bucket output folder [default: <workdir>/bucket].", flag="--in",
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
    zarr_compression: str = opt("blosc", "zarr codec: blosc (zstd + bit shuffle), zstd or none.",
                                choices=("blosc", "zstd", "none"))
    zarr_level: int = opt(5, "zarr compression level (blosc takes 0-9, zstd 0-22).", ge=0, le=22)
    vae_dtype: str = opt("float32", "VAE precision. float16 only for a VAE whose config says it is fp16-safe "
                                    "(force_upcast = false, e.g. sdxl-vae-fp16-fix).", choices=DTYPES)
    text_dtype: str = opt("float32", "Text encoders' precision.", choices=DTYPES)
    latent: str = opt("mean", "Latent of the VAE's distribution: its mean, or a sample (seeded per item).",
                      choices=("mean", "sample"))
    flip: bool = opt(False, "Also encode the horizontally flipped crop as its own latent (latent_flip).")
    max_windows: int = opt(3, "Longest caption in 75-token windows (3 = 225 tokens, as kohya's "
                              "max_token_length); 1 = truncate at 77 tokens. Longer captions are cut and counted.",
                           ge=1)
    caption_variants: int = opt(0, "Tag-shuffled variants encoded per item besides the caption as written "
                                   "(0 = only the caption as written).", ge=0)
    keep_tags: int = opt(1, "Leading tags kept in place when shuffling variants.", ge=0)
    tag_join: str = opt(", ", "Separator placed between tags in shuffled variants.", nonempty=True)
    seed: int = opt(0, "Seed of caption shuffles and sampled latents (per item, so ranks agree).", **SEED_RANGE)
    token_ids: bool = opt(False, "Also store both tokenizers' ids per variant (for text-encoder training).")
    clip: bool = opt(False, "Also store CLIP image and caption embeddings with their cosine similarity.")
    clip_model: str | None = opt(None, "A transformers CLIPModel folder (e.g. clip-vit-large-patch14) for "
                                       "--clip [default with a builtin model: a tiny random CLIP].",
                                 fingerprint=False, nonempty=True)
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
        if self.zarr_compression == "blosc" and self.zarr_level > 9:  # each field's own range: config.build
            raise ConfigError(f"zarr_level: {self.zarr_level} is outside [0, 9], the levels of blosc (zstd "
                              f"takes up to 22: --zarr-compression zstd)")
        object.__setattr__(self, "input", self.input or self.workdir / "bucket")
        object.__setattr__(self, "output", self.output or self.workdir / "encode")

    @property
    def wds(self) -> bool:
        return self.format in ("wds", "both")

    @property
    def zarr(self) -> bool:
        return self.format in ("zarr", "both")


@dataclass(frozen=True)
class Shard:
    number: int           # global, in bucket order then shard order
    bucket: tuple[int, int]
    index: int            # within the bucket
    first: int            # index of its first sample within the bucket
    items: tuple

    @property
    def group(self) -> str:
        return f"{self.bucket[0]}x{self.bucket[1]}"

    @property
    def name(self) -> str:
        return f"shards/{self.group}/{self.index:06d}.tar"

    @property
    def marker(self) -> str:
        return f"done/{self.group}/{self.index:06d}.json"


def layout(items: list[dict], shard_samples: int) -> list[Shard]:
    """Shards: per bucket (sorted by width, height), consecutive runs of the plan's items."""
    by_bucket: dict[tuple[int, int], list[dict]] = {}
    for item in items:
        by_bucket.setdefault(tuple(item["bucket"]), []).append(item)
    out = []
    for bucket in sorted(by_bucket):
        members = by_bucket[bucket]
        for k, start in enumerate(range(0, len(members), shard_samples)):
            out.append(Shard(len(out), bucket, k, start, tuple(members[start:start + shard_samples])))
    return out


def _item_seed(seed: int, item_id: str, purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{item_id}".encode()).digest()[:8], "little") >> 1


def caption_variants(item: dict, cfg: Config) -> list[str]:
    """The caption as written, then `caption_variants` tag shuffles keeping the first `keep_tags` in place."""
    out = [item.get("caption") or ""]
    tags = list(item.get("tags") or [])
    rng = random.Random(_item_seed(cfg.seed, item["id"], "variants"))
    for _ in range(cfg.caption_variants):
        head, tail = tags[:cfg.keep_tags], tags[cfg.keep_tags:]
        rng.shuffle(tail)
        out.append(cfg.tag_join.join(head + tail))
    return out


def _conditioning(item: dict) -> dict:
    """SDXL micro-conditioning (heights first), for the crop and for its mirror image."""
    w, h = item["width"], item["height"]
    bw, bh = item["bucket"]
    left, top = item["crop"]
    flipped_left = item["resize"][0] - left - bw
    return {"original_size": [h, w], "crop_top_left": [top, left], "target_size": [bh, bw],
            "time_ids": time_ids((h, w), (top, left), (bh, bw)),
            "time_ids_flip": time_ids((h, w), (top, flipped_left), (bh, bw))}


# ---------------------------------------------------------------- the encoders


class Encoders:
    """The loaded VAE and text encoders (and CLIP) on this rank's device, with the precision policy."""

    def __init__(self, cfg: Config, device: str):
        import torch

        self.cfg, self.device = cfg, torch.device(device)
        self.model = models.load_model(cfg.model, PARTS if cfg.vae is None else PARTS[1:])
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

    def latents(self, pixels: Any, ids: list[str], flipped: bool = False) -> Any:
        """Scaled latents of uint8 [B, H, W, 3] pixels; NaN/inf is an error naming the fix."""
        import torch

        x = pixels.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        if flipped:
            x = x.flip(-1)
        x = x.to(self.vae_dtype) / 127.5 - 1.0
        with torch.no_grad():
            dist = self.model.vae.encode(x).latent_dist
            z = dist.mean
            if self.cfg.latent == "sample":
                noise = torch.stack([torch.randn(z.shape[1:], generator=torch.Generator().manual_seed(
                    _item_seed(self.cfg.seed, i + (":flip" if flipped else ""), "latent"))) for i in ids])
                z = z + dist.std * noise.to(z.device, z.dtype)
            z = (z.float() - self.shift) * self.scale
        bad = [ids[k] for k in range(len(ids)) if not torch.isfinite(z[k]).all()]
        if bad:
            raise DataError(f"the VAE produced NaN/inf latents for {len(bad)} item(s) (first: {bad[0]}) in "
                            f"{self.cfg.vae_dtype}; encode with --vae-dtype float32 (the SDXL VAE overflows "
                            f"in float16)")
        return z

    def texts(self, captions: list[str]) -> list[dict]:
        import torch

        out = encode_captions(self.model, captions, self.cfg.max_windows)
        for c, r in zip(captions, out):
            if not (torch.isfinite(r["hidden"]).all() and torch.isfinite(r["pooled"]).all()):
                raise DataError(f"the text encoders produced NaN/inf for caption {c[:60]!r} in "
                                f"{self.cfg.text_dtype}; use --text-dtype float32")
        return out

    def clip_embeddings(self, pixels: Any, captions: list[str]) -> tuple[Any, Any]:
        """L2-normalised CLIP image and caption embeddings (OpenAI CLIP preprocessing: shortest side to the
        model's image size, bicubic, centre crop, CLIP mean/std)."""
        import torch
        import torch.nn.functional as F

        size = self.clip.config.vision_config.image_size
        x = pixels.to(self.device).permute(0, 3, 1, 2).float() / 255.0
        h, w = x.shape[-2:]
        scale = size / min(h, w)
        x = F.interpolate(x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bicubic",
                          antialias=True, align_corners=False)
        top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
        x = x[..., top:top + size, left:left + size].clamp(0, 1)
        mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], device=x.device).view(1, 3, 1, 1)
        std = torch.tensor([0.26862954, 0.26130258, 0.27577711], device=x.device).view(1, 3, 1, 1)
        tokens = self.clip_tokenizer(captions, padding="max_length", truncation=True, max_length=77,
                                     return_tensors="pt").to(self.device)
        with torch.no_grad():
            image = self.clip.get_image_features(pixel_values=(x - mean) / std)
            text = self.clip.get_text_features(**tokens)
        image = getattr(image, "pooler_output", image)
        text = getattr(text, "pooler_output", text)
        return F.normalize(image.float(), dim=-1), F.normalize(text.float(), dim=-1)


# ---------------------------------------------------------------- one shard


def _sample(cfg: Config, item: dict, latent: Any, latent_flip: Any, texts: list[dict], clip: tuple | None) -> dict:
    """One sample's arrays (stored dtype) and metadata."""
    store = np.float16 if cfg.storage_dtype == "float16" else np.float32
    n = max(t["windows"] for t in texts) * 77
    te = np.zeros((len(texts), n, texts[0]["hidden"].shape[-1]), store)
    for v, t in enumerate(texts):
        te[v, :t["hidden"].shape[0]] = t["hidden"].float().cpu().numpy()
    sample = {"__key__": item["id"], "latent.npy": latent.cpu().numpy().astype(store), "te.npy": te,
              "pooled.npy": np.stack([t["pooled"].float().cpu().numpy() for t in texts]).astype(store)}
    if latent_flip is not None:
        sample["latent_flip.npy"] = latent_flip.cpu().numpy().astype(store)
    if cfg.token_ids:
        ids = np.zeros((len(texts), 2, n), np.int32)
        for v, t in enumerate(texts):
            ids[v, :, :t["ids"].shape[1]] = t["ids"].numpy()
        sample["ids.npy"] = ids
    meta = {"id": item["id"], "path": item["path"], "source": item["source"], "bucket": item["bucket"],
            "caption": item.get("caption") or "", "tags": item.get("tags") or [],
            "variants": [t["caption"] for t in texts], "windows": [t["windows"] for t in texts],
            "tag_weight": item.get("tag_weight", 1.0), "repeats": item.get("repeats", 1), **_conditioning(item)}
    if clip is not None:
        image, text = clip
        sample["clip_image.npy"] = image.cpu().numpy().astype(np.float32)
        sample["clip_text.npy"] = text.cpu().numpy().astype(np.float32)
        meta["clip_similarity"] = round(float((image * text).sum()), 6)
    sample["json"] = meta
    return sample


def _content_hash(samples: list[dict]) -> str:
    h = hashlib.sha256()
    for s in samples:
        for name, data in shards.sample_members(s):
            h.update(name.encode("utf-8", "surrogateescape"))
            h.update(data)
    return h.hexdigest()


def _zarr_write(cfg: Config, staging: Path, shard: Shard, samples: list[dict]) -> str:
    """Write the shard's rows; return the digest of what the store now holds for them (read back)."""
    store = shards.open_store(staging / "zarr", mode="a")
    g = store[shard.group]
    lo, hi = shard.first, shard.first + len(samples)
    g["latent"][lo:hi] = np.stack([s["latent.npy"] for s in samples])
    if cfg.flip:
        g["latent_flip"][lo:hi] = np.stack([s["latent_flip.npy"] for s in samples])
    te, windows = g["te"], np.zeros((len(samples), 1 + cfg.caption_variants), np.int16)
    block = np.zeros((len(samples),) + te.shape[1:], te.dtype)
    ids = np.zeros((len(samples),) + g["ids"].shape[1:], np.int32) if cfg.token_ids else None
    for k, s in enumerate(samples):
        block[k, :, :s["te.npy"].shape[1]] = s["te.npy"]
        windows[k] = s["json"]["windows"]
        if ids is not None:
            ids[k, :, :, :s["ids.npy"].shape[2]] = s["ids.npy"]
    te[lo:hi] = block
    g["te_windows"][lo:hi] = windows
    g["pooled"][lo:hi] = np.stack([s["pooled.npy"] for s in samples])
    if ids is not None:
        g["ids"][lo:hi] = ids
    g["time_ids"][lo:hi] = np.array([s["json"]["time_ids"] for s in samples], np.float32)
    g["time_ids_flip"][lo:hi] = np.array([s["json"]["time_ids_flip"] for s in samples], np.float32)
    g["tag_weight"][lo:hi] = np.array([s["json"]["tag_weight"] for s in samples], np.float32)
    g["repeats"][lo:hi] = np.array([s["json"]["repeats"] for s in samples], np.int32)
    if cfg.clip:
        g["clip_image"][lo:hi] = np.stack([s["clip_image.npy"] for s in samples])
        g["clip_text"][lo:hi] = np.stack([s["clip_text.npy"] for s in samples])
        g["clip_similarity"][lo:hi] = np.array([s["json"]["clip_similarity"] for s in samples], np.float32)
    return _zarr_rows_digest(g, lo, hi)


def _zarr_rows_digest(g: Any, lo: int, hi: int) -> str:
    return shards.zarr_digest({name: np.asarray(g[name][lo:hi]) for name in g.array_keys()},
                              list(g.attrs["keys"][lo:hi]))


def _tag_counts(tag_lists: Any) -> dict[str, int]:
    counts: dict[str, int] = {}
    for tags in tag_lists:
        for t in tags:
            counts[t] = counts.get(t, 0) + 1
    return counts


def _finish_shard(cfg: Config, staging: Path, shard: Shard, samples: list[dict], truncated: int) -> None:
    """Tar to a temporary name, zarr rows, rename, then the marker: a marker means the shard is complete."""
    record = {"name": shard.name if cfg.wds else None, "bucket": list(shard.bucket), "shard": shard.index,
              "first": shard.first, "samples": len(samples), "content_sha256": _content_hash(samples),
              "truncated_captions": truncated, "keys": [s["__key__"] for s in samples],
              "repeats": [int(s["json"]["repeats"]) for s in samples],
              "tags": _tag_counts(s["json"]["tags"] for s in samples)}
    if cfg.clip:
        record["clip_similarity"] = [s["json"]["clip_similarity"] for s in samples]
    final = staging / shard.name
    if cfg.wds:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(final.name + ".partial")
        record.update(shards.write_tar(tmp, samples))
    if cfg.zarr:
        record["zarr_sha256"] = _zarr_write(cfg, staging, shard, samples)
    if cfg.wds:
        tmp.replace(final)
    checkpoint("encode.shard")
    marker = staging / shard.marker
    marker.parent.mkdir(parents=True, exist_ok=True)
    artifacts.write_atomic(marker, json.dumps(record) + "\n")


# ---------------------------------------------------------------- the stage


def _plan(cfg: Config) -> artifacts.Manifest:
    return artifacts.require_input(cfg.input, "bucket", BUCKET_VERSIONS, f"sdxl bucket --out {cfg.input}")


def _inputs(cfg: Config) -> dict:
    manifest = _plan(cfg)
    identity = models.model_identity(cfg.model, PARTS, cfg.vae)
    decoder = resolve_decoder(cfg.decoder)
    return {"bucket": {"path": str(cfg.input), "fingerprint": manifest.fingerprint,
                       "what": "bucket plan changed"},
            "model": {"name": cfg.model, "vae": cfg.vae, "components": identity,
                      "fingerprint": artifacts.hash_json(identity), "what": f"weights of {cfg.model}"},
            "decoder": {"name": decoder, "fingerprint": decoder, "what": f"decoder is now {decoder}"}}


def _specs(cfg: Config, enc: Encoders, bucket: tuple[int, int], count: int) -> dict:
    """zarr arrays of one bucket group: {name: (shape, dtype)}."""
    store = cfg.storage_dtype
    v, length = 1 + cfg.caption_variants, cfg.max_windows * 77
    lat = (enc.latent_channels, bucket[1] // 8, bucket[0] // 8)
    specs = {"latent": ((count,) + lat, store), "te": ((count, v, length, enc.te_dim), store),
             "te_windows": ((count, v), "int16"), "pooled": ((count, v, enc.pooled_dim), store),
             "time_ids": ((count, 6), "float32"), "time_ids_flip": ((count, 6), "float32"),
             "tag_weight": ((count,), "float32"), "repeats": ((count,), "int32")}
    if cfg.flip:
        specs["latent_flip"] = ((count,) + lat, store)
    if cfg.token_ids:
        specs["ids"] = ((count, v, 2, length), "int32")
    if cfg.clip:
        dim = enc.clip.config.projection_dim
        specs.update(clip_image=((count, dim), "float32"), clip_text=((count, dim), "float32"),
                     clip_similarity=((count,), "float32"))
    return specs


def _prepare(cfg: Config, staging: Path, plan: list[Shard], enc: Encoders) -> None:
    """Rank 0, before any shard: the zarr layout and the empty caption's embedding; then the `ready` marker."""
    if (staging / "ready").exists():
        return
    empty = staging / "empty"
    empty.mkdir(exist_ok=True)
    (e,) = enc.texts([""])
    store = np.float16 if cfg.storage_dtype == "float16" else np.float32
    np.save(empty / "te.npy", e["hidden"].float().cpu().numpy().astype(store), allow_pickle=False)
    np.save(empty / "pooled.npy", e["pooled"].float().cpu().numpy().astype(store), allow_pickle=False)
    np.save(empty / "ids.npy", e["ids"].numpy(), allow_pickle=False)
    if cfg.zarr:
        z = shards.open_store(staging / "zarr", mode="a")
        codecs = shards.zarr_codecs(cfg.zarr_compression, cfg.zarr_level)
        groups: dict[tuple[int, int], list[str]] = {}
        for s in plan:
            groups.setdefault(s.bucket, []).extend(i["id"] for i in s.items)
        for bucket, keys in groups.items():
            shards.create_arrays(z, f"{bucket[0]}x{bucket[1]}", _specs(cfg, enc, bucket, len(keys)), codecs,
                                 {"keys": keys, "bucket": list(bucket)})
    artifacts.write_atomic(staging / "ready", "ready\n")


def _encode_shards(cfg: Config, staging: Path, todo: list[Shard], enc: Encoders, rank: ranks.Rank) -> int:
    """Encode this rank's unfinished shards; returns the number of captions cut by max_windows."""
    batches, owners = [], []
    for s in todo:
        for start in range(0, len(s.items), cfg.batch_size):
            batches.append(s.items[start:start + cfg.batch_size])
            owners.append(s)
    decoder = resolve_decoder(cfg.decoder)
    on_gpu = enc.device.type == "cuda"
    if decoder == "dali":
        stream = dali_batches(batches, cfg.batch_size, cfg.workers, enc.device.index if on_gpu else None)
    else:
        stream = pil_batches(batches, cfg.workers, pin=on_gpu)
    label = "encode" if rank.world == 1 else f"encode rank {rank.rank}"
    bar = progress(range(sum(len(s.items) for s in todo)), sum(len(s.items) for s in todo), label, "img")
    pending: list[dict] = []
    truncated = total_truncated = 0
    for k, (items, pixels) in enumerate(zip(batches, stream)):
        ids = [i["id"] for i in items]
        lat = enc.latents(pixels, ids)
        lat_flip = enc.latents(pixels, ids, flipped=True) if cfg.flip else None
        variants = [caption_variants(i, cfg) for i in items]
        flat = enc.texts([c for vs in variants for c in vs])
        clip = enc.clip_embeddings(pixels, [vs[0] for vs in variants]) if cfg.clip else None
        pos = 0
        for j, item in enumerate(items):
            texts = flat[pos:pos + len(variants[j])]
            for t, c in zip(texts, variants[j]):
                t["caption"] = c
            pos += len(variants[j])
            truncated += sum(t["truncated"] for t in texts)
            pending.append(_sample(cfg, item, lat[j], None if lat_flip is None else lat_flip[j], texts,
                                   None if clip is None else (clip[0][j], clip[1][j])))
            next(bar, None)
        checkpoint("encode.batch")
        if k + 1 == len(batches) or owners[k + 1] is not owners[k]:
            _finish_shard(cfg, staging, owners[k], pending, truncated)
            total_truncated += truncated
            pending, truncated = [], 0
    for _ in bar:  # close the bar
        pass
    return total_truncated


def _build(cfg: Config, staging: Path) -> BuildResult | None:
    rank = ranks.current()
    items = list(read_jsonl(_plan(cfg).verified(cfg.input, "plan.jsonl", f"sdxl bucket --out {cfg.input}")))
    plan = layout(items, cfg.shard_samples)
    enc = Encoders(cfg, ranks.device(cfg.device, rank.local))
    if rank.main:
        _prepare(cfg, staging, plan, enc)
    else:
        ranks.wait_for((staging / "ready").exists, "rank 0 to prepare the output layout",
                       alive=_alive(cfg, [0]))
    mine = [s for s in plan if rank.owns(s.number)]
    todo = [s for s in mine if not (staging / s.marker).exists()]
    for s in todo:  # a shard killed half-way left at most a .partial file; it is redone from scratch
        (staging / (s.name + ".partial")).unlink(missing_ok=True)
    if rank.main and len(todo) < len(mine):
        say(f"encode: resuming: {len(mine) - len(todo)} of {len(mine)} shards of this rank already done")
    _encode_shards(cfg, staging, todo, enc, rank)
    if not rank.main:
        say(f"encode rank {rank.rank}: {len(todo)} shards done")
        return None
    missing = [s for s in plan if not (staging / s.marker).exists()]
    if missing:
        say(f"encode: waiting for {len(missing)} shards of other ranks")
        owners = sorted({s.number % rank.world for s in missing})
        ranks.wait_for(lambda: all((staging / s.marker).exists() for s in missing),
                       f"{len(missing)} shards of rank(s) {', '.join(map(str, owners))}", alive=_alive(cfg, owners))
    return _finish(cfg, staging, plan, enc, len(items))


def _alive(cfg: Config, owners: list[int]) -> Any:
    """Whether the ranks `owners` of this job still hold their claim on the output (see shared/outputs.py)."""
    job = outputs.job_id(ranks.current().world)
    return lambda: all(outputs.partner_alive(cfg.output, r, job) for r in owners)


def _finish(cfg: Config, staging: Path, plan: list[Shard], enc: Encoders, n_items: int) -> BuildResult:
    """Index from the shard markers (rank 0, once every shard is done)."""
    records = [json.loads((staging / s.marker).read_text()) for s in plan]
    buckets: dict[str, dict] = {}
    for s, r in zip(plan, records):
        b = buckets.setdefault(s.group, {"bucket": list(s.bucket), "samples": 0, "shards": []})
        b["samples"] += r["samples"]
        b["shards"].append({k: r[k] for k in ("name", "shard", "first", "samples", "repeats", "bytes", "sha256",
                                              "content_sha256", "zarr_sha256") if k in r})
    tags: dict[str, int] = {}
    for r in records:
        for t, n in r["tags"].items():
            tags[t] = tags.get(t, 0) + n
    index = {"format": cfg.format, "samples": sum(r["samples"] for r in records), "variants": 1 + cfg.caption_variants,
             "flip": cfg.flip, "token_ids": cfg.token_ids, "clip": cfg.clip, "storage_dtype": cfg.storage_dtype,
             "max_windows": cfg.max_windows, "latent_channels": enc.latent_channels, "scaling_factor": enc.scale,
             "te_dim": enc.te_dim, "pooled_dim": enc.pooled_dim, "buckets": list(buckets.values()),
             "tag_frequency": dict(sorted(tags.items(), key=lambda kv: (-kv[1], kv[0])))}
    artifacts.write_atomic(staging / "index.json", json.dumps(index, indent=1) + "\n")
    truncated = sum(r["truncated_captions"] for r in records)
    if truncated:
        warn(f"{truncated} captions (counting variants) were longer than max_windows = {cfg.max_windows} windows "
             f"({cfg.max_windows * 75} tokens) and were cut")
    say(table(["bucket", "samples", "shards"], [[k, v["samples"], len(v["shards"])] for k, v in buckets.items()]))
    extra: dict[str, Any] = {"shards": len(plan), "truncated_captions": truncated}
    if cfg.clip:
        extra["clip"] = _clip_summary(plan, records)
    return BuildResult({"in": n_items, "out": index["samples"], "dropped": {}}, extra)


def _clip_summary(plan: list[Shard], records: list[dict]) -> dict:
    sims = [(sim, key) for r in records for sim, key in zip(r["clip_similarity"], r["keys"])]
    values = np.array([s for s, _ in sims], np.float64)
    lowest = sorted(sims)[:10]
    return {"mean": round(float(values.mean()), 6), "min": round(float(values.min()), 6),
            "p05": round(float(np.percentile(values, 5)), 6), "max": round(float(values.max()), 6),
            "lowest": [{"id": k, "similarity": s} for s, k in lowest]}


def repair(cfg: Config, staging: Path) -> None:
    """A damaged finished output moved back to staging: keep the marker of each shard whose tar and zarr rows
    still match its record, drop the others (and the index), so the build re-encodes only those."""
    (staging / "index.json").unlink(missing_ok=True)
    markers = sorted((staging / "done").glob("*/*.json"))
    store = None
    if cfg.zarr:
        try:
            store = shards.open_store(staging / "zarr", mode="r")
        except Exception:  # noqa: BLE001 - any failure to open means the store must be rebuilt
            store = None
        if store is None:
            for path in (staging / "zarr", staging / "done", staging / "ready"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            return
    bad = [m for m in markers if not _shard_intact(staging, json.loads(m.read_text(encoding="utf-8")), store)]
    for m in bad:
        m.unlink()
    if bad:
        warn(f"encode: {len(bad)} of {len(markers)} shards damaged; re-encoding them")


def _shard_intact(staging: Path, record: dict, store: Any) -> bool:
    name = record.get("name")
    if name:
        tar = staging / name
        if not tar.is_file() or tar.stat().st_size != record["bytes"] or \
                artifacts.sha256_file(tar) != record["sha256"]:
            return False
    if store is not None:
        try:
            g = store[f"{record['bucket'][0]}x{record['bucket'][1]}"]
            lo = record["first"]
            return _zarr_rows_digest(g, lo, lo + record["samples"]) == record.get("zarr_sha256")
        except Exception:  # noqa: BLE001 - unreadable rows are damaged rows
            return False
    return True


def _kept(staging: Path) -> str:
    done = len(list((staging / "done").glob("*/*.json")))
    return f"{done} finished shards are kept in {staging}"


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    return [("input folder", cfg.input)] + outputs.local_paths(
        {"model": cfg.model, "VAE": cfg.vae, "CLIP model": cfg.clip_model})


STAGE = Stage(name="encode", version=VERSION,
              module=__name__,
              out_dir=lambda cfg: cfg.output, inputs=_inputs, build=_build, resumable=True,
              protected=_protected, trees=("shards", "zarr"), repair=repair, kept=_kept)


def run(cfg: Config, force: bool = False) -> Manifest | None:
    """Encode the planned items into `<out>` (shards, zarr, index.json, empty/); rank 0 returns the manifest."""
    return execute(STAGE, cfg, force)
