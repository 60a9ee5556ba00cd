"""Errors a user can cause. The CLI prints them in one line and exits 2; anything else is a bug."""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import PurePath


class PipelineError(Exception):
    """A user-caused problem: the message names the path or field and the fix."""


class ConfigError(PipelineError):
    """A bad value, type or key in pipeline.toml or on the command line."""


class InputError(PipelineError):
    """A stage's input folder is missing, unfinished, of another stage or of an unknown version."""


class DataError(PipelineError):
    """The data itself cannot be processed as asked (no usable items, a bad source folder, ...)."""


#: errno values of an OSError without a path that still describe the machine, not a bug
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO, errno.EMFILE,
                errno.ENFILE}


def os_error_line(error: OSError, writing: PurePath | str | None = None) -> str | None:
    """`<path>: <what the OS said>` for an OSError a user can fix (permissions, a file where a folder must be,
    a read-only or full disk); None for one with neither a path nor such a cause, which is left to be a bug.
    `writing`: the output folder being written, named for a full disk when the error names no file."""
    if error.errno in _FULL:
        return disk_full_line(error.filename if error.filename is not None else writing, error.errno)
    if error.filename is None:
        return error.strerror if error.errno in _ENVIRONMENT and error.strerror else None
    path = _show(error.filename)
    if error.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(path)
        if blocker is not None:  # name the file that stands where a folder is needed, not the path asked for
            return f"{blocker}: {error.strerror} (a file where a folder is needed)"
    if error.errno == errno.EEXIST and os.path.lexists(path) and not os.path.isdir(path):
        return f"{path}: {error.strerror} (and is not a folder)"
    second = f" -> {_show(error.filename2)}" if error.filename2 is not None else ""
    return f"{path}{second}: {error.strerror or error}"


def _file_in_the_way(path: str) -> str | None:
    """The path itself or its nearest ancestor that exists, when that is not a folder."""
    for candidate in (path, *map(str, PurePath(path).parents)):
        if os.path.lexists(candidate):
            return candidate if not os.path.isdir(candidate) else None
    return None


def _show(name: object) -> str:
    return os.fsdecode(name) if isinstance(name, (str, bytes, os.PathLike)) else str(name)


_FULL = {errno.ENOSPC, errno.EDQUOT}
#: how errors that are not OSErrors (safetensors' SafetensorError, a Rust io::Error) say the disk is full
_FULL_WORDS = {"No space left on device": errno.ENOSPC, "StorageFull": errno.ENOSPC,
               "Disk quota exceeded": errno.EDQUOT, "QuotaExceeded": errno.EDQUOT}


def full_disk_line(error: BaseException, writing: PurePath | str | None = None) -> str | None:
    """The one line for an error that is not an OSError but says the disk is full (safetensors' SafetensorError
    names no file, so the output folder being written is named); None for any other error."""
    text = str(error)
    for words, number in _FULL_WORDS.items():
        if words in text:
            return disk_full_line(writing, number)
    return None


def disk_full_line(where: object, number: int = errno.ENOSPC) -> str:
    """`<path>: no space left on device (N free there); ...`: the path written (or the output folder being
    written) and the space its file system has left for this user."""
    what = "disk quota exceeded" if number == errno.EDQUOT else "no space left on device"
    fix = ("free some space (or give the output a disk with room: --out, or workdir), then rerun the same "
           "command")
    if where is None:
        return f"{what}; {fix}"
    path = _show(where)
    free = free_space(path)
    room = f" ({_size(free)} free there)" if free is not None else ""
    return f"{path}: {what}{room}; {fix}"


def free_space(path: str) -> int | None:
    """Bytes free to this user on the file system of `path` (or of its nearest existing ancestor)."""
    for candidate in (path, *map(str, PurePath(path).parents)):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: float) -> str:
    unit = "bytes"
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            break
        n /= 1000
    return f"{int(n)} bytes" if unit == "bytes" else f"{n:.1f} {unit}"
