"""Stage configuration: one frozen dataclass per stage, every field documented.

Values resolve as CLI flag > the stage's `pipeline.toml` table > the `[pipeline]` table (for fields marked
`pipeline=True`) > the dataclass default. Unknown keys and wrong types are errors naming key and table.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from shared.errors import ConfigError

#: tables pipeline.toml may hold; a stage adds its own when it is defined
KNOWN_TABLES = {"pipeline"}
#: keys of the [pipeline] table (stages read them through fields marked pipeline=True)
PIPELINE_KEYS = {"workdir"}


def opt(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
        fingerprint: bool = True, pipeline: bool = False, cli: bool = True,
        positional: bool = False, from_cli: Callable | None = None) -> Any:
    """A documented config field.

    fingerprint: whether the value changes the stage's output (worker counts and paths do not).
    pipeline: the `[pipeline]` table supplies the value when the stage's table does not.
    cli: whether the field has a command-line flag (nested tables are TOML-only).
    """
    meta = dict(help=help, flag=flag, choices=choices, fingerprint=fingerprint, pipeline=pipeline,
                cli=cli, positional=positional, from_cli=from_cli)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults of frozen configs")
    return field(default=default, metadata=meta)


def load_toml(path: Path | str | None) -> dict:
    """Read pipeline.toml; a missing file or a syntax error is a one-line ConfigError."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    unknown = sorted(set(data) - KNOWN_TABLES)
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (known: "
                          f"{', '.join(sorted(KNOWN_TABLES))})")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table [{name}], not a value")
    for key in data.get("pipeline", {}):
        if key not in PIPELINE_KEYS:
            raise ConfigError(f"{path}: unknown key '{key}' in [pipeline] (known: {', '.join(sorted(PIPELINE_KEYS))})")
    return data


def resolve(cls: type, table: str, toml: dict, cli: dict[str, Any] | None = None) -> Any:
    """Build `cls` from CLI values (None = not given), the TOML data and the defaults."""
    own = dict(toml.get(table, {}))
    shared = toml.get("pipeline", {})
    known = {f.name for f in fields(cls)}
    for key in own:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' in [{table}] (known: {', '.join(sorted(known))})")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if cli and cli.get(f.name) is not None:
            values[f.name] = cli[f.name]
        elif f.name in own:
            values[f.name] = own[f.name]
        elif f.metadata.get("pipeline") and f.name in shared:
            values[f.name] = shared[f.name]
    return build(cls, values, f"[{table}]")


def build(cls: type, values: dict, where: str) -> Any:
    """Make a config dataclass from plain values, checking keys, types and choices."""
    known = {f.name: f for f in fields(cls)}
    for key in values:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' in {where} (known: {', '.join(known)})")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        f = known[name]
        kwargs[name] = coerce(value, hints[name], f"{where} {name}")
        choices = f.metadata.get("choices")
        if choices and kwargs[name] not in choices:
            raise ConfigError(f"{where} {name}: {kwargs[name]!r} is not one of {', '.join(map(str, choices))}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`, converting only the lossless cases (int->float, str->Path)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where)
    if origin is tuple:
        return _coerce_tuple(value, typing.get_args(tp), where)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if isinstance(value, str) and "path" in {f.name for f in fields(tp)}:
            value = {"path": value}
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {_kind(value)}")
        return build(tp, value, where)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_kind(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_kind(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {_kind(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_kind(value)}")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {_kind(value)}")
        return Path(value)
    raise TypeError(f"unsupported config type {tp!r} at {where}")


def _coerce_tuple(value: Any, args: tuple, where: str) -> tuple:
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"{where}: expected a list, got {_kind(value)}")
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if len(value) != len(args):
        raise ConfigError(f"{where}: expected a list of {len(args)} values, got {len(value)}")
    return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def to_plain(obj: Any) -> Any:
    """A config as JSON-ready values (Paths as strings, tuples as lists)."""
    if is_dataclass(obj):
        return {f.name: to_plain(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def fingerprinted(cfg: Any) -> dict:
    """The part of a config that changes the stage's output."""
    return {f.name: to_plain(getattr(cfg, f.name)) for f in fields(cfg) if f.metadata.get("fingerprint", True)}


def default_of(f: dataclasses.Field) -> Any:
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return None
