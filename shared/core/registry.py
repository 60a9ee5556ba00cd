"""Registries of the choices users pick by name (optimizers, export formats, ...): one object per name, which
carries everything the rest of the code needs, so adding a choice is adding one entry in one module.

A registry is what a config field's `choices` holds (shared.core.config.opt): validation, did-you-mean and
`--help` read it when they run, so an entry registered later (a plugin) is a valid value like a built-in one.

Plugins: `SDXL_PLUGINS=module[,module...]` names modules imported before the CLI is built (and before a stage
resolves its config); each registers its entries on import (`OPTIMIZERS.add(Optimizer(...))`). Modules are found
on the usual import path (PYTHONPATH). An entry point group `sdxl_stages.plugins` of installed packages is
imported the same way.
"""
from __future__ import annotations

import difflib
import importlib
import os
from contextlib import contextmanager
from typing import Generic, Iterator, Protocol, TypeVar

from shared.core.errors import ConfigError


class Named(Protocol):
    name: str
    help: str


E = TypeVar("E", bound=Named)


class Registry(Generic[E]):
    """Entries by name, in the order they were added (the order `--help` lists them)."""

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, E] = {}

    def add(self, entry: E) -> E:
        """Register `entry` under its name; a second entry of one name is a bug (a plugin clash)."""
        if entry.name in self._entries:
            raise ValueError(f"{self.kind} {entry.name!r} is registered twice")
        self._entries[entry.name] = entry
        return entry

    def remove(self, name: str) -> None:
        del self._entries[name]

    @contextmanager
    def added(self, entry: E) -> Iterator[E]:
        """`entry` registered for the block's time (tests)."""
        self.add(entry)
        try:
            yield entry
        finally:
            self.remove(entry.name)

    def __getitem__(self, name: str) -> E:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(self.unknown(name)) from None

    def get(self, name: str) -> E | None:
        return self._entries.get(name)

    def unknown(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"unknown {self.kind} {name!r}; {hint}known: {', '.join(self._entries)}"

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def entries(self) -> list[E]:
        return list(self._entries.values())

    def where(self, **flags: object) -> tuple[str, ...]:
        """The names of the entries whose attributes equal `flags` (e.g. fusable=True)."""
        return tuple(n for n, e in self._entries.items() if all(getattr(e, k) == v for k, v in flags.items()))

    def help(self) -> str:
        """One sentence per entry, for an option's --help."""
        return " ".join(f"{e.name}: {e.help}" for e in self._entries.values())

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


_loaded: set[str] = set()


def load_plugins() -> list[str]:
    """Import the plugin modules named in SDXL_PLUGINS and the `sdxl_stages.plugins` entry points (each once per
    process); a module that cannot be imported is a one-line ConfigError naming it."""
    names = [n.strip() for n in os.environ.get("SDXL_PLUGINS", "").split(",") if n.strip()]
    done = []
    for name in names:
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"SDXL_PLUGINS names {name!r}, which cannot be imported: {e}") from None
        _loaded.add(name)
        done.append(name)
    from importlib.metadata import entry_points

    for point in entry_points(group="sdxl_stages.plugins"):
        if point.value not in _loaded:
            point.load()
            _loaded.add(point.value)
            done.append(point.value)
    return done
