"""Streaming encode's shards into bucket-homogeneous batches, the same way on every rank and on every resume.

An epoch's batches are *planned* from index.json alone (no data read): the shards are shuffled with the
epoch's seed and dealt round-robin to the ranks (disjoint shards per rank); each rank's stream of (shard,
sample) references — every sample `repeats` times — passes a seeded shuffle buffer, and references are
gathered per bucket until a bucket has `batch_size` of them, which makes a batch. Buckets therefore interleave
in proportion to their size. Every rank can count every rank's full batches from the index, so all ranks
take the same number of steps (the smallest count; the rest of an epoch is dropped and counted), and uneven
data cannot hang DDP. A position is just (epoch, batch): resuming re-plans and reads only the shards that
still hold needed samples. The reader then streams each shard once, front to back, keeping a sample only
until its last planned use — memory stays near the shuffle buffer.
"""
from __future__ import annotations

import dataclasses
import queue
import random
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.core import artifacts
from shared.core.errors import ConfigError, DataError, InputError
from shared.formats import samples as fmt
from shared.formats.samples import EmptyCaption
from shared.formats.shard_index import Index, ShardEntry
from shared.formats.shard_index import read_index as read_index_file

Ref = tuple[int, int]  # (shard number, sample index within the shard)


@dataclass(frozen=True)
class ShardInfo:
    number: int
    group: str                  # "WxH"
    name: str | None            # tar path relative to the encode folder
    first: int                  # row of its first sample within the bucket (zarr)
    repeats: tuple[int, ...]    # per sample
    bytes: int | None = None    # of the tar, as encode wrote it
    sha256: str | None = None   # of the tar
    zarr_sha256: str | None = None  # of its rows in the zarr store (samples.rows_digest)
    keys: tuple[str, ...] = ()      # per sample, its item id

    @property
    def samples(self) -> int:
        return len(self.repeats)

    @classmethod
    def of(cls, number: int, group: str, entry: ShardEntry) -> "ShardInfo":
        return cls(number, group, entry.name, entry.first, entry.repeats, entry.bytes, entry.sha256,
                   entry.zarr_sha256, entry.keys)


def read_index(folder: Path | str, manifest: artifacts.Manifest) -> tuple[Index, list[ShardInfo]]:
    """index.json (checked against encode's manifest and its format version), and its shards in order."""
    index = read_index_file(folder, manifest)
    return index, [ShardInfo.of(n, b.group, s) for n, (b, s) in enumerate(index.shards())]


#: the most shard URLs --shards may expand to (a pattern's count is computed before anything is expanded)
MAX_URLS = 1_000_000


def expand_urls(patterns: tuple[str, ...]) -> list[str]:
    """Shard URLs from patterns in brace notation (webdataset's own expansion); a pattern that would expand to
    more than MAX_URLS is a one-line ConfigError before anything is expanded."""
    import braceexpand

    for p in patterns:
        count = expansion_size(p)
        if count > MAX_URLS:
            raise ConfigError(f"--shards {p[:80]!r} expands to {count:.3g} URLs, more than the {MAX_URLS:,} this "
                              f"reads; name the shards encode wrote (index.json lists them)")
    try:
        return [u for p in patterns for u in braceexpand.braceexpand(p)]
    except braceexpand.UnbalancedBracesError as e:
        raise ConfigError(f"--shards: {e}") from None


RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?\d+)?")


def expansion_size(pattern: str) -> int:
    """How many strings brace expansion makes of `pattern` ({a,b} alternatives, nested, and {0..9} ranges),
    counted without expanding (an unmatched brace counts as text)."""
    total, i = 1, 0
    while i < len(pattern):
        if pattern[i] == "{":
            end = _closing(pattern, i)
            if end is not None:
                total *= _group_size(pattern[i + 1:end])
                i = end
        i += 1
    return total


def _closing(text: str, start: int) -> int | None:
    depth = 0
    for j in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return j
    return None


def _group_size(inner: str) -> int:
    whole = RANGE.fullmatch(inner)
    if whole:
        return abs(int(whole[2]) - int(whole[1])) + 1
    parts, depth, last = [], 0, 0
    for j, ch in enumerate(inner):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == "," and depth == 0:
            parts.append(inner[last:j])
            last = j + 1
    parts.append(inner[last:])
    return sum(expansion_size(p) for p in parts) if len(parts) > 1 else 1


SHARD_NAME = re.compile(r"(\d+x\d+)/(\d+)\.tar")


