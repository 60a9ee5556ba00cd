"""Stage configuration: one frozen dataclass per stage, every field documented.

Values resolve as CLI flag > the stage's `pipeline.toml` table > the `[pipeline]` table (for fields marked
`pipeline=True`) > the dataclass default. Unknown keys and wrong types are errors naming key and table.
"""
from __future__ import annotations

import dataclasses
import math
import tomllib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from shared.core.errors import ConfigError



@dataclasses.dataclass(frozen=True)
class Range:
    """The valid values of a numeric option: a lower and an upper bound (None = unbounded), each inclusive
    or not, and optionally a step. Floats must also be finite (no NaN, no ±inf), whatever the bounds."""
    low: float | None = None
    high: float | None = None
    low_inclusive: bool = True
    high_inclusive: bool = True
    multiple_of: int | None = None

    def __str__(self) -> str:
        if self.low is None and self.high is None and not self.multiple_of:
            return "any finite number"
        low = "(-inf" if self.low is None else ("[" if self.low_inclusive else "(") + _bound(self.low)
        high = "inf)" if self.high is None else _bound(self.high) + ("]" if self.high_inclusive else ")")
        step = f", a multiple of {self.multiple_of}" if self.multiple_of else ""
        return f"{low}, {high}{step}"

    def problem(self, value: float) -> str | None:
        """Why `value` is refused (None: it is valid)."""
        if isinstance(value, float) and not math.isfinite(value):
            unbounded = self.low is None and self.high is None
            return f"{value!r} is not a finite number" + ("" if unbounded else f"; valid: {self}")
        below = self.low is not None and (value < self.low if self.low_inclusive else value <= self.low)
        above = self.high is not None and (value > self.high if self.high_inclusive else value >= self.high)
        if below or above:
            return f"{value!r} is outside {self}"
        if self.multiple_of and value % self.multiple_of:
            return f"{value!r} is not a multiple of {self.multiple_of}; valid: {self}"
        return None


def _bound(x: float) -> str:
    if isinstance(x, int) and x >= 2 ** 32 and x & (x - 1) == 0:
        return f"2**{x.bit_length() - 1}"
    return f"{x:g}" if isinstance(x, float) else str(x)


#: the seeds' range: what every generator the stages seed accepts (torch's manual_seed takes 64 bits)
SEED_RANGE = dict(ge=0, lt=2 ** 63)


def opt(default: Any, help: str, *, flag: str | None = None, choices: tuple | None = None,
        fingerprint: bool = True, pipeline: bool = False, cli: bool = True,
        positional: bool = False, from_cli: Callable | None = None,
        ge: float | None = None, gt: float | None = None, le: float | None = None, lt: float | None = None,
        multiple_of: int | None = None, nonempty: bool = False) -> Any:
    """A documented config field.

    fingerprint: whether the value changes the stage's output (worker counts and paths do not).
    pipeline: the `[pipeline]` table supplies the value when the stage's table does not.
    cli: whether the field has a command-line flag (nested tables are TOML-only).
    ge / gt / le / lt / multiple_of: the valid range of a number (checked by `build`, stated in --help).
    nonempty: an empty string is refused.
    """
    if ge is not None and gt is not None or le is not None and lt is not None:
        raise TypeError("give one lower bound (ge or gt) and one upper bound (le or lt)")
    bounded = any(b is not None for b in (ge, gt, le, lt, multiple_of))
    valid = Range(low=gt if gt is not None else ge, high=lt if lt is not None else le, low_inclusive=gt is None,
                  high_inclusive=lt is None, multiple_of=multiple_of) if bounded else None
    meta = dict(help=help, flag=flag, choices=choices, fingerprint=fingerprint, pipeline=pipeline,
                cli=cli, positional=positional, from_cli=from_cli, range=valid, nonempty=nonempty)
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for defaults of frozen configs")
    return field(default=default, metadata=meta)


def pipeline_keys(tables: dict[str, type]) -> set[str]:
    """Keys the [pipeline] table may hold: the fields the stages mark pipeline=True."""
    return {f.name for cls in tables.values() for f in fields(cls) if f.metadata.get("pipeline")}


def load_toml(path: Path | str | None, tables: dict[str, type]) -> dict:
    """Read pipeline.toml, knowing the stage tables it may hold ({table: config class}, from the one list of
    stages, stages/pipeline.py); a missing file, a syntax error or an unknown table or [pipeline] key is a
    one-line ConfigError."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known_tables = {"pipeline", *tables}
    unknown = sorted(set(data) - known_tables)
    if unknown:
        raise ConfigError(f"{path}: unknown table [{unknown[0]}] (known: {', '.join(sorted(known_tables))})")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table [{name}], not a value")
    keys = pipeline_keys(tables)
    for key in data.get("pipeline", {}):
        if key not in keys:
            raise ConfigError(f"{path}: unknown key '{key}' in [pipeline] (known: {', '.join(sorted(keys))})")
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
        kwargs[name] = coerce(value, hints[name], f"{where} {name}")
        problem = value_problem(known[name], kwargs[name])
        if problem:
            raise ConfigError(f"{where} {name}: {problem}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{where} {e}") from None


def value_problem(f: dataclasses.Field, value: Any) -> str | None:
    """Why a coerced value is refused by its field's choices, range or non-emptiness (None: it is valid)."""
    meta = f.metadata
    if value is None:
        return None
    if meta.get("choices") and value not in meta["choices"]:
        return f"{value!r} is not one of {', '.join(map(str, meta['choices']))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (meta.get("range") or Range()).problem(value)
    if meta.get("nonempty") and value == "":
        return "must not be empty"
    return None


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
        if value == "":  # Path("") is the current folder: never what an empty value meant
            raise ConfigError(f"{where}: expected a path, got an empty string")
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
