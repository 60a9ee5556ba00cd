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
    bucket_remainder: str = opt("train", "A bucket's last samples of an epoch that do not fill a batch: train them as a "
                                         "smaller batch, each weighing as in a full one (every item trained every "
                                         "epoch), or drop them for that epoch (said before training and in the "
                                         "manifest).", choices=("train", "drop"))
    accumulate: int = opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    shuffle_buffer: int = opt(256, "Samples in the shuffle buffer (1 = stream order).", ge=1)
    epochs: int = opt(1, "Epochs to train when max_steps is 0.", ge=1)
    max_steps: int = opt(0, "Optimizer steps to train; 0 = `epochs` epochs.", ge=0)
    seed: int = borrowed()
    prefetch: int = opt(4, "Batches read ahead by the loader thread.", fingerprint=False, ge=1)
    decode_pixels: bool = derived(True)   # decode the crops' stored images (the VAE target trains on them)

    @property
    def partial(self) -> bool:
        """Whether a bucket's remainder is trained as a smaller batch (else dropped for the epoch)."""
        return self.bucket_remainder == "train"


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
                                                      cfg.decode_pixels, index),
                D.load_empty(cfg.input, manifest))


def plan(data: Data, cfg: DataConfig, world: int) -> D.Schedule:
    """Optimizer steps per epoch, the same on every rank."""
    return D.Schedule.make(data.infos, world, cfg.seed, cfg.batch_size, cfg.accumulate, cfg.epochs, cfg.max_steps,
                           cfg.partial)


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
        batches = D.epoch_plan(data.infos, rank, world, cfg.seed, e, cfg.batch_size, cfg.shuffle_buffer,
                               cfg.partial)[:schedule.steps[e] * cfg.accumulate]
        first = in_epoch * cfg.accumulate if e == epoch else 0
        read = data.read.ahead(D.shard_order(batches[first:]))
        for i, samples in enumerate(D.stream_batches(batches[first:], read, Sample.detached), start=first):
            yield samples, base + i // cfg.accumulate, i % cfg.accumulate
        base += schedule.steps[e]


def planned_samples(data: Data, schedule: D.Schedule, cfg: DataConfig, world: int, epoch: int) -> int:
    """Samples (repeats counted) the ranks train in `epoch` of the schedule (every rank's plan, from the index)."""
    return sum(len(b) for rank in range(world) for b in
               D.epoch_plan(data.infos, rank, world, cfg.seed, epoch, cfg.batch_size, cfg.shuffle_buffer,
                            cfg.partial)[:schedule.steps[epoch] * cfg.accumulate])


def describe(data: Data, schedule: D.Schedule, cfg: DataConfig, world: int) -> tuple[str, int]:
    """The run's plan in one line (steps, epochs, batches), and how many samples of an epoch it leaves untrained
    (a bucket's remainder dropped, or batches a rank or accumulation cannot use)."""
    every = sum(sum(i.repeats) for i in data.infos)
    unused = every - planned_samples(data, schedule, cfg, world, 0)
    epochs = len(schedule.steps)
    shape = f"batch {cfg.batch_size}" + (f" x {cfg.accumulate} accumulated" if cfg.accumulate > 1 else "") + \
        (f" x {world} processes" if world > 1 else "")
    line = (f"{schedule.total} steps ({epochs} epoch{'s' if epochs > 1 else ''} of {schedule.steps[0]} steps, "
            f"{shape}) over {every} samples per epoch")
    if unused:
        why = ("the buckets' remainders are dropped (bucket_remainder drop)" if not cfg.partial else
               "the ranks' and accumulation's last batches do not fill a step")
        line += f"; {unused} of them are not trained in the first epoch: {why}"
    elif cfg.partial and any(n % cfg.batch_size for n in D.bucket_samples(data.infos, 0, 1, cfg.seed, 0).values()):
        line += "; each bucket's remainder is trained as a smaller batch"
    return line, unused


def dataset_extras(index: Index) -> dict:
    """What the manifest and a LoRA file's metadata say of the data: tag frequency, buckets, main resolution."""
    buckets = sorted(([*b.bucket, b.samples] for b in index.buckets), key=lambda b: -b[2])
    return {"tag_frequency": index.tag_frequency, "resolution": buckets[0][:2] if buckets else None,
            "buckets": buckets}
