"""Fault injection for crash tests: `SDXL_FAULT=<point>:<n>` SIGKILLs the process the n-th time `<point>` is
reached (real `kill -9` semantics at an exact place, so the crash tests are not timing-based);
`SDXL_FAULT=<point>:<n>:INT` (or TERM) sends that signal instead, as Ctrl-C there would (the stage's handler
turns it into its one-line exit; in-process tests see SystemExit);
`SDXL_HOLD=<point>:<seconds>[:<n>]` sleeps there once instead (the n-th time it is reached, default the first),
printing `holding at <point>`, so a test can act on a run that is mid-stage (a second run on the same output, a
signal such as the SIGINT of Ctrl-C)."""
from __future__ import annotations

import os
import signal
import time

_hits: dict[str, int] = {}
_held: set[str] = set()


def checkpoint(point: str) -> None:
    spec = os.environ.get("SDXL_FAULT")
    if spec:
        name, count, sig = (spec.split(":") + ["KILL"])[:3]
        if name == point:
            _hits[point] = _hits.get(point, 0) + 1
            if _hits[point] == int(count) or (sig == "KILL" and _hits[point] > int(count)):
                os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))
    hold = os.environ.get("SDXL_HOLD")
    if hold:
        name, seconds, nth = (hold.split(":") + ["1"])[:3]
        if name == point and point not in _held:
            _hits[f"hold {point}"] = _hits.get(f"hold {point}", 0) + 1
            if _hits[f"hold {point}"] < int(nth):
                return
            _held.add(point)
            print(f"holding at {point}", flush=True)
            time.sleep(float(seconds))
