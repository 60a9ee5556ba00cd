"""The held-out validation set: items chosen by a hash of their id, never trained on, evaluated at fixed
timesteps and noise at every evaluation.

An item is held out by its own hash alone, h(id) = sha256("holdout:" + id) read as a number in [0, 1): with a
fraction f, every item with h(id) < f (adding items never moves an existing item in or out; each new one joins
with probability f); with a count K, the K items of smallest h(id) (an added item displaces an old one only if
it hashes lower than the K-th). The choice is written to `<out>/holdout.json` (ids and their shard positions),
and train plans its epochs with those positions' repeats set to 0, so they never reach a training batch.
"""
from __future__ import annotations

import dataclasses
import hashlib
import heapq
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.core import artifacts
from shared.core.errors import InputError

FILE = "holdout.json"


@dataclass(frozen=True)
class HoldoutConfig:
    """The held-out set (flat keys of the same names)."""
    holdout: float          # fraction of items held out (by hash); 0 = off
    holdout_count: int      # or this many items (the smallest hashes); 0 = off
    item_losses: bool       # also log each evaluated item's loss (id, caption, loss) to logs/item_losses.jsonl

    @property
    def on(self) -> bool:
        return bool(self.holdout or self.holdout_count)


def score(key: str) -> float:
    """h(id) in [0, 1): where the item falls, independent of every other item."""
    return int.from_bytes(hashlib.sha256(f"holdout:{key}".encode()).digest()[:8], "big") / 2 ** 64


def choose(keys: list[str], fraction: float, count: int) -> set[str]:
    """The held-out ids among `keys` (see the module's docstring)."""
    if count:
        return set(heapq.nsmallest(count, keys, key=score))
    return {k for k in keys if score(k) < fraction}


@dataclass
class Holdout:
    ids: list[str]                   # sorted
    refs: list[tuple[int, int]]      # (shard number, sample index) of each held-out sample
    samples: list[Any]               # the held-out samples (main rank; empty elsewhere)


def scan(data: Any, cfg: HoldoutConfig) -> Holdout:
    """One pass over every shard: the held-out samples (kept) and their positions."""
    found: list[tuple[str, int, int, Any]] = []
    for info in data.infos:
        for j, sample in data.read(info.number):
            if cfg.holdout_count or score(sample.key) < cfg.holdout:
                found.append((sample.key, info.number, j, sample))
    held = choose([k for k, *_ in found], cfg.holdout, cfg.holdout_count)
    found = sorted((f for f in found if f[0] in held), key=lambda f: (score(f[0]), f[0]))
    if not found:
        raise InputError(f"holdout {cfg.holdout:g} / holdout_count {cfg.holdout_count}: no item was held out of "
                         f"{sum(i.samples for i in data.infos)}; raise it")
    return Holdout(sorted(held), [(n, j) for _, n, j, _ in found], [s for *_, s in found])


def write(folder: Path, held: Holdout, cfg: HoldoutConfig) -> None:
    artifacts.write_atomic(folder / FILE, json.dumps({"holdout": cfg.holdout, "holdout_count": cfg.holdout_count,
                                                      "ids": held.ids, "refs": [list(r) for r in held.refs]}) + "\n")


def read(folder: Path) -> Holdout:
    data = json.loads((folder / FILE).read_text(encoding="utf-8"))
    return Holdout(data["ids"], [tuple(r) for r in data["refs"]], [])


def without(infos: list[Any], refs: list[tuple[int, int]]) -> list[Any]:
    """The shards with every held-out sample's repeats set to 0: the epoch plan never draws them."""
    held = set(map(tuple, refs))
    return [dataclasses.replace(i, repeats=tuple(0 if (i.number, j) in held else r for j, r in enumerate(i.repeats)))
            if any(n == i.number for n, _ in held) else i for i in infos]


def prepare(data: Any, cfg: HoldoutConfig, staging: Path, main: bool, barrier: Any) -> Holdout:
    """Choose the held-out set (main rank, one pass over the data), record it in the output, and take it out of
    every rank's epoch plan (`data.infos`)."""
    from shared.core.log import say

    if main:
        held = scan(data, cfg)
        write(staging, held, cfg)
        say(f"train: {len(held.ids)} items held out for validation ({FILE})")
    barrier()
    if not main:
        held = read(staging)
    data.infos = without(data.infos, held.refs)
    return held
