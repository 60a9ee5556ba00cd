"""Work split into units over the ranks of a launched job, with per-unit completion markers.

The executor owns the protocol, as datatrove's executor owns completions rather than its steps; a step gives
only a `prepare`, a `work` and takes the records back for its finish:

1. rank 0 runs `prepare` once (the `ready` marker records that it did; a rerun skips it); the other ranks
   wait for `ready`;
2. each rank takes the units whose number is its rank modulo the world size, skips those already marked
   complete, and hands the rest to `work`, which yields each unit with its record as it finishes it; the
   executor then writes the unit's marker `done/<name>.json` (atomically), so a marker means "complete" and a
   rerun after a crash redoes only unmarked units;
3. rank 0 waits until every unit is marked and returns all records in unit order; the other ranks return None.

Every wait on another rank goes through `ranks.wait_for` with the job's liveness probe `alive(ranks)`: a rank
that is gone, or never came, ends the wait with an error naming what was awaited and from which ranks, so no
rank hangs on a dead partner. Ranks share nothing but the staging folder (a shared file system).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence, TypeVar

from shared.core import ranks
from shared.core.artifacts import write_atomic
from shared.core.log import say

READY = "ready"
DONE = "done"


class Unit(Protocol):
    @property
    def number(self) -> int: ...  # its position in the list: rank `number % world` owns it

    @property
    def name(self) -> str: ...    # unique relative path; its marker is done/<name>.json


U = TypeVar("U", bound=Unit)
#: whether every one of the given ranks of this job still runs (see outputs.partner_alive)
Alive = Callable[[list[int]], bool]


def marker(staging: Path, name: str) -> Path:
    return Path(staging) / DONE / f"{name}.json"


def completed(staging: Path) -> list[Path]:
    """The completion markers in `staging`, sorted."""
    return sorted(p for p in (Path(staging) / DONE).rglob("*.json") if p.is_file())


def reset(staging: Path) -> None:
    """Forget all progress: the `ready` marker and every completion marker (the step's files stay)."""
    shutil.rmtree(Path(staging) / DONE, ignore_errors=True)
    (Path(staging) / READY).unlink(missing_ok=True)


def run(staging: Path, units: Sequence[U], prepare: Callable[[], None],
        work: Callable[[list[U]], Iterable[tuple[U, dict]]], alive: Alive, rank: ranks.Rank | None = None,
        label: str = "work", noun: str = "units") -> list[dict] | None:
    """Run the protocol above for this rank; rank 0 returns every unit's record, the others None.
    `label` and `noun` make the progress lines (`encode: resuming: 3 of 8 shards of this rank already done`)."""
    rank = rank or ranks.current()
    staging = Path(staging)
    _prepared(staging, prepare, rank, alive)
    todo = _todo(staging, units, rank, label, noun)
    expected = {u.name for u in todo}
    for unit, record in work(todo):
        if unit.name not in expected:
            raise ValueError(f"work yielded {unit.name}, which was not given to it")
        path = marker(staging, unit.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, json.dumps(record) + "\n")
    unmarked = [u.name for u in todo if not marker(staging, u.name).exists()]
    if unmarked:
        raise RuntimeError(f"work returned without finishing {len(unmarked)} {noun} (first: {unmarked[0]})")
    if not rank.main:
        say(f"{label} rank {rank.rank}: {len(todo)} {noun} done")
        return None
    _await_others(staging, units, rank, alive, label, noun)
    return [json.loads(marker(staging, u.name).read_text(encoding="utf-8")) for u in units]


def _prepared(staging: Path, prepare: Callable[[], None], rank: ranks.Rank, alive: Alive) -> None:
    ready = staging / READY
    if rank.main:
        if not ready.exists():
            prepare()
            write_atomic(ready, "ready\n")
        return
    ranks.wait_for(ready.exists, f"rank 0 to prepare {staging} (its `{READY}` marker)", alive=lambda: alive([0]))


def _todo(staging: Path, units: Sequence[U], rank: ranks.Rank, label: str, noun: str) -> list[U]:
    mine = [u for u in units if rank.owns(u.number)]
    todo = [u for u in mine if not marker(staging, u.name).exists()]
    if rank.main and len(todo) < len(mine):
        say(f"{label}: resuming: {len(mine) - len(todo)} of {len(mine)} {noun} of this rank already done")
    return todo


def _await_others(staging: Path, units: Sequence[U], rank: ranks.Rank, alive: Alive, label: str,
                  noun: str) -> None:
    """Rank 0: wait until the other ranks have marked all their units. Only ranks that still owe a unit must
    be alive (one that finished may have exited)."""
    missing = [u for u in units if not marker(staging, u.name).exists()]
    if not missing:
        return

    def owing() -> list[int]:
        return sorted({u.number % rank.world for u in missing if not marker(staging, u.name).exists()})

    owners = owing()
    say(f"{label}: waiting for {len(missing)} {noun} of other ranks")
    ranks.wait_for(lambda: not owing(), f"{len(missing)} {noun} of rank(s) {', '.join(map(str, owners))}",
                   alive=lambda: alive(owing()))
