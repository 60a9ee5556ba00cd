"""The train data plan from index metadata alone: disjoint shards per rank, bucket-homogeneous batches,
repeats, equal step counts, resumable positions, and a reader that reads each shard once."""
from collections import Counter

import pytest

from shared.core.errors import ConfigError, InputError
from stages.train import data as D


def infos(spec):
    """spec: [(group, [repeats per sample]), ...] -> ShardInfo list."""
    return [D.ShardInfo(i, g, f"shards/{g}/{i:06d}.tar", 0, tuple(r)) for i, (g, r) in enumerate(spec)]


SPEC = [("64x64", [1] * 10), ("64x64", [1] * 10), ("128x64", [1] * 7), ("128x64", [2, 1, 1]),
        ("64x128", [1] * 5), ("64x64", [3] * 4)]


def test_rank_shards_are_disjoint_and_cover_every_shard():
    shards = infos(SPEC)
    for epoch in range(3):
        per_rank = [[s.number for s in D.rank_shards(shards, r, 3, 7, epoch)] for r in range(3)]
        flat = [n for p in per_rank for n in p]
        assert sorted(flat) == list(range(len(SPEC)))  # disjoint, complete
    orders = {tuple(s.number for s in D.rank_shards(shards, 0, 1, 7, e)) for e in range(5)}
    assert len(orders) > 1  # reshuffled per epoch


def test_batches_are_one_bucket_and_honour_repeats():
    shards = infos(SPEC)
    plan = D.epoch_plan(shards, 0, 1, seed=3, epoch=0, batch=3, buffer=8)
    for batch in plan:
        assert len(batch) == 3 and len({shards[n].group for n, _ in batch}) == 1
    used = Counter(ref for b in plan for ref in b)
    for (n, j), k in used.items():
        assert k <= shards[n].repeats[j]
    # every occurrence is used except fewer than `batch` per bucket (the epoch's remainder)
    for group in {s.group for s in shards}:
        total = sum(sum(s.repeats) for s in shards if s.group == group)
        got = sum(k for (n, _), k in used.items() if shards[n].group == group)
        assert 0 <= total - got < 3
    assert len(plan) == D.count_batches(shards, 0, 1, 3, 0, 3)
    assert used[(3, 0)] == 2 and used[(5, 1)] == 3  # repeats 2 and 3


def test_a_buckets_remainder_is_a_smaller_batch_so_every_item_trains_every_epoch():
    """Issue 24: buckets of 10 and 6 with batch 8 used to train 8 of the 16 items an epoch (the 6 never). With
    partial batches every occurrence is used exactly as often as its repeats say, each batch one bucket, the smaller
    batches last; the step count follows; the plan stays a pure function of (seed, epoch, rank)."""
    shards = infos([("64x64", [1] * 10), ("128x64", [1] * 6)])
    for epoch in range(3):
        dropped = D.epoch_plan(shards, 0, 1, seed=5, epoch=epoch, batch=8, buffer=4)
        assert [len(b) for b in dropped] == [8] and D.count_batches(shards, 0, 1, 5, epoch, 8) == 1
        plan = D.epoch_plan(shards, 0, 1, seed=5, epoch=epoch, batch=8, buffer=4, partial=True)
        assert sorted(len(b) for b in plan) == [2, 6, 8] and len(plan[0]) == 8   # the remainders at the end
        assert all(len({shards[n].group for n, _ in b}) == 1 for b in plan)
        assert sorted(ref for b in plan for ref in b) == sorted((n, j) for n, s in enumerate(shards)
                                                                for j in range(s.samples))
        assert plan == D.epoch_plan(shards, 0, 1, seed=5, epoch=epoch, batch=8, buffer=4, partial=True)
        assert D.count_batches(shards, 0, 1, 5, epoch, 8, partial=True) == 3
    assert D.Schedule.make(shards, 1, 5, 8, 1, epochs=3, max_steps=0, partial=True).steps == (3, 3, 3)
    assert D.Schedule.make(shards, 1, 5, 8, 1, epochs=3, max_steps=0).steps == (1, 1, 1)
    repeated = infos([("64x64", [3, 1, 2])])
    plan = D.epoch_plan(repeated, 0, 1, seed=0, epoch=0, batch=4, buffer=2, partial=True)
    assert Counter(ref for b in plan for ref in b) == {(0, 0): 3, (0, 1): 1, (0, 2): 2}


def test_plan_is_deterministic_and_buffer_shuffles():
    shards = infos(SPEC)
    a = D.epoch_plan(shards, 0, 1, 1, 0, 2, 16)
    assert a == D.epoch_plan(shards, 0, 1, 1, 0, 2, 16)
    assert a != D.epoch_plan(shards, 0, 1, 2, 0, 2, 16)
    ordered = D.epoch_plan(shards, 0, 1, 1, 0, 2, 1)  # buffer 1: stream order within each shard
    first = [ref for b in ordered for ref in b if ref[0] == ordered[0][0][0]]
    assert [j for _, j in first] == sorted(j for _, j in first)


