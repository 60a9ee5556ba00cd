"""The stage graph: the artifact formats each stage reads and writes, and what follows from them — the order
`sdxl run` runs the stages in, each stage's default `--in`, the "run X first" hints, and which folders a stage
accepts as its input (by the format and version their manifest records, never by their producer's name or
folder; see artifacts.require_input).

A `Format` is declared once, by its owner module in shared/formats (items.py, plan.py, samples.py,
checkpoints.py): its name, the version written now, the versions still read, and `made_by`, the built-in stage
that writes it, which is how outputs written before manifests recorded their formats are still read: such an
output holds the formats `made_by` its `stage`.

A stage declares the formats it reads and writes on its `Stage` (shared/core/stage.py). `STAGES` is the one list
of stages (a Registry of `Node`s): stages/pipeline.py registers the built-in ones, a plugin module named in
SDXL_PLUGINS registers its own (`STAGES.add(node(module))`); `sdxl` makes one command per node, pipeline.toml
accepts one table per node, and `sdxl run` runs the nodes in `order()`.

Order: a stage runs after the producers of what it reads. The producers of one format form a chain: the stages
that write it without reading it, then those that read it and write it back (a filter or a rewrite of the
plan, say), in the order they were registered; each of those reads the output of the one before it, and every
other reader of the format reads the chain's last output. So a stage that reads and writes the plan, registered
by a plugin, runs between bucket and encode, and encode's default `--in` becomes that stage's output.
"""
from __future__ import annotations

import importlib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

from shared.core.errors import ConfigError
from shared.core.registry import Registry

#: the module that registers the built-in stages; imported by the first query of the graph when nothing has
#: imported it yet (a library caller that imported one stage), the way load_plugins imports plugins
BUILTIN = "stages.pipeline"


@dataclass(frozen=True)
class Format:
    """One kind of artifact handed from stage to stage."""
    name: str                      # items | plan | samples | checkpoints | ...
    version: int                   # the version written now
    help: str
    made_by: str                   # the built-in stage that writes it (outputs without a record of their formats)
    readable: tuple[int, ...] = ()  # versions read [default: (version,)]

    def __post_init__(self) -> None:
        object.__setattr__(self, "readable", tuple(self.readable) or (self.version,))


#: every declared format, by name (registered by its owner module when that is imported)
FORMATS: Registry[Format] = Registry("artifact format")


def declare(fmt: Format) -> Format:
    """Register `fmt` (its owner module does, once, at import)."""
    known = FORMATS.get(fmt.name)
    if known is not None and known != fmt:
        raise ValueError(f"artifact format {fmt.name!r} is declared twice, differently")
    return known or FORMATS.add(fmt)


def held(stage: str, holds: dict | None, version: int, wanted: Format | None = None) -> dict[str, int]:
    """The formats an output holds, {name: version}: its manifest's record (`holds`), or for an output written
    before formats were recorded, the formats made by its `stage`, at the manifest's `version`."""
    if holds is not None:
        return {str(k): v for k, v in holds.items()}
    made = {f.name: version for f in FORMATS.entries() if f.made_by == stage}
    if wanted is not None and wanted.made_by == stage:
        made[wanted.name] = version
    return made


@dataclass(frozen=True)
class Node:
    """A stage in the graph: its module (anything with `Config`, `run(cfg, force)`, a `STAGE` and a docstring)
    and what it reads and writes (the `STAGE`'s declaration unless given here)."""
    module: Any
    name: str = ""                 # its command and pipeline.toml table [default: its STAGE's name]
    reads: tuple[Format, ...] = ()
    writes: tuple[Format, ...] = ()
    folder: str = ""               # its default output folder under the workdir [default: its name]
    runs: bool = True              # whether `sdxl run` runs it (False: its command makes a source, as generate)
    help: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        stage = getattr(self.module, "STAGE", None)
        for what in ("reads", "writes"):
            declared = tuple(getattr(stage, what, ()) or ())
            given = tuple(getattr(self, what))
            if declared and given and declared != given:
                raise ValueError(f"stage {self.name or stage.name}: {what} given twice, differently")
            object.__setattr__(self, what, given or declared)
        object.__setattr__(self, "name", self.name or stage.name)
        object.__setattr__(self, "folder", self.folder or self.name)
        doc = (getattr(self.module, "__doc__", None) or "").strip()
        object.__setattr__(self, "help", self.help or (doc.splitlines()[0] if doc else self.name))

    @property
    def Config(self) -> type:  # noqa: N802  (the name a stage module gives it)
        return self.module.Config

    @property
    def run(self) -> Any:
        return self.module.run

    @property
    def doc(self) -> str:
        return getattr(self.module, "__doc__", None) or ""

    @property
    def usage(self) -> str:
        """Its positional arguments as a command line shows them (" SOURCE..." for ingest)."""
        hints = typing.get_type_hints(self.Config)
        shown = []
        for f in fields(self.Config):
            if f.metadata.get("positional"):
                name = f.name.upper()
                many = typing.get_origin(hints[f.name]) is tuple
                shown.append(f"{name[:-1] if many and name.endswith('S') else name}{'...' if many else ''}")
        return "".join(" " + s for s in shown)


#: the stages, in the order they were registered (`order()` is the order they run in)
STAGES: Registry[Node] = Registry("stage")


def node(module: Any, **given: Any) -> Node:
    """The node of a stage module (see Node); register it with `STAGES.add(node(module))`."""
    return Node(module, **given)


