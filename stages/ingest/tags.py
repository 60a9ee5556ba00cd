"""Tags: splitting captions into normalised tags, and NovelAI-style tag-frequency loss weights.

NovelAI (Ossa et al. 2024, arXiv 2409.15997) attenuates over-represented concepts by weighting each sample's
loss by its tags' dataset frequencies; the exact formula is unpublished. Ours, in three steps:

1. per tag t with count c_t (number of distinct items carrying it) and m = the median of all tag counts:
       w_t = (m / c_t) ** power
   so a tag at the median count weighs 1, a tag 4x as common weighs 4**-power.
2. per item: raw = the mean of w_t over its tags (an item with no tags has raw = 1).
3. normalise so the dataset mean of raw is 1, then clamp to [min_weight, max_weight].
   (After clamping the mean can drift from 1 slightly; the clamp bounds matter more than the exact mean.)
"""
from __future__ import annotations

import statistics
from typing import Iterable, Mapping, Sequence


def clean_caption(text: str) -> str:
    """A caption as kept: whitespace runs, newlines included, become one space (a stray NUL counts as one)."""
    return " ".join(text.replace("\x00", " ").split())


def split_tags(caption: str, separator: str = ",", lowercase: bool = False,
               underscores_to_spaces: bool = False) -> list[str]:
    """Tags of a caption: split on `separator`, stripped, empty ones dropped, duplicates dropped (first kept)."""
    seen: dict[str, None] = {}
    for raw in caption.split(separator):
        tag = " ".join(raw.split())
        if underscores_to_spaces:
            tag = " ".join(tag.replace("_", " ").split())
        if lowercase:
            tag = tag.lower()
        if tag and tag not in seen:
            seen[tag] = None
    return list(seen)


def tag_weights(counts: Mapping[str, int], power: float) -> dict[str, float]:
    """Per-tag weight (median_count / count) ** power."""
    if not counts:
        return {}
    median = statistics.median(counts.values())
    return {tag: (median / c) ** power for tag, c in counts.items()}


def raw_item_weight(tags: Sequence[str], weights: Mapping[str, float]) -> float:
    """Mean of the item's tag weights; 1.0 for an item without tags."""
    if not tags:
        return 1.0
    return sum(weights[t] for t in tags) / len(tags)


def normalise_weights(raw: Iterable[float], min_weight: float, max_weight: float) -> list[float]:
    """Scale so the mean is 1, then clamp to [min_weight, max_weight]."""
    raw = list(raw)
    if not raw:
        return []
    mean = sum(raw) / len(raw)
    return [min(max(r / mean, min_weight), max_weight) for r in raw]