def test_every_rank_takes_the_same_number_of_steps():
    shards = infos(SPEC)
    sched = D.Schedule.make(shards, world=2, seed=0, batch=2, accumulate=1, epochs=3, max_steps=0)
    for e, steps in enumerate(sched.steps):
        counts = [D.count_batches(shards, r, 2, 0, e, 2) for r in range(2)]
        assert steps == min(counts) and min(counts) < max(counts) or steps == counts[0] == counts[1]
    assert sched.locate(sched.steps[0]) == (1, 0)
    assert sched.locate(sched.steps[0] - 1) == (0, sched.steps[0] - 1)
    capped = D.Schedule.make(shards, 2, 0, 2, 1, epochs=1, max_steps=sched.steps[0] + 1)
    assert capped.total == sched.steps[0] + 1 and len(capped.steps) == 2


def test_no_full_step_is_a_clear_error():
    with pytest.raises(InputError, match="no full step"):
        D.Schedule.make(infos([("64x64", [1, 1])]), world=1, seed=0, batch=4, accumulate=1, epochs=1, max_steps=0)


def test_stream_reads_each_shard_once_and_keeps_only_needed_samples():
    shards = infos(SPEC)
    plan = D.epoch_plan(shards, 0, 1, 5, 0, 3, 6)
    opened = Counter()
    peak = [0]

    def read(n):
        opened[n] += 1
        for j in range(shards[n].samples):
            yield j, {"ref": (n, j)}

    out = []
    stream = D.stream_batches(plan, read)
    for batch in stream:
        out.append(tuple(s["ref"] for s in batch))
    assert out == plan
    assert all(v == 1 for v in opened.values())
    # resuming at batch k reads from the plan's tail and yields exactly that tail
    k = len(plan) // 2
    assert [tuple(s["ref"] for s in b) for b in D.stream_batches(plan[k:], read)] == plan[k:]


def test_short_shard_is_a_data_error():
    shards = infos([("64x64", [1] * 4)])
    plan = [((0, 0), (0, 3))]

    def read(n):
        yield 0, {}
        yield 1, {}

    with pytest.raises(Exception, match="ended before"):
        list(D.stream_batches(plan, read))


def test_urls_match_by_bucket_and_number():
    shards = infos(SPEC)
    urls = D.expand_urls(("pipe:cat /data/enc/shards/64x64/{000000..000001}.tar",
                          "https://host/x/shards/128x64/000002.tar"))
    assert len(urls) == 3
    matched = D.match_urls(shards, urls)
    assert matched == {0: urls[0], 1: urls[1], 2: urls[2]}
    chosen, renamed = D.select(shards, matched)
    assert [c.number for c in chosen] == [0, 1, 2] and renamed[2] == urls[2]
    with pytest.raises(ConfigError, match="names no shard"):
        D.match_urls(shards, ["/data/other.tar"])


def test_learning_rate_schedules():
    """The schedule a run steps (optim.LRSchedule, diffusers' schedules): linear warmup from 0 over warmup_steps,
    then constant, cosine to 0 (half the peak half way through the span after warmup) or linear to 0."""
    import torch

    from stages import train
    from stages.train import optim as O

    def rates(kind: str) -> list[float]:
        cfg = train.Config(model="builtin:tiny", lr_schedule=kind, warmup_steps=10, learning_rate=2.0).optim
        schedule = O.LRSchedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0), cfg, 100)
        out = []
        for _ in range(101):
            out.append(schedule.lr)
            schedule.step()
        return out

    constant, cosine, linear = rates("constant"), rates("cosine"), rates("linear")
    assert constant[0] == 0.0 and constant[5] == pytest.approx(1.0) and constant[10:] == [2.0] * 91
    assert cosine[55] == pytest.approx(1.0) and cosine[100] == pytest.approx(0.0, abs=1e-12)
    assert linear[55] == pytest.approx(1.0) and linear[5] == pytest.approx(1.0)

def test_shard_patterns_are_counted_before_they_are_expanded():
    """Issue 24: `{000000..999999999}` and 30 nested `{a,b}` are refused in one line at once (counted, never
    expanded); an unbalanced brace is a one-line error; ordinary patterns expand as webdataset's."""
    import time

    assert D.expand_urls(("a/{000000..000002}.tar", "b/{x,{y,z}}.tar")) == [
        "a/000000.tar", "a/000001.tar", "a/000002.tar", "b/x.tar", "b/y.tar", "b/z.tar"]
    assert D.expansion_size("a/{1,2,{3,4}}/{0..9}.tar") == 40 and D.expansion_size("plain.tar") == 1
    started = time.monotonic()
    for pattern in ("s/{000000..999999999}.tar", "s/" + "{a,b}" * 30 + ".tar"):
        with pytest.raises(ConfigError, match="expands to 1.07e\\+09|expands to 1e\\+09"):
            D.expand_urls((pattern,))
    assert time.monotonic() - started < 1
    with pytest.raises(ConfigError, match="--shards: Unbalanced braces"):
        D.expand_urls(("a{b",))