def match_urls(infos: list[ShardInfo], urls: list[str]) -> dict[int, str]:
    """shard number -> URL, matched by the `<bucket WxH>/<NNNNNN>.tar` part of the URL (its last occurrence, so
    `pipe:aws s3 cp s3://b/enc/shards/1024x1024/000003.tar -` works)."""
    by_name = {i.name.split("/", 1)[1]: i.number for i in infos if i.name}
    out: dict[int, str] = {}
    for url in urls:
        found = SHARD_NAME.findall(url.replace("\\", "/"))
        tail = f"{found[-1][0]}/{found[-1][1]}.tar" if found else None
        if tail not in by_name:
            raise ConfigError(f"shard URL {url!r}: names no shard of index.json (expected a "
                              f"<bucket WxH>/<NNNNNN>.tar path in it, e.g. {next(iter(by_name), '?')})")
        out[by_name[tail]] = url
    return out


def select(infos: list[ShardInfo], urls: dict[int, str]) -> tuple[list[ShardInfo], dict[int, str]]:
    """Only the shards given by URL, renumbered 0..n-1 (the plan indexes shards by number)."""
    chosen = [i for i in infos if i.number in urls]
    renumbered = [dataclasses.replace(i, number=k) for k, i in enumerate(chosen)]
    return renumbered, {k: urls[i.number] for k, i in enumerate(chosen)}


# ---------------------------------------------------------------- planning


def _shard_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}:shards:{epoch}").shuffle(order)
    return order


def rank_shards(infos: list[ShardInfo], rank: int, world: int, seed: int, epoch: int) -> list[ShardInfo]:
    """The shards rank `rank` reads in epoch `epoch`, in reading order (disjoint across ranks)."""
    return [infos[i] for i in _shard_order(len(infos), seed, epoch)[rank::world]]


def bucket_samples(infos: list[ShardInfo], rank: int, world: int, seed: int, epoch: int) -> Counter:
    """Samples (repeats counted) rank `rank` reads of each bucket in `epoch` (from the index alone)."""
    per_bucket: Counter = Counter()
    for s in rank_shards(infos, rank, world, seed, epoch):
        per_bucket[s.group] += sum(s.repeats)
    return per_bucket


