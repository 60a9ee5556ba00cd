"""Console output: one-line messages, progress bars on long work, plain aligned tables."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")


def say(message: str) -> None:
    print(message, flush=True)


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "it") -> Iterator[T]:
    """A tqdm bar on stderr when it is a terminal (or SDXL_PROGRESS=1); silent otherwise."""
    from tqdm import tqdm

    forced = os.environ.get("SDXL_PROGRESS")
    disable = (forced == "0") if forced is not None else None
    yield from tqdm(items, total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True,
                    smoothing=0.1, file=sys.stderr)


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows as an aligned text table; numbers right-aligned."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) if rows else False
               for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(headers)), line(["-" * w for w in widths])]
    out += [line(r) for r in cells]
    return "\n".join(out)


def _fmt(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
