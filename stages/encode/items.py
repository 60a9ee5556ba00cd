"""encode's pure per-item functions: the captions encoded per item, SDXL's micro-conditioning, and packing an
item's encoder outputs into its sample record. No model and no file here; each is unit-tested on hand-made
inputs (tests/test_encode.py)."""
from __future__ import annotations

import dataclasses
import hashlib
import random
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from shared.formats.plan import PlanRow
from shared.formats.samples import WINDOW_TOKENS, Sample
from shared.models.text import time_ids


@dataclass(frozen=True, eq=False)
class Text:
    """One caption through both text encoders (float32 numpy, as the encoders gave it)."""
    caption: str
    hidden: np.ndarray   # [windows * WINDOW_TOKENS, te_dim]
    pooled: np.ndarray   # [pooled_dim]
    ids: np.ndarray      # [2, windows * WINDOW_TOKENS] int32, both tokenizers
    windows: int
    truncated: bool      # cut at max_windows


def item_seed(seed: int, item_id: str, purpose: str) -> int:
    """A seed per (config seed, item, purpose): the same draw on every rank and every rerun."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{purpose}:{item_id}".encode()).digest()[:8], "little") >> 1


def caption_variants(row: PlanRow, count: int, keep_tags: int, tag_join: str, seed: int) -> list[str]:
    """The caption as written, then `count` tag shuffles keeping the first `keep_tags` tags in place."""
    out = [row.caption or ""]
    tags = list(row.tags)
    rng = random.Random(item_seed(seed, row.id, "variants"))
    for _ in range(count):
        head, tail = tags[:keep_tags], tags[keep_tags:]
        rng.shuffle(tail)
        out.append(tag_join.join(head + tail))
    return out


def conditioning(row: PlanRow) -> dict:
    """SDXL micro-conditioning (heights first) for the planned crop and for its mirror image, whose left edge
    is measured from the other side of the resized image."""
    w, h = row.width, row.height
    bw, bh = row.bucket
    left, top = row.crop
    flipped_left = row.resize[0] - left - bw
    return {"original_size": (h, w), "crop_top_left": (top, left), "target_size": (bh, bw),
            "time_ids": tuple(time_ids((h, w), (top, left), (bh, bw))),
            "time_ids_flip": tuple(time_ids((h, w), (top, flipped_left), (bh, bw)))}


def extra_crops(row: PlanRow, crops: int, seed: int) -> list[tuple[int, int]]:
    """(left, top) of the item's crops 1..crops-1: bucket-sized windows at uniformly random offsets in the resized
    image, drawn from a generator of (seed, item) so every rank and rerun draws the same ones. (Crop 0 is the
    plan's.)"""
    rng = random.Random(item_seed(seed, row.id, "crops"))
    spare_w, spare_h = row.resize[0] - row.bucket[0], row.resize[1] - row.bucket[1]
    return [(rng.randint(0, spare_w), rng.randint(0, spare_h)) for _ in range(crops - 1)]


def crop_conditioning(row: PlanRow, crops: Sequence[tuple[int, int]]) -> dict:
    """The extra crops' micro-conditioning (none without extra crops)."""
    if not crops:
        return {}
    each = [conditioning(dataclasses.replace(row, crop=tuple(c))) for c in crops]
    return {"time_ids_crops": tuple(c["time_ids"] for c in each),
            "time_ids_flip_crops": tuple(c["time_ids_flip"] for c in each)}


def pack_sample(row: PlanRow, latent: np.ndarray, texts: list[Text], storage_dtype: str,
                latent_flip: np.ndarray | None = None, token_ids: bool = False,
                clip: tuple[np.ndarray, np.ndarray] | None = None, pixels: np.ndarray | None = None,
                crops: Sequence[tuple[int, int]] = (), latent_crops: np.ndarray | None = None,
                latent_flip_crops: np.ndarray | None = None) -> Sample:
    """The sample record of one item: arrays in `storage_dtype`, every variant's states padded to the longest
    variant's windows (zeros after; `windows` says how many are valid), CLIP similarity rounded to 6 places;
    `pixels` (uint8 [H, W, 3], the planned crop) kept as given; with extra crops (`crops`: their (left, top))
    their latents [crops, C, h, w] and time ids."""
    store = np.dtype(storage_dtype)
    n = max(t.windows for t in texts) * WINDOW_TOKENS
    te = np.zeros((len(texts), n, texts[0].hidden.shape[-1]), store)
    ids = np.zeros((len(texts), 2, n), np.int32) if token_ids else None
    for v, t in enumerate(texts):
        te[v, :t.hidden.shape[0]] = t.hidden
        if ids is not None:
            ids[v, :, :t.ids.shape[1]] = t.ids
    extra = {}
    if clip is not None:
        image, text = (np.asarray(x, np.float32) for x in clip)
        extra = {"clip_image": image, "clip_text": text, "clip_similarity": round(float((image * text).sum()), 6)}
    if crops:
        extra["latent_crops"] = latent_crops.astype(store)
        if latent_flip_crops is not None:
            extra["latent_flip_crops"] = latent_flip_crops.astype(store)
    arrays = Sample(key=row.id, latent=latent.astype(store), te=te, windows=tuple(t.windows for t in texts),
                    pooled=np.stack([t.pooled for t in texts]).astype(store), time_ids=(), time_ids_flip=(),
                    latent_flip=None if latent_flip is None else latent_flip.astype(store), ids=ids,
                    pixels=None if pixels is None else np.ascontiguousarray(pixels, np.uint8), **extra)
    return described(row, [t.caption for t in texts], arrays, crops)


def described(row: PlanRow, variants: Sequence[str], sample: Sample, crops: Sequence[tuple[int, int]] = ()
              ) -> Sample:
    """`sample`'s arrays (latents, text states and windows, ids, CLIP) with everything else from `row`: what
    the plan says of the item and its micro-conditioning (and its extra `crops`'). Fresh and reused samples both
    go through here, so a reused one describes its item as it is now (tag weight, repeats, path), and equals a
    fresh one."""
    sim = sample.clip_similarity  # a zarr row holds it as float32; rounding gives back the stored value
    return dataclasses.replace(sample, key=row.id, tag_weight=row.tag_weight, repeats=row.repeats,
                               prior=row.role == "class", path=row.path,
                               source=row.source, bucket=row.bucket, caption=row.caption or "", tags=row.tags,
                               variants=tuple(variants), clip_similarity=None if sim is None else round(float(sim), 6),
                               **conditioning(row), **crop_conditioning(row, crops))
