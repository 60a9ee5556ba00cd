"""`sdxl bucket`: aspect-ratio buckets and a per-item resize/crop plan -> buckets.json, plan.jsonl.

Buckets are generated NovelAI-style or given as a list. Each item goes to the bucket nearest in log aspect
ratio; small buckets merge into their nearest neighbour; the item is resized to cover its bucket and cropped.
"""
from __future__ import annotations

import json
import random
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from shared.core import artifacts, graph
from stages.bucket import geometry as bucketing
from shared.core.artifacts import Manifest
from shared.core.config import SEED_RANGE, opt
from shared.core.errors import ConfigError
from shared.core.faults import checkpoint
from shared.formats import items as itemfile
from shared.formats.items import ITEMS, Item, Rejection, RejectedWriter
from shared.formats.plan import PLAN, PLAN_VERSION, PlanRow, PlanWriter
from shared.core.log import progress, say, table, warn
from stages.bucket.plots import bar_chart
from shared.core.stage import BuildResult, Stage, execute

VERSION = PLAN_VERSION  # the bucket output's format is its plan's (shared/formats/plan.py)


@dataclass(frozen=True)
class Config:
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    input: Path | None = opt(None, "A folder holding items (ingest's output) [default: the output of the stage "
                                   "before bucket in the stage graph: <workdir>/ingest].", flag="--in",
                             fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/bucket].", flag="--out",
                              fingerprint=False)
    max_area: int = opt(1024 * 1024, "Largest bucket area in pixels (1024*1024 for SDXL).", ge=64 * 64)
    step: int = opt(64, "Side step of generated buckets.", ge=64, multiple_of=64)
    min_side: int = opt(512, "Shortest bucket side of generated buckets.", ge=64, multiple_of=64)
    max_side: int = opt(2048, "Longest bucket side of generated buckets.", ge=64, multiple_of=64)
    max_ratio: float = opt(4.0, "Largest aspect ratio (long side / short side) of generated buckets.", ge=1)
    buckets: tuple[tuple[int, int], ...] = opt((), "Explicit bucket list [[w, h], ...] instead of "
                                               "generated ones (TOML only).", cli=False)
    crop: str = opt("center", "Where to crop the covered image.", choices=("center", "random"))
    seed: int = opt(0, "Seed of random crops (each item's crop is recorded in the plan).", **SEED_RANGE)
    max_upscale: float = opt(2.0, "Largest upscale factor to cover a bucket before an item counts as "
                                  "too small for it.", ge=1)
    on_too_small: str = opt("keep", "What to do with items needing more than max_upscale: keep them "
                                    "(and report) or reject them (too_small_for_bucket).",
                            choices=("keep", "reject"))
    min_bucket_items: int = opt(1, "Buckets with fewer items merge into their nearest neighbour "
                                   "(1 = never merge).", ge=1)

    def __post_init__(self) -> None:
        if self.min_side > self.max_side:  # each field's own range is checked by shared.core.config.build
            raise ConfigError(f"min_side {self.min_side} > max_side {self.max_side}")
        for w, h in self.buckets:
            if w <= 0 or h <= 0 or w % 64 or h % 64:
                raise ConfigError(f"buckets: [{w}, {h}] is not a pair of positive multiples of 64")
            if w * h > self.max_area:
                raise ConfigError(f"buckets: [{w}, {h}] has area {w * h} > max_area {self.max_area}")
        object.__setattr__(self, "input", self.input or graph.default_input(self.workdir, "bucket"))  # as recorded
        object.__setattr__(self, "output", self.output or self.workdir / "bucket")

    @property
    def in_dir(self) -> Path:
        return self.input

    @property
    def out_dir(self) -> Path:
        return self.output

    def bucket_list(self) -> list[tuple[int, int]]:
        if self.buckets:
            return sorted(set(self.buckets), key=lambda b: (b[0] / b[1], b[0]))
        found = bucketing.generate_buckets(self.max_area, self.step, self.min_side, self.max_side, self.max_ratio)
        if not found:
            raise ConfigError("no bucket fits max_area/min_side/max_side/max_ratio; loosen one of them")
        return found


def _ingested(cfg: Config) -> artifacts.Manifest:
    return itemfile.require(cfg.in_dir)


def _items(cfg: Config) -> Iterator[Item]:
    """The items, checked against their manifest's record of items.jsonl."""
    return itemfile.read_items(cfg.in_dir, _ingested(cfg))


def _inputs(cfg: Config) -> dict:
    manifest = _ingested(cfg)
    return {"ingest": {"path": str(cfg.in_dir), "fingerprint": manifest.fingerprint,
                       "what": "ingest output changed"}}


def _assign(cfg: Config, buckets: list) -> tuple[Counter, Counter]:
    """First pass: nearest bucket counts, and how many items are too small for theirs (by reason)."""
    counts: Counter = Counter()
    too_small: Counter = Counter()
    for item in _items(cfg):
        b = bucketing.nearest_bucket(item.width, item.height, buckets)
        if bucketing.cover_resize(item.width, item.height, b)[2] > cfg.max_upscale:
            too_small[b] += 1
            if cfg.on_too_small == "reject":
                continue
        counts[b] += 1
    return counts, too_small


