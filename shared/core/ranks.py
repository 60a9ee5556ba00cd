"""Which process this is among several launched by `torchrun` / `accelerate launch` (RANK, WORLD_SIZE,
LOCAL_RANK) or by Slurm's `srun` (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID), and file-based coordination
between them.

Stages that split work across ranks coordinate through files in their staging folder (markers written
atomically), not through a process group: nothing hangs on a collective timeout during a day-long encode, and
ranks on different machines need only a shared file system.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from shared.core.errors import ConfigError, PipelineError


@dataclass(frozen=True)
class Rank:
    rank: int = 0
    world: int = 1
    local: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Round-robin ownership of work unit `index` (the same on every rank)."""
        return index % self.world == self.rank


#: (rank, world size, local rank, set only inside a launch) per launcher, in order of precedence: torchrun /
#: accelerate first (torchrun inside an sbatch job sees both), then Slurm's srun. An sbatch script itself also
#: has SLURM_NTASKS and SLURM_PROCID=0 but is one process: SLURM_STEP_NUM_TASKS, which only srun sets, tells
#: the tasks of an srun step from it.
LAUNCHERS = (("RANK", "WORLD_SIZE", "LOCAL_RANK", "WORLD_SIZE"),
             ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID", "SLURM_STEP_NUM_TASKS"))


def current(env: Mapping[str, str] | None = None) -> Rank:
    """This process's rank from the launcher's variables (`env`: os.environ); one process when none is set."""
    env = os.environ if env is None else env

    def read(name: str, default: int) -> int:
        value = env.get(name)
        if value in (None, ""):
            return default
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{name}={value!r} in the environment is not an integer") from None

    names = next((n for n in LAUNCHERS if env.get(n[3]) not in (None, "")), LAUNCHERS[0])
    world, rank = read(names[1], 1), read(names[0], 0)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"{names[0]}={rank} {names[1]}={world} in the environment are inconsistent")
    return Rank(rank, world, read(names[2], rank))


def device(choice: str, local: int = 0) -> str:
    """The torch device for `--device auto|cpu|cuda`: auto takes a GPU when CUDA is present; a GPU is the
    launcher's LOCAL_RANK one (modulo the visible count)."""
    import torch

    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return "cpu"
    if not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is visible; use --device cpu")
    return f"cuda:{local % torch.cuda.device_count()}"


def die_with_parent(*_: object) -> None:
    """In a worker process: ask Linux to SIGKILL it when its parent dies (even by kill -9), so decode workers
    never outlive the stage. A no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


class RankLost(PipelineError):
    """A process this one waits for is gone (or never started)."""


#: seconds a wait tolerates the awaited process not (yet) running before giving up; SDXL_RANK_GRACE overrides
GRACE = 300.0


def wait_for(condition: Callable[[], bool], what: str, alive: Callable[[], bool] | None = None,
             poll: float = 0.5, timeout: float | None = None) -> None:
    """Block until `condition()` holds (another rank's file appeared).

    `alive()` tells whether the processes being waited for still run: once seen alive, finding them gone stops
    the wait at once; never seeing them alive for SDXL_RANK_GRACE seconds (default 300) stops it too. Either
    way the error names what was awaited, so no rank hangs on a dead partner. `timeout`: a hard limit."""
    grace = float(os.environ.get("SDXL_RANK_GRACE", GRACE))
    start = time.monotonic()
    seen = False
    while not condition():
        waited = time.monotonic() - start
        if timeout is not None and waited > timeout:
            raise RankLost(f"gave up waiting for {what} after {timeout:.0f} s")
        if alive is not None:
            up = alive()
            seen = seen or up
            if not up and (seen or waited > grace) and not condition():
                why = "it stopped" if seen else f"it did not start within {grace:.0f} s"
                raise RankLost(f"stopped waiting for {what}: {why} (a rank died or was never launched); rerun "
                               f"the whole job to resume")
        time.sleep(poll)
