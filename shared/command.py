"""A Typer command made from a stage's config dataclass, so each option is declared (and documented) once.

Every CLI option defaults to None, meaning "not given", which is what lets a `pipeline.toml` value win over
the dataclass default while a flag wins over both. A PipelineError becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import inspect
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

from shared.config import default_of, load_toml, resolve
from shared.errors import PipelineError


def fail(error: PipelineError) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


def config_option() -> Any:
    return typer.Option(None, "--config", "-c", help="pipeline.toml to read this stage's table from.",
                        dir_okay=False)


def _cli_annotation(tp: Any, meta: dict) -> Any:
    if meta.get("from_cli") is not None or typing.get_origin(tp) is tuple:
        return Optional[List[str]]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return Optional[tp]


def _help(f: Any) -> str:
    meta = f.metadata
    text = meta.get("help", "")
    if meta.get("choices"):
        text += f" One of: {', '.join(map(str, meta['choices']))}."
    default = default_of(f)
    if default not in (None, ()) and not meta.get("positional"):
        shown = str(default).lower() if isinstance(default, bool) else default
        text += f" [default: {shown}]"
    return text


def _parameter(f: Any, tp: Any) -> inspect.Parameter:
    meta = f.metadata
    if meta.get("positional"):
        default = typer.Argument(None, help=_help(f), show_default=False)
    else:
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if tp is bool or typing.get_args(tp) == (bool, type(None)):
            flag = f"{flag}/--no-{flag[2:]}"
        default = typer.Option(None, flag, help=_help(f), show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=_cli_annotation(tp, meta))


def stage_command(cls: type, table: str, run: Callable[..., Any], doc: str) -> Callable[..., None]:
    """A Typer-ready function: flags from `cls`'s fields, plus --config and --force; calls run(cfg, force)."""
    hints = typing.get_type_hints(cls)
    cli_fields = [f for f in fields(cls) if f.metadata.get("cli", True)]

    def command(**kwargs: Any) -> None:
        config_path, force = kwargs.pop("config"), kwargs.pop("force")
        try:
            cfg = resolve(cls, table, load_toml(config_path), _cli_values(cli_fields, kwargs))
            run(cfg, force=bool(force))
        except PipelineError as e:
            raise fail(e) from None

    params = [_parameter(f, hints[f.name]) for f in cli_fields]
    params.append(inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=config_option(),
                                    annotation=Optional[Path]))
    params.append(inspect.Parameter("force", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--force", help="Run even if the output is "
                                                         "up to date.")))
    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__doc__ = doc
    command.__name__ = table
    return command


def _cli_values(cli_fields: list, kwargs: dict) -> dict:
    values = {}
    for f in cli_fields:
        value = kwargs.get(f.name)
        if value is None or (isinstance(value, list) and not value):
            continue
        convert = f.metadata.get("from_cli")
        values[f.name] = convert(value) if convert else (tuple(value) if isinstance(value, list) else value)
    return values
