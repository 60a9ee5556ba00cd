"""A Typer command made from a stage's config dataclass, so each option is declared (and documented) once.

Every CLI option defaults to None, meaning "not given", which is what lets a `pipeline.toml` value win over
the dataclass default while a flag wins over both. A PipelineError, or an OSError naming a path (permission
denied, a file where a folder is needed, a read-only or full disk), becomes one line on stderr and exit 2.
"""
from __future__ import annotations

import inspect
import types
import typing
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional

import typer

from shared.core.config import FOREIGN_KEYS, Range, default_of, load_toml, resolve
from shared.core import outputs
from shared.core.errors import PipelineError, full_disk_line, os_error_line
from shared.core.registry import Registry


def fail(error: PipelineError | str) -> typer.Exit:
    typer.echo(f"error: {error}", err=True)
    return typer.Exit(2)


@contextmanager
def user_errors() -> Iterator[None]:
    """A PipelineError, or an OSError a user can fix (see errors.os_error_line), or any error saying the disk is
    full (safetensors' SafetensorError; named by the output folder being written), becomes one line on stderr
    and exit 2; anything else propagates with its traceback (a bug)."""
    since = outputs.claims_made()
    try:
        yield
    except PipelineError as e:
        raise fail(e) from None
    except OSError as e:
        line = os_error_line(e, outputs.last_written(since))
        if line is None:
            raise
        raise fail(line) from None
    except Exception as e:  # noqa: BLE001 - only a full disk said by another error type (SafetensorError)
        line = full_disk_line(e, outputs.last_written(since))
        if line is None:
            raise
        raise fail(line) from None


def config_option() -> Any:
    return typer.Option(None, "--config", "-c", help="pipeline.toml to read this stage's table from.",
                        dir_okay=False)


def _cli_annotation(tp: Any, meta: dict) -> Any:
    if meta.get("from_cli") is not None or typing.get_origin(tp) is tuple:
        return Optional[List[str]]
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
    return Optional[tp]


def _help(f: Any, tp: Any = None) -> str:
    meta = f.metadata
    text = meta.get("help", "")
    choices = meta.get("choices")
    if isinstance(choices, Registry):   # each entry's own sentence, read when the command is built
        text += f" One of: {choices.help()}"
    elif choices:
        text += f" One of: {', '.join(map(str, choices))}."
    if meta.get("range") is not None or tp in (float, Optional[float]):  # a float is at least finite
        text += f" Range: {meta.get('range') or Range()}."
    default = default_of(f)
    if default not in (None, ()) and not meta.get("positional"):
        shown = str(default).lower() if isinstance(default, bool) else default
        text += f" [default: {shown}]"
    return text


def foreign_flags(table: str, name: str, taken: set[str]) -> list[str]:
    """kohya's and diffusers' flag names for option `name` of `table`, where theirs means exactly ours (FOREIGN_KEYS
    entries without a note; booleans and names one of our flags already has are left out)."""
    out = []
    for key, (_, tables, ours, note) in FOREIGN_KEYS.items():
        flag = "--" + key.replace("_", "-")
        if ours == name and not note and table in tables and flag not in taken and key not in AMBIGUOUS:
            out.append(flag)
    return out


#: foreign names too general to stand for one of our options on the command line
AMBIGUOUS = {"rank"}


def _parameter(f: Any, tp: Any, table: str = "", taken: set[str] = frozenset()) -> inspect.Parameter:
    meta = f.metadata
    if meta.get("positional"):
        default = typer.Argument(None, help=_help(f, tp), show_default=False)
    else:
        flag = meta.get("flag") or "--" + f.name.replace("_", "-")
        if tp is bool or typing.get_args(tp) == (bool, type(None)):
            default = typer.Option(None, f"{flag}/--no-{flag[2:]}", help=_help(f, tp), show_default=False)
        else:
            aliases = foreign_flags(table, f.name, taken)   # shown beside ours: --lora-rank, --network-dim
            default = typer.Option(None, flag, *aliases, help=_help(f, tp), show_default=False)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=_cli_annotation(tp, meta))


def stage_command(cls: type, table: str, run: Callable[..., Any], doc: str,
                  tables: dict[str, type]) -> Callable[..., None]:
    """A Typer-ready function: flags from `cls`'s fields, plus --config and --force; calls run(cfg, force).
    `tables`: every stage's table and config class, so any valid pipeline.toml is accepted."""
    hints = typing.get_type_hints(cls)
    cli_fields = [f for f in fields(cls) if f.metadata.get("cli", True)]

    def command(**kwargs: Any) -> None:
        config_path, force = kwargs.pop("config"), kwargs.pop("force")
        with user_errors():
            cfg = resolve(cls, table, load_toml(config_path, tables), _cli_values(cli_fields, kwargs))
            run(cfg, force=bool(force))

    taken = {f.metadata.get("flag") or "--" + f.name.replace("_", "-") for f in cli_fields}
    params = [_parameter(f, hints[f.name], table, taken) for f in cli_fields]
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
