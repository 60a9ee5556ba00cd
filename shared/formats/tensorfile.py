"""Writing `.safetensors` files that are the same bytes every time and readable as the umask allows.

safetensors' `save_file` (0.8) writes the `__metadata__` table in the order of a Rust HashMap, which changes
from run to run, and creates the file with mode 0600. `save_file` here writes through it, then rewrites the
header in place with the metadata keys sorted (the same JSON, so the same length: the tensor bytes and their
offsets do not move) and gives the file the mode a plain `open` gives (0666 less the umask).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from shared.core.artifacts import umask

METADATA = "__metadata__"


def save_file(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save_file, with a deterministic header and the umask's file mode."""
    from safetensors.torch import save_file as write

    write(tensors, str(path), metadata=metadata)
    canonical_file(path)
    os.chmod(path, 0o666 & ~umask())


def canonical_file(path: str | os.PathLike) -> None:
    """Rewrite the header of the safetensors file at `path` in its canonical order, in place."""
    with open(path, "r+b") as fh:
        size = int.from_bytes(fh.read(8), "little")
        header = fh.read(size)
        fixed = canonical_header(header)
        if fixed != header:
            fh.seek(8)
            fh.write(fixed)


def canonical_bytes(blob: bytes) -> bytes:
    """A serialised safetensors file (safetensors.torch.save's bytes) with its header in canonical order."""
    size = int.from_bytes(blob[:8], "little")
    return blob[:8] + canonical_header(blob[8:8 + size]) + blob[8 + size:]


def canonical_header(header: bytes) -> bytes:
    """The header JSON with `__metadata__` first and its keys sorted, the tensor entries in the order written
    (safetensors' own, which is already deterministic), padded with spaces to the same length; the header
    unchanged if the canonical form would not fit (it always does: only the order changes)."""
    data: dict[str, Any] = json.loads(header)
    ordered: dict[str, Any] = {}
    if METADATA in data:
        ordered[METADATA] = dict(sorted(data[METADATA].items()))
    ordered.update((k, v) for k, v in data.items() if k != METADATA)
    text = json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(text) > len(header):
        return header
    return text + b" " * (len(header) - len(text))


def read_metadata(path: str | os.PathLike | Path) -> dict[str, str]:
    """The `__metadata__` table of a safetensors file (empty when it has none), read from its header only."""
    with open(path, "rb") as fh:
        size = int.from_bytes(fh.read(8), "little")
        return json.loads(fh.read(size)).get(METADATA) or {}
