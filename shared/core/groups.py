"""A stage config composed of option groups, each declared once beside the code that uses it (torchtitan style).

A group is a frozen, keyword-only dataclass in its owner module: the options it owns are `opt(...)` fields (default,
help, range, choices, fingerprint: shared.core.config.opt), the options it reads but another group owns are
`borrowed()`, and values the config computes are `derived()`. `compose` makes the stage's flat config from the
groups: one field per owned option, in group order, so the CLI flags, the TOML keys (`[train] learning_rate = ...`),
the fingerprint and the records keep their flat names; the config then makes each group back as a typed view of
its values (`view`), which is what the code that uses the group takes.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import MISSING, field, fields
from typing import Any


def borrowed() -> Any:
    """A group field whose option another group declares (its value comes from the composed config)."""
    return field(metadata={"borrowed": True})


def derived(default: Any = MISSING) -> Any:
    """A group field the composed config computes (a property of the same name), not an option of its own;
    `default` for a group made without a config (tests, benchmarks)."""
    return field(default=default, metadata={"derived": True})


def owned(group: type) -> list[dataclasses.Field]:
    """The options `group` declares itself."""
    return [f for f in fields(group) if not (f.metadata.get("borrowed") or f.metadata.get("derived"))]


def compose(name: str, groups: tuple[type, ...], base: type, module: str) -> type:
    """The frozen flat config class `name`: every option the groups own, in group order, on `base` (which holds
    the checks across groups and the views). An option owned twice, or borrowed but owned nowhere, is a bug."""
    declared: dict[str, tuple[type, Any, dataclasses.Field]] = {}
    for group in groups:
        hints = typing.get_type_hints(group)
        for f in owned(group):
            if f.name in declared:
                raise TypeError(f"option {f.name} is declared by {declared[f.name][0].__name__} and {group.__name__}")
            if f.default is MISSING:
                raise TypeError(f"option {group.__name__}.{f.name} has no default")
            declared[f.name] = (group, hints[f.name], field(default=f.default, metadata=f.metadata))
    for group in groups:
        for f in fields(group):
            if f.metadata.get("borrowed") and f.name not in declared:
                raise TypeError(f"{group.__name__}.{f.name} is borrowed, but no group declares it")
    specs = [(n, tp, f) for n, (_, tp, f) in declared.items()]
    cls = dataclasses.make_dataclass(name, specs, bases=(base,), frozen=True)
    cls.__module__, cls.__doc__ = module, base.__doc__
    cls.GROUP_OF = {n: g for n, (g, _, _) in declared.items()}
    return cls


def view(cfg: Any, group: type) -> Any:
    """The group made from the config's values (options and derived properties) of the same names."""
    return group(**{f.name: getattr(cfg, f.name) for f in fields(group)})
