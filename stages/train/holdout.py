"""The held-out validation set: items chosen by a hash of their id, never trained on, evaluated at fixed
timesteps and noise at every evaluation.

An item is held out by its own hash alone, h(id) = sha256("holdout:" + id) read as a number in [0, 1): with a
fraction f, every item with h(id) < f (adding items never moves an existing item in or out; each new one joins
with probability f); with a count K, the K items of smallest h(id) (an added item displaces an old one only if
it hashes lower than the K-th). The choice is made from the item ids index.json lists per shard (no shard is
read for it), written to `<out>/holdout.json` (ids and their shard positions), and train plans its epochs with
those positions' repeats set to 0, so they never reach a training batch. Only the shards holding a held-out
item are then read, for its samples.
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
from shared.core.config import opt
from shared.core.groups import borrowed

FILE = "holdout.json"


@dataclass(frozen=True, kw_only=True)
class HoldoutConfig:
    """The held-out set: options of `sdxl train` (config.py composes them)."""
    holdout: float = opt(0.0, "Fraction of the items held out for validation, chosen by a hash of the item id "
                              "(adding items never moves an existing one in or out); never trained on, recorded in "
                              "<out>/holdout.json, their loss (fixed noise and timesteps) logged as val_loss at "
                              "every evaluation; 0 = off.", ge=0, le=0.5)
    holdout_count: int = opt(0, "Or hold out this many items (the smallest id hashes); 0 = off.", ge=0)
    item_losses: bool = borrowed()

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


def from_index(infos: list[Any], cfg: HoldoutConfig) -> Holdout:
    """The held-out ids and their positions, from the shards' item ids as index.json lists them (no shard
    read; no samples yet)."""
    found = [(key, info.number, j) for info in infos for j, key in enumerate(info.keys)]
    held = choose([k for k, *_ in found], cfg.holdout, cfg.holdout_count)
    found = sorted((f for f in found if f[0] in held), key=lambda f: (score(f[0]), f[0]))
    if not found:
        raise InputError(f"holdout {cfg.holdout:g} / holdout_count {cfg.holdout_count}: no item was held out of "
                         f"{sum(i.samples for i in infos)}; raise it")
    return Holdout(sorted(held), [(n, j) for _, n, j in found], [])


def write(folder: Path, held: Holdout, cfg: HoldoutConfig) -> None:
    artifacts.write_atomic(folder / FILE, json.dumps({"holdout": cfg.holdout, "holdout_count": cfg.holdout_count,
                                                      "ids": held.ids, "refs": [list(r) for r in held.refs]}) + "\n")


def read(folder: Path) -> Holdout:
    data = json.loads((folder / FILE).read_text(encoding="utf-8"))
    return Holdout(data["ids"], [tuple(r) for r in data["refs"]], [])


def with_samples(data: Any, held: Holdout) -> Holdout:
    """`held` with its samples, read from the shards its refs name, in the refs' order; each with memory of its
    own (kept for the whole run, a view would keep its whole shard in memory)."""
    wanted = set(map(tuple, held.refs))
    found = {}
    for number in sorted({n for n, _ in held.refs}):
        for j, sample in data.read(number):
            if (number, j) in wanted:
                found[(number, j)] = sample.detached()
    return dataclasses.replace(held, samples=[found[tuple(r)] for r in held.refs])


def without(infos: list[Any], refs: list[tuple[int, int]]) -> list[Any]:
    """The shards with every held-out sample's repeats set to 0: the epoch plan never draws them."""
    held = set(map(tuple, refs))
    return [dataclasses.replace(i, repeats=tuple(0 if (i.number, j) in held else r for j, r in enumerate(i.repeats)))
            if any(n == i.number for n, _ in held) else i for i in infos]


def prepare(data: Any, cfg: HoldoutConfig, staging: Path, main: bool, barrier: Any,
            samples_everywhere: bool = False) -> Holdout:
    """Choose the held-out set (main rank, from the index; its samples read from the shards holding them), record
    it in the output, and take it out of every rank's epoch plan (`data.infos`). The other ranks get its samples
    too with `samples_everywhere` (a sharded model: every process takes part in the validation's forward
    passes)."""
    from shared.core.log import say

    if main:
        held = with_samples(data, from_index(data.infos, cfg))
        write(staging, held, cfg)
        say(f"train: {len(held.ids)} items held out for validation ({FILE})")
    barrier()
    if not main:
        held = read(staging)
        if samples_everywhere:
            held = with_samples(data, held)
    data.infos = without(data.infos, held.refs)
    return held
