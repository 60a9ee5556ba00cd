"""The sharded executor (shared/core/sharded.py): ranks simulated as threads with a fake step (and as two
processes holding real output locks), completion markers, resume, and waits that end when a rank is gone."""
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.core import sharded
from shared.core.ranks import Rank, RankLost

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Unit:
    number: int
    name: str


UNITS = [Unit(i, f"g{i % 2}/{i:03d}") for i in range(7)]


class FakeStep:
    """prepare writes layout.txt; work writes one file per unit and yields its record."""

    def __init__(self, staging: Path, rank: int, fail_after: int | None = None, delay: float = 0.0,
                 hold: threading.Event | None = None):
        self.staging, self.rank, self.fail_after, self.delay, self.hold = staging, rank, fail_after, delay, hold
        self.prepared, self.given = 0, []

    def prepare(self) -> None:
        self.prepared += 1
        (self.staging / "layout.txt").write_text("layout\n")

    def work(self, todo):
        self.given = [u.number for u in todo]
        for k, unit in enumerate(todo):
            if self.fail_after is not None and k == self.fail_after:
                if self.hold is not None:
                    self.hold.wait(30)
                raise RuntimeError("killed")
            time.sleep(self.delay)
            (self.staging / f"unit-{unit.number}").write_text(str(self.rank))
            yield unit, {"number": unit.number, "by": self.rank}


class Liveness:
    """Which simulated ranks run: the probe the executor gets."""

    def __init__(self, world: int):
        self.up = {r: True for r in range(world)}
        self.asked = {r: threading.Event() for r in range(world)}  # someone waits on rank r

    def __call__(self, ranks: list[int]) -> bool:
        for r in ranks:
            self.asked[r].set()
        return all(self.up[r] for r in ranks)


def run_rank(staging, step, rank, world, alive, out, units=UNITS):
    try:
        out[rank] = sharded.run(staging, units, step.prepare, step.work, alive, Rank(rank, world), label="test",
                                noun="units")
    except BaseException as e:  # noqa: BLE001 - handed to the test
        out[rank] = e
    finally:
        alive.up[rank] = False  # a rank that returns exits (its lock is released)


def run_ranks(staging: Path, steps: list[FakeStep], alive: Liveness, units=UNITS) -> dict:
    out: dict = {}
    threads = [threading.Thread(target=run_rank, args=(staging, s, r, len(steps), alive, out, units))
               for r, s in enumerate(steps)]
    for t in reversed(threads):  # the other ranks start first: they wait for rank 0's `ready`
        t.start()
    for t in threads:
        t.join(60)
    return out


def test_two_ranks_split_the_units_mark_each_one_and_rank_0_gets_every_record(tmp_path):
    steps = [FakeStep(tmp_path, 0), FakeStep(tmp_path, 1)]
    out = run_ranks(tmp_path, steps, Liveness(2))
    assert out[1] is None and [r["number"] for r in out[0]] == list(range(7))
    assert all(r["by"] == r["number"] % 2 for r in out[0])
    assert steps[0].given == [0, 2, 4, 6] and steps[1].given == [1, 3, 5]
    assert (steps[0].prepared, steps[1].prepared) == (1, 0) and (tmp_path / sharded.READY).exists()
    assert [p.relative_to(tmp_path / sharded.DONE).as_posix() for p in sharded.completed(tmp_path)] == \
        sorted(f"{u.name}.json" for u in UNITS)
    assert json.loads(sharded.marker(tmp_path, UNITS[3].name).read_text()) == {"number": 3, "by": 1}


def test_a_rerun_skips_marked_units_and_does_not_prepare_again(tmp_path):
    crashed = run_ranks(tmp_path, [FakeStep(tmp_path, 0, fail_after=2), FakeStep(tmp_path, 1, fail_after=1)],
                        Liveness(2))
    assert isinstance(crashed[0], RuntimeError) and isinstance(crashed[1], RuntimeError)
    assert len(sharded.completed(tmp_path)) == 3  # units 0, 2 (rank 0) and 1 (rank 1)
    steps = [FakeStep(tmp_path, 0), FakeStep(tmp_path, 1)]
    out = run_ranks(tmp_path, steps, Liveness(2))
    assert steps[0].given == [4, 6] and steps[1].given == [3, 5] and steps[0].prepared == 0
    assert [r["number"] for r in out[0]] == list(range(7))
    sharded.reset(tmp_path)
    assert not sharded.completed(tmp_path) and not (tmp_path / sharded.READY).exists()