def count_batches(infos: list[ShardInfo], rank: int, world: int, seed: int, epoch: int, batch: int,
                  partial: bool = False) -> int:
    """Batches rank `rank` makes in `epoch`: full ones, and with `partial` each bucket's remainder as one more."""
    per_bucket = bucket_samples(infos, rank, world, seed, epoch)
    return sum(-(-n // batch) if partial else n // batch for n in per_bucket.values())


def epoch_plan(infos: list[ShardInfo], rank: int, world: int, seed: int, epoch: int, batch: int,
               buffer: int, partial: bool = False) -> list[tuple[Ref, ...]]:
    """This rank's batches of epoch `epoch`, in order; each batch holds references of one bucket. A bucket's last
    samples that do not fill a batch are dropped, or with `partial` trained as a smaller batch at the epoch's end
    (buckets in the order their first sample came)."""
    rng = random.Random(f"{seed}:buffer:{epoch}:{rank}")
    held: list[Ref] = []
    stream: list[Ref] = []
    for s in rank_shards(infos, rank, world, seed, epoch):
        for j, r in enumerate(s.repeats):
            for _ in range(r):
                held.append((s.number, j))
                if len(held) >= buffer:
                    k = rng.randrange(len(held))
                    held[k], held[-1] = held[-1], held[k]
                    stream.append(held.pop())
    rng.shuffle(held)
    stream.extend(held)
    pending: dict[str, list[Ref]] = {}
    batches = []
    for ref in stream:
        group = pending.setdefault(infos[ref[0]].group, [])
        group.append(ref)
        if len(group) == batch:
            batches.append(tuple(group))
            group.clear()
    if partial:
        batches.extend(tuple(group) for group in pending.values() if group)
    return batches


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps each epoch has (the same on every rank) and where a global step falls."""
    steps: tuple[int, ...]      # per epoch
    accumulate: int

    @classmethod
    def make(cls, infos: list[ShardInfo], world: int, seed: int, batch: int, accumulate: int, epochs: int,
             max_steps: int, partial: bool = False) -> "Schedule":
        out: list[int] = []
        while (max_steps and sum(out) < max_steps) or (not max_steps and len(out) < epochs):
            e = len(out)
            n = min(count_batches(infos, r, world, seed, e, batch, partial) for r in range(world)) // accumulate
            if n == 0:
                raise InputError(f"an epoch has no full step: some rank gets fewer than batch_size x accumulate "
                                 f"= {batch * accumulate} samples of any bucket from its shards ({len(infos)} "
                                 f"shards over {world} ranks); lower batch_size, encode with smaller shards, or "
                                 f"train the remainders (--bucket-remainder train)")
            out.append(n)
            if len(out) > 100000:
                raise ConfigError("max_steps needs more than 100000 epochs")
        if max_steps:
            out[-1] -= sum(out) - max_steps
        return cls(tuple(out), accumulate)

    @property
    def total(self) -> int:
        return sum(self.steps)

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within the epoch) of global optimizer step `step`."""
        for e, n in enumerate(self.steps):
            if step < n:
                return e, step
            step -= n
        return len(self.steps), 0


# ---------------------------------------------------------------- reading


def shard_order(plan: list[tuple[Ref, ...]]) -> list[int]:
    """The shards in the order `stream_batches` opens them (first use in the plan)."""
    return list(dict.fromkeys(ref[0] for batch in plan for ref in batch))


def stream_batches(plan: list[tuple[Ref, ...]], read: Callable[[int], Iterator[tuple[int, Any]]],
                   detach: Callable[[Any], Any] | None = None) -> Iterator[list[Any]]:
    """The planned batches' samples. A shard is read at its first use, up to its last needed sample, and let go;
    each sample it holds is kept until its last planned use.

    `detach(sample)`: the sample with memory of its own. A shard's samples view its buffer, and a shuffle
    buffer lets a few of them wait long after the rest are used (each waits a geometric number of draws), which
    would keep several whole shards in memory for a few samples each. Once at most a quarter of a shard's
    samples still wait, those are detached (a copy of under a quarter of its bytes) and its buffer is free."""
    need = Counter(ref for batch in plan for ref in batch)
    last: dict[int, int] = {}
    for number, j in need:
        last[number] = max(last.get(number, -1), j)
    cache: dict[Ref, Any] = {}
    opened: set[int] = set()
    waiting: Counter = Counter()  # per shard read and not yet detached: its samples in the cache
    for batch in plan:
        out = []
        for ref in batch:
            if ref not in cache:
                if ref[0] in opened:
                    raise DataError(f"shard {ref[0]} does not hold its planned sample {ref[1]}; re-encode")
                opened.add(ref[0])
                _read_shard(ref[0], need, last, cache, read, waiting)
            out.append(cache[ref])
            need[ref] -= 1
            if need[ref] == 0:
                del cache[ref]
                if ref[0] in waiting:
                    waiting[ref[0]] -= 1
        if detach is not None:
            for number in [n for n, k in waiting.items() if k * 4 <= last[n] + 1]:
                del waiting[number]
                for ref in [r for r in cache if r[0] == number]:
                    cache[ref] = detach(cache[ref])
        yield out


def _read_shard(number: int, need: Counter, last: dict[int, int], cache: dict, read: Callable,
                waiting: Counter) -> None:
    """Shard `number`'s needed samples into `cache` (its reader dropped after the last of them)."""
    waiting[number] = 0
    for j, sample in read(number):
        if need[(number, j)] > 0:
            cache[(number, j)] = sample
            waiting[number] += 1
        if j == last[number]:
            return
    raise DataError(f"shard {number} ended before its sample {last[number]}; re-encode")


def prefetch(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """Run `items` in a thread `depth` ahead (reading and decoding overlap the training step)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while True:
        item = q.get()
        if item is done:
            return
        if isinstance(item, BaseException):
            raise item
        yield item


def load_empty(folder: Path | str, manifest: artifacts.Manifest) -> EmptyCaption:
    """The empty caption's cached embedding (caption dropout, and padding of shorter captions), checked."""
    return fmt.read_empty(folder, manifest)


@dataclass
class Progress:
    """The loop's position and counters, a checkpoint part. The step is the data position too (the data plan is
    a function of the config); epoch and step in epoch are stored for reading."""
    schedule: Schedule
    step: int = 0                  # optimizer steps done
    skipped: int = 0               # steps skipped for a non-finite loss or gradient
    bad_in_row: int = 0            # of them, the latest in a row
    eval: list = field(default_factory=list)   # [[step, evaluation loss on training samples], ...]
    val: list = field(default_factory=list)    # [[step, validation loss on the held-out set], ...]

    def state_dict(self) -> dict:
        epoch, in_epoch = self.schedule.locate(self.step)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch, "skipped": self.skipped,
                "bad_in_row": self.bad_in_row, "eval": [list(e) for e in self.eval],
                "val": [list(e) for e in self.val]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.bad_in_row = state["step"], state["skipped"], state["bad_in_row"]
        self.eval = [list(e) for e in state["eval"]]
        self.val = [list(e) for e in state.get("val", [])]
