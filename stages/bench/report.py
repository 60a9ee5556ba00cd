"""A benchmark's result as a Markdown table: printed, and appended to BENCHMARKS.md with the date, the machine
(CPU model and cores, memory, GPU), the Python / torch / numpy / zarr versions and the command that made it."""
from __future__ import annotations

import datetime as _dt
import os
import platform
import sys
from pathlib import Path
from typing import Any, Sequence

#: the figures file the bench commands append to (each takes --report to name another)
DEFAULT = Path("BENCHMARKS.md")


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if abs(v) < 1 else f"{v:,.2f}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join("---" for _ in headers) + " |"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    """One line: CPU, cores, memory, GPU, OS."""
    parts = [f"{cpu_model()}, {os.cpu_count()} cores"]
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        parts.append(f"{pages * size / 2 ** 30:.0f} GiB")
    except (ValueError, OSError, AttributeError):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return ", ".join(parts + [gpu, f"{platform.system()} {platform.release()}"])


def versions() -> str:
    import numpy
    import torch

    found = [f"Python {platform.python_version()}", f"torch {torch.__version__}", f"numpy {numpy.__version__}"]
    for name in ("zarr", "fsspec", "webdataset"):
        try:
            found.append(f"{name} {__import__(name).__version__}")
        except ImportError:
            pass
    return ", ".join(found)


def command_line(path: str, params: dict[str, Any], flags: dict[str, tuple[str, str | None, bool]] | None = None
                 ) -> str:
    """The command with every option as it was resolved (defaults included), so the run can be repeated.
    `flags`: per parameter (its flag, its off-flag for a boolean, whether it takes several values at once)."""
    words = [path]
    for name, value in params.items():
        flag, off, several = (flags or {}).get(name, ("--" + name.replace("_", "-"), None, False))
        if isinstance(value, bool):
            words += [flag] if value else ([off] if off else [])
        elif isinstance(value, (list, tuple)) and several:
            words.append(f"{flag} " + " ".join(str(v) for v in value))
        elif isinstance(value, (list, tuple)):
            words += [f"{flag} {v}" for v in value]
        elif value is not None:
            words.append(f"{flag} {value}")
    return " ".join(words)


def publish(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]], command: str,
            report: Path | None, notes: str = "") -> str:
    """Print the table; append it, with date, machine, versions and command, to `report` (None: print only)."""
    body = table(headers, rows)
    print(body + ("\n\n" + notes if notes else ""), flush=True)
    if report is None:
        return body
    date = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    section = (f"\n## {title} ({date})\n\nMachine: {machine()}; {versions()}.\n\n```\n{command}\n```\n\n"
               f"{body}\n" + (f"\n{notes}\n" if notes else ""))
    with open(report, "a", encoding="utf-8") as fh:
        fh.write(section)
    print(f"appended to {report}", file=sys.stderr)
    return body
