"""Aspect-ratio bucket math as small pure functions.

Generated buckets follow NovelAI's scheme (Ossa et al. 2024; the NovelAI aspect-ratio-bucketing note): for
each width from min_side to max_side in steps of `step`, the largest height (a multiple of `step`, at most
max_side) that keeps width*height within max_area; both orientations; pairs beyond max_ratio are dropped.
An image goes to the bucket nearest in log aspect ratio, is resized to cover it and then cropped.
"""
from __future__ import annotations

import math
import random
from typing import Mapping, Sequence

Bucket = tuple[int, int]  # (width, height)


def generate_buckets(max_area: int, step: int = 64, min_side: int = 512, max_side: int = 2048,
                     max_ratio: float = 4.0) -> list[Bucket]:
    """Buckets of (near) max_area whose sides are multiples of `step`, sorted by aspect ratio."""
    found: set[Bucket] = set()
    width = min_side
    while width <= max_side:
        height = min(max_side, (max_area // width) // step * step)
        if height >= min_side and max(width / height, height / width) <= max_ratio:
            found.update({(width, height), (height, width)})
        width += step
    side = math.isqrt(max_area) // step * step
    if min_side <= side <= max_side:
        found.add((side, side))
    return sorted(found, key=lambda b: (b[0] / b[1], b[0]))


def log_aspect(width: float, height: float) -> float:
    return math.log(width / height)


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> Bucket:
    """The bucket nearest in log aspect ratio; ties go to the larger area, then the smaller width."""
    target = log_aspect(width, height)
    return min(buckets, key=lambda b: (abs(log_aspect(*b) - target), -b[0] * b[1], b[0]))


def cover_resize(width: int, height: int, bucket: Bucket) -> tuple[int, int, float]:
    """The size that covers `bucket` keeping the aspect ratio (one side exact), and the scale factor."""
    bw, bh = bucket
    scale = max(bw / width, bh / height)
    return max(bw, round(width * scale)), max(bh, round(height * scale)), scale


def crop_offset(resized: tuple[int, int], bucket: Bucket, mode: str, rng: random.Random | None = None) -> tuple[int, int]:
    """(left, top) of the bucket-sized window in the resized image: centred, or uniformly random."""
    spare_w, spare_h = resized[0] - bucket[0], resized[1] - bucket[1]
    if mode == "center":
        return spare_w // 2, spare_h // 2
    if rng is None:
        raise ValueError("random crop needs an rng")
    return rng.randint(0, spare_w), rng.randint(0, spare_h)


def aspect_error(width: int, height: int, bucket: Bucket) -> float:
    """|log(image aspect / bucket aspect)|: 0 for a perfect fit."""
    return abs(log_aspect(width, height) - log_aspect(*bucket))


def cropped_share(resized: tuple[int, int], bucket: Bucket) -> float:
    """Share of the resized image's pixels that the crop throws away."""
    return 1.0 - (bucket[0] * bucket[1]) / (resized[0] * resized[1])


def merge_small(counts: Mapping[Bucket, int], min_items: int) -> dict[Bucket, Bucket]:
    """Fold buckets holding fewer than `min_items` into their nearest (log aspect) non-empty neighbour.

    The smallest bucket is merged first, repeatedly, until every remaining bucket is big enough or one is
    left. Returns a map from every non-empty bucket to the bucket its items end in.
    """
    alive = {b: n for b, n in counts.items() if n > 0}
    target = {b: b for b in alive}
    while len(alive) > 1:
        small = [b for b, n in alive.items() if n < min_items]
        if not small:
            break
        victim = min(small, key=lambda b: (alive[b], log_aspect(*b), b))
        into = min((b for b in alive if b != victim),
                   key=lambda b: (abs(log_aspect(*b) - log_aspect(*victim)), -alive[b], b))
        alive[into] += alive.pop(victim)
        for src, dst in target.items():
            if dst == victim:
                target[src] = into
    return target