def _build(cfg: Config, staging: Path, inputs: dict) -> BuildResult:
    buckets = cfg.bucket_list()
    counts, too_small = _assign(cfg, buckets)
    merged = bucketing.merge_small(counts, cfg.min_bucket_items)
    stats: dict = defaultdict(lambda: {"count": 0, "samples": 0, "aspect_error": 0.0, "cropped": 0.0})
    seen = 0
    with PlanWriter(staging) as plan, RejectedWriter(staging / itemfile.REJECTED) as rejected:
        for item in progress(_items(cfg), None, "bucket", "item"):
            seen += 1
            row = _plan_item(cfg, item, buckets, merged)
            if row is None:
                rejected.write(Rejection.from_json({
                    "id": item.id, "path": item.path, "source": item.source, "reason": "too_small_for_bucket",
                    "detail": f"{item.width}x{item.height} needs more than {cfg.max_upscale}x upscaling"}))
                continue
            plan.write(row)
            s = stats[row.bucket]
            s["count"] += 1
            s["samples"] += row.repeats
            s["aspect_error"] += bucketing.aspect_error(row.width, row.height, row.bucket)
            s["cropped"] += bucketing.cropped_share(row.resize, row.bucket)
            checkpoint("bucket.item")
    report = _report(buckets, stats)
    _write_outputs(cfg, staging, buckets, report)
    dropped = {"too_small_for_bucket": rejected.count} if rejected.count else {}
    kept_small = sum(too_small.values()) if cfg.on_too_small == "keep" else 0
    if kept_small:
        warn(f"{kept_small} items need more than {cfg.max_upscale}x upscaling; kept (on_too_small = keep)")
    return BuildResult({"in": seen, "out": plan.count, "dropped": dropped},
                       {"buckets_used": sum(1 for r in report if r["count"]), "upscaled_beyond_limit": kept_small})


def _plan_item(cfg: Config, item: Item, buckets: list, merged: dict) -> PlanRow | None:
    nearest = bucketing.nearest_bucket(item.width, item.height, buckets)
    if nearest not in merged:  # only rejected items are missing from the first pass's counts
        return None
    if cfg.on_too_small == "reject" and \
            bucketing.cover_resize(item.width, item.height, nearest)[2] > cfg.max_upscale:
        return None  # judged on the nearest bucket, as in the first pass, so both passes agree
    bucket = merged[nearest]
    rw, rh, scale = bucketing.cover_resize(item.width, item.height, bucket)
    rng = random.Random(f"{cfg.seed}:{item.id}") if cfg.crop == "random" else None
    left, top = bucketing.crop_offset((rw, rh), bucket, cfg.crop, rng)
    return PlanRow.planned(item, bucket, (rw, rh), (left, top), round(scale, 6))


def _report(buckets: list, stats: dict) -> list[dict]:
    rows = []
    for b in buckets:
        s = stats.get(b, {"count": 0, "samples": 0, "aspect_error": 0.0, "cropped": 0.0})
        n = s["count"]
        rows.append({"width": b[0], "height": b[1], "count": n, "samples": s["samples"],
                     "mean_aspect_error": round(s["aspect_error"] / n, 6) if n else 0.0,
                     "mean_cropped_share": round(s["cropped"] / n, 6) if n else 0.0})
    return rows


def _write_outputs(cfg: Config, staging: Path, buckets: list, report: list[dict]) -> None:
    rule = ({"kind": "list", "buckets": [list(b) for b in cfg.bucket_list()]} if cfg.buckets else
            {"kind": "generated", "max_area": cfg.max_area, "step": cfg.step, "min_side": cfg.min_side,
             "max_side": cfg.max_side, "max_ratio": cfg.max_ratio})
    rule.update(assign="nearest log aspect ratio", resize="cover", crop=cfg.crop, seed=cfg.seed,
                min_bucket_items=cfg.min_bucket_items)
    artifacts.write_atomic(staging / "buckets.json",
                           json.dumps({"rule": rule, "buckets": report}, indent=1) + "\n")
    used = [r for r in report if r["count"]]
    bar_chart([f"{r['width']}x{r['height']}" for r in used], [r["count"] for r in used],
              "items per bucket").save(staging / "buckets.png")
    say(table(["bucket", "items", "samples", "aspect err", "cropped"],
              [[f"{r['width']}x{r['height']}", r["count"], r["samples"], r["mean_aspect_error"],
                r["mean_cropped_share"]] for r in used]))


STAGE = Stage(name="bucket", version=VERSION, module=__name__,
              out_dir=lambda cfg: cfg.out_dir, inputs=_inputs, build=_build,
              protected=lambda cfg: [("input folder", cfg.in_dir)], reads=(ITEMS,), writes=(PLAN,))


def run(cfg: Config, force: bool = False) -> Manifest:
    """Plan buckets for the ingested items into `<out>/buckets.json` and `<out>/plan.jsonl`."""
    return execute(STAGE, cfg, force)
