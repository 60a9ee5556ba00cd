"""Fault injection for crash tests: `SDXL_FAULT=<point>:<n>` SIGKILLs the process the n-th time `<point>` is
reached (real `kill -9` semantics at an exact place, so the crash tests are not timing-based);
`SDXL_HOLD=<point>:<seconds>` sleeps there once instead, so a test can act on a run that is mid-stage
(a second run on the same output, a signal)."""
from __future__ import annotations

import os
import signal
import time

_hits: dict[str, int] = {}
_held: set[str] = set()


def checkpoint(point: str) -> None:
    spec = os.environ.get("SDXL_FAULT")
    if spec:
        name, _, count = spec.rpartition(":")
        if name == point:
            _hits[point] = _hits.get(point, 0) + 1
            if _hits[point] >= int(count):
                os.kill(os.getpid(), signal.SIGKILL)
    hold = os.environ.get("SDXL_HOLD")
    if hold:
        name, _, seconds = hold.rpartition(":")
        if name == point and point not in _held:
            _held.add(point)
            print(f"holding at {point}", flush=True)
            time.sleep(float(seconds))
