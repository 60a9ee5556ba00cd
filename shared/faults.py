"""Fault injection for crash tests: `SDXL_FAULT=<point>:<n>` SIGKILLs the process the n-th time
`<point>` is reached. Real `kill -9` semantics at an exact place, so the crash tests are not timing-based."""
from __future__ import annotations

import os
import signal

_hits: dict[str, int] = {}


def checkpoint(point: str) -> None:
    spec = os.environ.get("SDXL_FAULT")
    if not spec:
        return
    name, _, count = spec.rpartition(":")
    if name != point:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] >= int(count):
        os.kill(os.getpid(), signal.SIGKILL)
