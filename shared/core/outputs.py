"""Who may write an output folder: the safety checks made before a stage writes anything, and the claim (an
OS lock) that keeps a second run off an output while the first is alive.

Safety: a stage replaces a folder only when it is a finished or unfinished output of the same stage (its
manifest, or its staging folder's job.json or, once a commit has written it, manifest, says so) or an empty
folder. `--out` that is a regular file, lies under one, is, contains or lies inside an input or a source, or is
any other folder is refused in one line; so is `--out` when it, `<out>.staging` or `<out>.replaced` is a
symbolic link (outputs are replaced by renaming folders, which would replace the link, not what it leads to).
Once the claim is held, the main rank finishes what a commit killed after writing its manifest left undone
(`artifacts.finish_commit`).

Claim: `<parent>/.<name>.lock` (rank 0) or `.<name>.rank<R>.lock` (rank R of a launched job), locked for the
stage's life and released by the OS when the process dies, so kill -9 and a rerun still resume. The lock file
names its holder (pid, host, job, command: one JSON line) so a refusal can say who holds it. Each rank of a
launched job holds its own lock; the ranks recognise each other by a job id taken from the launcher's
environment, so one rank can tell a live partner (lock held by the same job) from a dead one (lock free) and
stop waiting with an error instead of hanging.

The lock itself is two OS calls behind `_lock` / `_unlock`: `fcntl.flock` where `fcntl` exists (exclusive for
the claim, shared for the probe `held`), else (Windows) `msvcrt.locking` on the single byte at `_LOCK_BYTE`,
far past the JSON: Windows byte-range locks are mandatory, so a lock on the bytes that hold the JSON would keep
a refused run from reading who holds it. msvcrt has no shared lock, so there the probe takes the exclusive
lock for an instant (a claim retries past it, see ACQUIRE_TRIES). Not the `filelock` package: its FileLock
classes open the lock file themselves (3.x with O_TRUNC: a refused run would erase the holder's name, and
through a symlink a user's file), delete it on release (Windows; Unix in later 3.x), lock byte 0 on Windows
(where the JSON is) and have no shared lock; what would be left of it once those are avoided is these two calls.

Lock files are never opened through a symlink (O_NOFOLLOW; where the OS lacks it, Windows, the path is checked
with lstat before and after the open), nor when they are not a regular file with one name (opened non-blocking,
so a FIFO there is refused instead of hanging), and never rewritten unless empty or holding a lock's JSON:
anything else at a lock path is a LockFileError naming it, and is left as it was.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from shared.core import artifacts
from shared.core.errors import ConfigError, PipelineError
from shared.core.log import say

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt

MANIFEST = "manifest.json"
JOB = "job.json"


class BusyError(PipelineError):
    """Another live process holds the output."""


class LockFileError(PipelineError):
    """Something that is not a lock file of ours stands where an output's lock file goes."""


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
    for path in (out, _with_suffix(out, ".staging"), _with_suffix(out, ".replaced")):
        if os.path.islink(path):
            raise ConfigError(f"--out {out}: {_link(path)}; sdxl replaces an output by renaming folders, which "
                              f"would replace the link, not the folder it leads to, so it writes only real "
                              f"folders: give --out the folder itself, or move the link away")
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
            if marker == JOB and (_legacy_job(sibling) or _stage_of(sibling, MANIFEST) == stage):
                continue  # an older version's, or one whose commit was killed after it wrote the manifest
            raise ConfigError(f"--out {out}: {sibling} exists and is not an unfinished `{stage}` output; "
                              f"move it away or choose another --out")


def _link(path: Path) -> str:
    try:
        return f"{path} is a symbolic link (to {os.readlink(path)})"
    except OSError:
        return f"{path} is a symbolic link"


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
_LOCK_BYTE = 0x40000000  # msvcrt: the byte locked (1 GiB in, as SQLite's lock bytes: past any data, never read)
_BUSY = {errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK)}
_OPEN = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)
_MAX_SIZE = 1 << 16  # a lock file's JSON is well under this; a larger file is not one
_OURS = b'{"pid": '  # how a lock's JSON begins (also when a crash cut its write short)


