"""What the loop reads: encode's output opened (a folder or an fsspec URL; tar shards, shard URLs or zarr), the
step plan, and the stream of micro-batches from any step on (the plan is a function of the config, so a step is
a data position), its shards loaded ahead in background threads (reader.py)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from shared.core.errors import InputError
from shared.core.log import say
from shared.formats import samples
from shared.formats.samples import EmptyCaption, Sample
from shared.formats.shard_index import Index
from shared.core.config import opt
from shared.core.groups import borrowed, derived
from stages.train import data as D
from stages.train.reader import ShardReader


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    """Where the samples come from and how they are dealt into steps: options of `sdxl train` (config.py
    composes them)."""
    input: str | Path | None = opt(None, "Encode output folder or fsspec URL (its manifest, index.json and empty/ are "
                                  "read from there) [default: <workdir>/encode].", flag="--in", fingerprint=False,
                            nonempty=True)
    shards: tuple[str, ...] = opt((), "Read the tar shards from these URLs instead of <in>/shards (repeatable; "
                                      "brace notation {000000..000031} and webdataset pipe: / http(s) URLs). "
                                      "Each is matched to index.json by its last two path parts "
                                      "(<bucket>/<NNNNNN>.tar).", fingerprint=False)
    source: str = opt("auto", "Read tar shards or the zarr store (auto: tar when encode wrote them).",
                      choices=("auto", "wds", "zarr"), fingerprint=False)
    batch_size: int = opt(4, "Samples per micro-batch per process (one bucket per batch).", ge=1)
    accumulate: int = opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    shuffle_buffer: int = opt(256, "Samples in the shuffle buffer (1 = stream order).", ge=1)
    epochs: int = opt(1, "Epochs to train when max_steps is 0.", ge=1)
    max_steps: int = opt(0, "Optimizer steps to train; 0 = `epochs` epochs.", ge=0)
    seed: int = borrowed()
    prefetch: int = opt(4, "Batches read ahead by the loader thread.", fingerprint=False, ge=1)
    decode_pixels: bool = derived(True)   # decode the crops' stored images (the VAE target trains on them)


@dataclass
class Data:
    folder: Path | str
    index: Index
    infos: list
    read: ShardReader
    empty: EmptyCaption


def open_data(cfg: DataConfig) -> Data:
    manifest = samples.require_encode(cfg.input)
    index, infos = D.read_index(cfg.input, manifest)
    source = cfg.source if cfg.source != "auto" else ("wds" if index.format in ("wds", "both") else "zarr")
    if source == "wds" and index.format == "zarr" or source == "zarr" and index.format == "wds":
        raise InputError(f"{cfg.input}: encode wrote format {index.format}, so --source {source} cannot be read")
    urls: dict[int, str] = {}
    if cfg.shards:
        if source == "zarr":
            raise InputError("--shards lists tar shards; it cannot be used with --source zarr")
        urls = D.match_urls(infos, D.expand_urls(cfg.shards))
        if len(urls) < len(infos):
            say(f"train: reading {len(urls)} of the {len(infos)} shards of {cfg.input} (those given by --shards)")
        infos, urls = D.select(infos, urls)
    return Data(cfg.input, index, infos, ShardReader(cfg.input, infos, source, urls, index.layout,
                                                      cfg.decode_pixels),
                D.load_empty(cfg.input, manifest))


def plan(data: Data, cfg: DataConfig, world: int) -> D.Schedule:
    """Optimizer steps per epoch, the same on every rank."""
    return D.Schedule.make(data.infos, world, cfg.seed, cfg.batch_size, cfg.accumulate, cfg.epochs, cfg.max_steps)


def check_shapes(unet: Any, index: Index, where: Path | str) -> None:
    c = unet.config
    want = {"latent channels": (c.in_channels, index.layout.latent_channels),
            "text width": (c.cross_attention_dim, index.layout.te_dim),
            "pooled + time ids width": (c.projection_class_embeddings_input_dim,
                                        index.layout.pooled_dim + 6 * c.addition_time_embed_dim)}
    bad = [f"{k}: UNet {a}, shards {b}" for k, (a, b) in want.items() if a != b]
    if bad:
        raise InputError(f"{where}: the shards do not fit this UNet ({'; '.join(bad)}); encode with this model")


def first_samples(data: Data, count: int, skip: set[str] = frozenset()) -> list[dict]:
    """The first `count` samples in index order whose ids are not in `skip` (the fixed evaluation set of
    training samples; `skip` is the held-out set), each with memory of its own (see holdout.with_samples)."""
    out: list[dict] = []
    if not count:
        return out
    for info in data.infos:
        for _, sample in data.read(info.number):
            if len(out) == count:
                return out
            if sample.key not in skip:
                out.append(sample.detached())
    return out


def micro_batches(data: Data, schedule: D.Schedule, cfg: DataConfig, rank: int, world: int, step: int
                  ) -> Iterator[tuple[list[dict], int, int]]:
    """(samples, step, micro-batch index) of this rank from optimizer step `step` to the end of the schedule."""
    epoch, in_epoch = schedule.locate(step)
    base = sum(schedule.steps[:epoch])
    for e in range(epoch, len(schedule.steps)):
        batches = D.epoch_plan(data.infos, rank, world, cfg.seed, e, cfg.batch_size,
                               cfg.shuffle_buffer)[:schedule.steps[e] * cfg.accumulate]
        first = in_epoch * cfg.accumulate if e == epoch else 0
        read = data.read.ahead(D.shard_order(batches[first:]))
        for i, samples in enumerate(D.stream_batches(batches[first:], read, Sample.detached), start=first):
            yield samples, base + i // cfg.accumulate, i % cfg.accumulate
        base += schedule.steps[e]


def dataset_extras(index: Index) -> dict:
    """What the manifest and a LoRA file's metadata say of the data: tag frequency, buckets, main resolution."""
    buckets = sorted(([*b.bucket, b.samples] for b in index.buckets), key=lambda b: -b[2])
    return {"tag_frequency": index.tag_frequency, "resolution": buckets[0][:2] if buckets else None,
            "buckets": buckets}