def _complete() -> None:
    """The built-in stages registered (imports BUILTIN when nothing has yet)."""
    if not _loading and BUILTIN not in _imported:
        _loading.append(BUILTIN)
        try:
            importlib.import_module(BUILTIN)
            _imported.add(BUILTIN)
        finally:
            _loading.clear()


_imported: set[str] = set()
_loading: list[str] = []


def nodes(runs_only: bool = False) -> list[Node]:
    """The registered stages in run order (`runs_only`: those `sdxl run` runs)."""
    return [n for n in order() if n.runs or not runs_only]


def chain(fmt: Format, among: list[Node]) -> list[Node]:
    """The producers of `fmt` among `among`, in the order they hand it on: those that write it without
    reading it, then those that read it and write it back, each in registration order."""
    made = [n for n in among if _has(n.writes, fmt) and not _has(n.reads, fmt)]
    redone = [n for n in among if _has(n.writes, fmt) and _has(n.reads, fmt)]
    return made + redone


def _has(formats: tuple[Format, ...], fmt: Format) -> bool:
    return any(f.name == fmt.name for f in formats)


def upstream(stage: Node, fmt: Format, among: list[Node] | None = None) -> Node | None:
    """The stage whose output `stage` reads `fmt` from by default (None: no registered stage writes it)."""
    among = among if among is not None else _runnable(stage)
    found = chain(fmt, among)
    if stage in found:
        k = found.index(stage)
        return found[k - 1] if k else None
    return found[-1] if found else None


def _runnable(stage: Node | None = None) -> list[Node]:
    """The stages `sdxl run` runs (plus `stage`, when it is one it does not), in registration order."""
    _complete()
    return [n for n in STAGES.entries() if n.runs or n is stage]


def order() -> list[Node]:
    """Every registered stage, each after the stages whose output it reads: in registration order, except that
    a stage's producers are moved ahead of it (a depth-first walk). A cycle is a ConfigError naming its stages."""
    _complete()
    every = STAGES.entries()
    before = {n.name: [u for u in (upstream(n, fmt, _runnable(n)) for fmt in n.reads) if u is not None]
              for n in every}
    done: list[Node] = []
    walking: list[Node] = []

    def visit(n: Node) -> None:
        if n in done:
            return
        if n in walking:
            loop = walking[walking.index(n):]
            raise ConfigError(f"the stages {', '.join(m.name for m in loop)} read each other's output (a cycle in "
                              f"what they read and write); change what one of them reads or writes")
        walking.append(n)
        for u in before[n.name]:
            visit(u)
        walking.pop()
        done.append(n)

    for n in every:
        visit(n)
    return done


def default_input(workdir: Path, stage: str) -> Path:
    """Where `stage` reads its (first) input by default: the default output folder of the stage before it in
    the graph (see `upstream`); `workdir/<the format's built-in producer>` when no registered stage writes it."""
    _complete()
    here = STAGES[stage]
    if not here.reads:
        raise ConfigError(f"stage {stage!r} reads no stage's output, so it has no default input")
    fmt = here.reads[0]
    before = upstream(here, fmt)
    return Path(workdir) / (before.folder if before is not None else fmt.made_by)


def producers(fmt: Format) -> list[str]:
    """The names of the stages that write `fmt` (in hand-on order; its built-in producer when none is
    registered)."""
    _complete()
    return [n.name for n in chain(fmt, STAGES.entries())] or [fmt.made_by]


def fix(fmt: Format, folder: Path | str, wrote: str | None = None) -> str:
    """The command that (re)writes `fmt` at `folder`: the stage `wrote` (the one whose output it is) when that
    writes `fmt`, else the producer whose default folder has `folder`'s name, else the last of the chain."""
    _complete()
    found = chain(fmt, STAGES.entries())
    name = str(folder).rstrip("/").rsplit("/", 1)[-1]
    pick = (next((n for n in found if n.name == wrote), None)
            or next((n for n in found if n.folder == name), None)
            or next((n for n in reversed(found) if n.runs), None)
            or (found[-1] if found else None))
    if pick is None:
        return f"sdxl {fmt.made_by} --out {folder}"
    return f"sdxl {pick.name}{pick.usage} --out {folder}"


def who(fmt: Format, markup: str = "`{}`") -> str:
    """The producers of `fmt` for a message: "`bucket`", "`bucket` or `caps`"."""
    return " or ".join(markup.format(p) for p in producers(fmt))


class _Names(Sequence):
    """The registered stages' names in run order, read when used (so a plugin's stage is one of them)."""

    def __getitem__(self, k: Any) -> Any:
        return tuple(n.name for n in order())[k]

    def __len__(self) -> int:
        return len(order())

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(n.name for n in order()))

    def __contains__(self, name: object) -> bool:
        return name in tuple(self)

    def __repr__(self) -> str:
        return f"stage names {tuple(self)}"


class _Tables(Mapping):
    """{pipeline.toml table: its config class}, one per registered stage, read when used."""

    def __getitem__(self, name: str) -> type:
        _complete()
        found = STAGES.get(name)
        if found is None:
            raise KeyError(name)
        return found.Config

    def __iter__(self) -> Iterator[str]:
        return iter(tuple(NAMES))

    def __len__(self) -> int:
        return len(NAMES)

    def __repr__(self) -> str:
        return f"stage tables {dict(self)}"


#: every stage's name, in run order (the stage tables of pipeline.toml, the `sdxl` commands)
NAMES: Sequence[str] = _Names()
#: {table: config class} of every stage (load_toml's `tables`)
TABLES: Mapping[str, type] = _Tables()
