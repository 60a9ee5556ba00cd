"""Reading a source's files without trusting what stands at their names: only regular files are read (a
symbolic link is followed, but only to a regular file), and never more than a limit.

A FIFO named like an image would hang a plain `open` until someone writes to it; a link to /dev/zero or
/dev/urandom would be read until memory runs out. Both become rejected rows (`not_regular`), as does a file
larger than the limit (`too_large`), read or not: the size is checked from `stat` before reading, and the read
itself stops one byte past the limit (a file growing while it is read).
"""
from __future__ import annotations

import os
import stat

from shared.images import Rejected

#: the largest caption file read (a caption is a few hundred bytes; the text encoders read 77 tokens a window)
MAX_CAPTION_BYTES = 1 << 20
#: the largest metadata.jsonl read (a line per image: a million images fit)
MAX_METADATA_BYTES = 1 << 28
#: an image file may hold this many bytes per pixel that max_pixels allows (32-bit float RGBA, uncompressed)...
BYTES_PER_PIXEL = 16
#: ...plus this much for what is not pixels (EXIF, ICC profiles, XMP, thumbnails)
IMAGE_SLACK = 1 << 24


def image_limit(max_pixels: int) -> int:
    """The largest image file read: what `max_pixels` pixels could take uncompressed, and room for metadata."""
    return max_pixels * BYTES_PER_PIXEL + IMAGE_SLACK

#: O_NONBLOCK: opening a FIFO (put there after the stat) returns at once instead of waiting for a writer;
#: O_NOCTTY: a terminal device never becomes this process's controlling terminal
_OPEN = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_BINARY", 0) \
    | getattr(os, "O_CLOEXEC", 0)
_CHUNK = 1 << 22


def read_regular(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The bytes of the regular file at `path` (a link to one is followed), at most `limit` of them; anything
    else is Rejected: `not_regular` (a FIFO, a device, a socket, a folder) or `too_large`. An OSError of the
    open or the read is raised as it is (the caller's `unreadable`)."""
    st = os.stat(path)  # stat never blocks, whatever the file is
    _check(path, st, limit, what)
    fd = os.open(path, _OPEN)
    try:
        _check(path, os.fstat(fd), limit, what)  # what was opened, which may no longer be what was stat'ed
        chunks, size = [], 0
        while size <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:
        raise Rejected("too_large", f"{what} grew past the {limit:,} bytes read while it was read")
    return b"".join(chunks)


def _check(path: str | os.PathLike, st: os.stat_result, limit: int, what: str) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise Rejected("not_regular", f"{what} is {_kind(st.st_mode)}{_via_link(path)}, not a regular file; "
                                      f"only regular files are read")
    if st.st_size > limit:
        raise Rejected("too_large", f"{what} of {st.st_size:,} bytes, more than the {limit:,} bytes read")


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "not a regular file"


def _via_link(path: str | os.PathLike) -> str:
    try:
        return f" (through a symbolic link to {os.readlink(path)!r})" if os.path.islink(path) else ""
    except OSError:
        return ""