if fcntl is not None:
    def _lock(fd: int, shared: bool = False) -> bool:
        """Lock without waiting; False when another open file holds a conflicting lock."""
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        fcntl.flock(fd, fcntl.LOCK_UN)
else:
    def _lock(fd: int, shared: bool = False) -> bool:
        """Lock without waiting; False when another handle holds the byte (no shared locks here: see above)."""
        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            if e.errno in _BUSY:
                return False
            raise
        return True

    def _unlock(fd: int) -> None:
        os.lseek(fd, _LOCK_BYTE, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def claim(out: Path, stage: str, rank: int, job: str) -> Claim:
    """Lock `out` for this process (reentrant); a live holder is a BusyError naming it."""
    path = lock_path(out, rank)
    held = _held.get(path)
    if held is not None:
        held.depth += 1
        return held
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path, write=True)
    try:
        for attempt in range(ACQUIRE_TRIES):
            try:
                if _lock(fd):
                    break
            except OSError as e:  # e.g. a file system without locks: name the file, as other OS errors do
                raise OSError(e.errno, e.strerror, str(path)) from None
            time.sleep(0.05)
        else:
            raise BusyError(f"{_real(out)}: another `sdxl` run is writing it ({describe(holder_info(path))}); "
                            f"wait for it to end, or give this run another --out")
        info = {"pid": os.getpid(), "host": socket.gethostname(), "job": job, "stage": stage, "rank": rank,
                "command": " ".join(sys.argv)[:300], "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_holder(fd, path, (json.dumps(info) + "\n").encode("utf-8", "surrogateescape"))
        if rank == 0:  # the output is ours now: finish what a killed commit left (before anything is decided)
            done = artifacts.finish_commit(_real(out), stage)
            if done:
                say(f"{stage}: {done}")
    except BaseException:
        os.close(fd)
        raise
    found = Claim(_real(out), path, fd, job)
    _held[path] = found
    _claimed.append(found.out)
    return found


_claimed: list[Path] = []  # every output this process has claimed, in order (kept after release)


def claims_made() -> int:
    return len(_claimed)


def last_written(since: int = 0) -> Path | None:
    """The output folder this process claimed last (after its first `since` claims): its staging folder while
    that exists, else the folder itself; None when none was claimed since. What an error that names no file
    (a full disk) is reported against."""
    if len(_claimed) <= since:
        return None
    out = _claimed[-1]
    staging = _with_suffix(out, ".staging")
    return staging if staging.is_dir() else out


def release(c: Claim) -> None:
    c.depth -= 1
    if c.depth > 0:
        return
    _held.pop(c.path, None)
    try:
        _unlock(c.fd)
    except OSError:
        pass  # closing drops it all the same
    os.close(c.fd)  # the file stays (removing it would race with a run that has just opened it)


def _refused(path: Path, why: str) -> LockFileError:
    return LockFileError(f"{path}: {why}, not a lock file of sdxl, so it is left as it is; move it away or "
                         f"choose another --out")


def _check_kind(path: Path, st: os.stat_result | None) -> None:
    if st is None:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refused(path, "is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _refused(path, "is not a regular file")
    if st.st_nlink > 1:
        raise _refused(path, f"is a file with {st.st_nlink} names (hard links)")


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def _open_lock(path: Path, write: bool) -> int | None:
    """A descriptor on the lock file at `path` (with `write`: for reading and writing, the file made empty when
    there is none; without: read-only, None when there is none), never through a symlink and only of a regular
    file with one name; anything else there is a LockFileError."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | _OPEN
    _check_kind(path, _lstat(path))
    try:
        if write:
            try:
                fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o644)  # O_EXCL never follows a link
            except FileExistsError:
                fd = os.open(path, flags)
        else:
            fd = os.open(path, flags)
    except FileNotFoundError:
        if write:
            raise
        return None
    except OSError:
        _check_kind(path, _lstat(path))  # O_NOFOLLOW's ELOOP: a link put there since the lstat
        raise
    try:
        _check_kind(path, os.fstat(fd))
        now = _lstat(path)  # without O_NOFOLLOW the open followed whatever stood there by then: still no link?
        if now is None:
            raise _refused(path, "was removed while it was being opened")
        _check_kind(path, now)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read(fd: int) -> bytes:
    os.lseek(fd, 0, os.SEEK_SET)
    chunks, size = [], 0
    while size <= _MAX_SIZE:
        chunk = os.read(fd, _MAX_SIZE + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _write_holder(fd: int, path: Path, text: bytes) -> None:
    """Put the holder's JSON into the lock file (held by `fd`) when it is empty (made by us, or zeroed by a
    crash) or holds a lock's JSON; anything else is refused and left unchanged."""
    found = _read(fd)
    if len(found) > _MAX_SIZE or (found.strip(b"\0 \t\r\n") and not found.startswith(_OURS)):
        raise _refused(path, "holds other data")
    os.lseek(fd, 0, os.SEEK_SET)
    view = memoryview(text)
    while view:
        view = view[os.write(fd, view):]
    os.ftruncate(fd, len(text))  # after the write: a refused run never reads an empty file
    os.fsync(fd)


def holder_info(path: Path) -> dict:
    try:
        fd = _open_lock(Path(path), write=False)
    except (OSError, LockFileError):
        return {}
    if fd is None:
        return {}
    try:
        data = json.loads(_read(fd))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
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
        fd = _open_lock(Path(path), write=False)
    except (OSError, LockFileError):
        return False  # nothing of ours there, so no holder
    if fd is None:
        return False
    try:
        if not _lock(fd, shared=True):
            return True
        _unlock(fd)
        return False
    except OSError:
        return False
    finally:
        os.close(fd)


def partner_alive(out: Path, rank: int, job: str) -> bool:
    """Whether rank `rank` of this job holds its lock on `out` (False: it has not started yet, it died, or
    the lock belongs to another job)."""
    path = lock_path(out, rank)
    return holder_info(path).get("job") == job and held(path)