def test_rank_0_stops_naming_a_rank_that_never_came(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_RANK_GRACE", "1")
    alive = Liveness(2)
    alive.up[1] = False
    start = time.monotonic()
    with pytest.raises(RankLost, match=r"stopped waiting for 3 units of rank\(s\) 1: it did not start within 1 s"):
        sharded.run(tmp_path, UNITS, FakeStep(tmp_path, 0).prepare, FakeStep(tmp_path, 0).work, alive, Rank(0, 2))
    assert time.monotonic() - start < 10


def test_rank_0_stops_when_a_working_rank_dies(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_RANK_GRACE", "60")
    alive = Liveness(2)
    dying = FakeStep(tmp_path, 1, fail_after=1, hold=alive.asked[1])  # dies while rank 0 waits on it
    out = run_ranks(tmp_path, [FakeStep(tmp_path, 0), dying], alive)
    assert isinstance(out[1], RuntimeError)
    assert isinstance(out[0], RankLost) and "units of rank(s) 1: it stopped" in str(out[0])


def test_other_ranks_stop_when_rank_0_is_gone_before_it_prepared(tmp_path, monkeypatch):
    monkeypatch.setenv("SDXL_RANK_GRACE", "1")
    alive = Liveness(2)
    alive.up[0] = False
    with pytest.raises(RankLost, match=r"rank 0 to prepare .*`ready` marker.*did not start within 1 s"):
        sharded.run(tmp_path, UNITS, FakeStep(tmp_path, 1).prepare, FakeStep(tmp_path, 1).work, alive, Rank(1, 2))


def test_a_rank_that_finished_and_exited_is_not_waited_on(tmp_path, monkeypatch):
    """Three ranks: rank 1 is done and gone while rank 2 still works; rank 0 waits for rank 2 only."""
    monkeypatch.setenv("SDXL_RANK_GRACE", "60")
    steps = [FakeStep(tmp_path, 0), FakeStep(tmp_path, 1), FakeStep(tmp_path, 2, delay=0.7)]
    out = run_ranks(tmp_path, steps, Liveness(3))
    assert [r["by"] for r in out[0]] == [n % 3 for n in range(7)]


def test_a_step_that_skips_or_invents_units_is_a_bug(tmp_path):
    def skips(todo):
        yield todo[0], {}

    def invents(todo):
        yield Unit(99, "x/099"), {}

    with pytest.raises(RuntimeError, match="without finishing 6 units"):
        sharded.run(tmp_path, UNITS, lambda: None, skips, Liveness(1), Rank(0, 1))
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="x/099"):
        sharded.run(tmp_path / "b", UNITS, lambda: None, invents, Liveness(1), Rank(0, 1))


RANK_SCRIPT = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    from shared.core import outputs, ranks, sharded

    out, die_after = Path(sys.argv[1]), int(sys.argv[2])
    rank = ranks.current()
    job = outputs.job_id(rank.world)
    outputs.claim(out, "test", rank.rank, job)
    staging = out.with_name(out.name + ".staging")
    staging.mkdir(exist_ok=True)
    units = [type("U", (), {"number": i, "name": f"u/{i:03d}"})() for i in range(6)]

    def work(todo):
        for k, unit in enumerate(todo):
            if k == die_after:
                time.sleep(2)  # rank 0 is waiting on this rank by now
                os._exit(9)  # as kill -9: no cleanup, the OS frees the lock
            yield unit, {"n": unit.number}

    alive = lambda owners: all(outputs.partner_alive(out, r, job) for r in owners)
    records = sharded.run(staging, units, lambda: None, work, alive, label="test")
    print("records", None if records is None else len(records), flush=True)
""")


def test_two_processes_with_real_locks_rank_0_stops_when_rank_1_is_killed(tmp_path):
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29977",
           "SDXL_RANK_GRACE": "60", "PYTHONPATH": str(ROOT)}
    out = tmp_path / "out"
    rank1 = subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, str(out), "1"], cwd=ROOT, text=True,
                             env={**env, "RANK": "1", "LOCAL_RANK": "1"}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    rank0 = subprocess.run([sys.executable, "-c", RANK_SCRIPT, str(out), "99"], cwd=ROOT, text=True, timeout=120,
                           env={**env, "RANK": "0", "LOCAL_RANK": "0"}, capture_output=True)
    assert rank1.wait(60) == 9
    assert rank0.returncode != 0 and "RankLost" in rank0.stderr, rank0.stderr
    assert "units of rank(s) 1: it stopped" in rank0.stderr
    done = sorted(p.name for p in sharded.completed(out.with_name("out.staging")))
    assert done == ["000.json", "001.json", "002.json", "004.json"]  # rank 0's three, rank 1's first
