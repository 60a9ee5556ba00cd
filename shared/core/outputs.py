"""Who may write an output folder: the safety checks made before a stage writes anything, and the claim (an
OS lock) that keeps a second run off an output while the first is alive.

Safety: a stage replaces a folder only when it is a finished or unfinished output of the same stage (its
manifest, or its staging folder's job.json, says so) or an empty folder. `--out` that is a regular file, lies
under one, is, contains or lies inside an input or a source, or is any other folder is refused in one line.

Claim: `<parent>/.<name>.lock` (rank 0) or `.<name>.rank<R>.lock` (rank R of a launched job), locked with
flock for the stage's life and released by the OS when the process dies, so kill -9 and a rerun still resume.
The lock file names its holder (pid, host, job, command) so a refusal can say who holds it. Each rank of a
launched job holds its own lock; the ranks recognise each other by a job id taken from the launcher's
environment, so one rank can tell a live partner (lock held by the same job) from a dead one (lock free) and
stop waiting with an error instead of hanging.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from shared.core.errors import ConfigError, PipelineError

MANIFEST = "manifest.json"
JOB = "job.json"


class BusyError(PipelineError):
    """Another live process holds the output."""


def _real(path: Path) -> Path:
    return Path(os.path.abspath(Path(path).expanduser()))


# ---------------------------------------------------------------- safety


def _stage_of(folder: Path, name: str) -> str | None:
    """The stage named by `folder/name` (a manifest or a job.json), or None."""
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("stage") if isinstance(data, dict) else None


def _is_empty_dir(folder: Path, temporary_ok: bool = False) -> bool:
    """No entries; with temporary_ok, none but `*.tmp` files (a job.json being written atomically: the main
    rank of a launch makes its staging folder while the other ranks check theirs)."""
    try:
        return folder.is_dir() and not any(not (temporary_ok and p.name.endswith(".tmp")) for p in folder.iterdir())
    except OSError:
        return False


def check_target(out: Path, stage: str) -> None:
    """Refuse an output path this stage may not write to (before anything is written)."""
    out = _real(out)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise ConfigError(f"--out {out}: is a file, not a folder; choose a folder for the `{stage}` output")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"--out {out}: {parent} is a file, so no folder can be made under it")
    if out.is_dir() and not _is_empty_dir(out):
        found = _stage_of(out, MANIFEST)
        if found != stage:
            what = f"a `{found}` output" if found else f"files that are not a `{stage}` output"
            raise ConfigError(f"--out {out}: holds {what}; sdxl replaces only its own `{stage}` outputs, "
                              f"so choose another --out")
    for sibling, marker in ((_with_suffix(out, ".staging"), JOB), (_with_suffix(out, ".replaced"), MANIFEST)):
        if sibling.exists() and not _is_empty_dir(sibling, temporary_ok=True) and \
                _stage_of(sibling, marker) not in (stage, "?"):
            if marker == JOB and _legacy_job(sibling):
                continue
            raise ConfigError(f"--out {out}: {sibling} exists and is not an unfinished `{stage}` output; "
                              f"move it away or choose another --out")


def _legacy_job(staging: Path) -> bool:
    """A staging folder of an older version, whose job.json had no stage name."""
    try:
        data = json.loads((staging / JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "fingerprint" in data and "stage" not in data


def _with_suffix(out: Path, suffix: str) -> Path:
    return out.with_name(out.name + suffix)


def check_apart(out: Path, protected: Iterable[tuple[str, Path]]) -> None:
    """Refuse `out` when it is, contains or lies inside a protected folder (an input, a source, a model)."""
    out = _real(out)
    for what, path in protected:
        p = _real(path)
        if out == p:
            raise ConfigError(f"--out {out}: is the {what}; writing there would replace it, so choose another "
                              f"--out")
        if p.is_relative_to(out):
            raise ConfigError(f"--out {out}: contains the {what} {p}; writing there would replace it, so choose "
                              f"another --out")
        if out.is_relative_to(p):
            raise ConfigError(f"--out {out}: lies inside the {what} {p}; write outputs outside it (e.g. "
                              f"--out {p.parent / (p.name + '-' + out.name)})")


def local_paths(named: dict[str, str | Path | None]) -> list[tuple[str, Path]]:
    """The values that name files or folders on this machine (models given as paths), as (what, path)."""
    out = []
    for what, value in named.items():
        if value and not str(value).startswith("builtin:") and Path(value).expanduser().exists():
            out.append((what, Path(value).expanduser()))
    return out


# ---------------------------------------------------------------- the claim


def job_id(world: int) -> str:
    """What every rank of one launched job shares (and a different launch does not): the launcher's run id
    and rendezvous address, or Slurm's job and step; a single process is its own job."""
    if world == 1:
        return f"pid {os.getpid()} on {socket.gethostname()}"
    env = os.environ
    parts = [f"world {world}"] + [f"{k}={env[k]}" for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT",
                                                               "SLURM_JOB_ID", "SLURM_STEP_ID") if env.get(k)]
    return ", ".join(parts)


def lock_path(out: Path, rank: int = 0) -> Path:
    out = _real(out)
    return out.parent / (f".{out.name}.lock" if rank == 0 else f".{out.name}.rank{rank}.lock")


@dataclass
class Claim:
    out: Path
    path: Path
    fd: int
    job: str
    depth: int = 1


_held: dict[Path, Claim] = {}
ACQUIRE_TRIES = 20  # x 0.05 s: a liveness probe holds the lock for microseconds; retry past it


def claim(out: Path, stage: str, rank: int, job: str) -> Claim:
    """Lock `out` for this process (reentrant); a live holder is a BusyError naming it."""
    path = lock_path(out, rank)
    held = _held.get(path)
    if held is not None:
        held.depth += 1
        return held
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    for attempt in range(ACQUIRE_TRIES):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            time.sleep(0.05)
    else:
        os.close(fd)
        raise BusyError(f"{_real(out)}: another `sdxl` run is writing it ({describe(holder_info(path))}); wait "
                        f"for it to end, or give this run another --out")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "stage": stage, "rank": rank,
            "command": " ".join(sys.argv)[:300], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(info) + "\n").encode("utf-8", "surrogateescape"), 0)
    os.fsync(fd)
    found = Claim(_real(out), path, fd, job)
    _held[path] = found
    return found


def release(c: Claim) -> None:
    c.depth -= 1
    if c.depth > 0:
        return
    _held.pop(c.path, None)
    os.close(c.fd)  # closing the descriptor drops the flock; the file stays (removing it would race)


def holder_info(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def describe(info: dict) -> str:
    if not info:
        return "holder unknown"
    return (f"`{info.get('stage')}` pid {info.get('pid')} on {info.get('host')}, started {info.get('started')}: "
            f"{info.get('command')}")


def held(path: Path) -> bool:
    """Whether some live process holds the lock at `path` (a probe that never blocks)."""
    if Path(path) in _held:
        return True
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)  # also drops the shared lock when it was granted
    return False


def partner_alive(out: Path, rank: int, job: str) -> bool:
    """Whether rank `rank` of this job holds its lock on `out` (False: it has not started yet, it died, or
    the lock belongs to another job)."""
    path = lock_path(out, rank)
    return holder_info(path).get("job") == job and held(path)
