"""Errors a user can cause. The CLI prints them in one line and exits 2; anything else is a bug."""
from __future__ import annotations

import errno
import os
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


def os_error_line(error: OSError) -> str | None:
    """`<path>: <what the OS said>` for an OSError a user can fix (permissions, a file where a folder must be,
    a read-only or full disk); None for one with neither a path nor such a cause, which is left to be a bug."""
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
