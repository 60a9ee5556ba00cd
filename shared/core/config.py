"""Stage configuration: one frozen dataclass per stage, every field documented.

Values resolve as CLI flag > the stage's `pipeline.toml` table > the `[pipeline]` table (for fields marked
`pipeline=True`) > the dataclass default. Unknown keys and wrong types are errors naming key and table.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import tomllib
import types
import typing
from dataclasses import MISSING, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Callable

from shared.core import graph
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
    try:  # a byte-order mark (as Windows editors save UTF-8) is not TOML, but tells nothing wrong: skip it
        data = tomllib.loads(path.read_text(encoding="utf-8").removeprefix("\ufeff"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    known_tables = {"pipeline", *tables}
    unknown = sorted(set(data) - known_tables)
    if unknown:
        raise ConfigError(f"{path}: {unknown_table(unknown[0], known_tables)}")
    for name, table in data.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: '{name}' must be a table [{name}], not a value")
    keys = pipeline_keys(tables)
    for key in data.get("pipeline", {}):
        if key not in keys:
            raise ConfigError(f"{path}: {unknown_key(key, '[pipeline]', keys)}")
    return data


_K, _D, _KD = "kohya's", "diffusers'", "kohya's and diffusers'"  # whose name it is
_ANY_STAGE = graph.NAMES  # every stage's table (the stage graph's, read when used)
_ATTENTION = "attention is PyTorch's scaled_dot_product_attention, always"
_LOGS = "set tensorboard = true or wandb = true"

#: Keys as kohya's sd-scripts (train_network.py, sdxl_train.py, library/train_util.py, dataset config files) and
#: the diffusers training scripts (train_text_to_image_lora_sdxl.py, train_dreambooth_lora_sdxl.py) name them:
#: name -> (whose name it is, tables holding ours (the first is named when the key sits in another), our key or None
#: when there is no such option here, a note). tests/test_config.py checks every key against the stage configs.
FOREIGN_KEYS: dict[str, tuple[str, tuple[str, ...], str | None, str]] = {
    "network_dim": (_K, ("train",), "lora_rank", ""),
    "network_alpha": (_K, ("train",), "lora_alpha", ""),
    "network_dropout": (_K, ("train",), "lora_dropout", ""),
    "network_module": (_K, ("train",), "method", 'a LoRA is method = "lora"'),
    "rank": (_D, ("train",), "lora_rank", ""),
    "use_dora": (_D, ("train",), "dora", ""),
    "train_batch_size": (_KD, ("train",), "batch_size", ""),
    "max_train_steps": (_KD, ("train",), "max_steps", ""),
    "max_train_epochs": (_K, ("train",), "epochs", ""),
    "num_train_epochs": (_D, ("train",), "epochs", ""),
    "lr_scheduler": (_KD, ("train",), "lr_schedule", ""),
    "lr_warmup_steps": (_KD, ("train",), "warmup_steps", ""),
    "lr_scheduler_num_cycles": (_K, ("train",), "lr_cycles", ""),
    "lr_num_cycles": (_D, ("train",), "lr_cycles", ""),
    "lr_scheduler_power": (_K, ("train",), "lr_power", ""),
    "gradient_accumulation_steps": (_KD, ("train",), "accumulate", ""),
    "save_every_n_steps": (_K, ("train",), "checkpoint_every", ""),
    "save_every_n_epochs": (_K, ("train",), "checkpoint_every", "counted in optimizer steps here"),
    "checkpointing_steps": (_D, ("train",), "checkpoint_every", ""),
    "checkpoints_total_limit": (_D, ("train",), "keep_checkpoints", ""),
    "resume_from_checkpoint": (_D, ("train",), "resume", ""),
    "snr_gamma": (_D, ("train",), "min_snr_gamma", ""),
    "caption_dropout_rate": (_K, ("train",), "caption_dropout", ""),
    "proportion_empty_prompts": (_D, ("train",), "caption_dropout", ""),
    "v_parameterization": (_K, ("train",), "prediction", 'prediction = "v_prediction"'),
    "prediction_type": (_D, ("train",), "prediction", ""),
    "zero_terminal_snr": (_K, ("train",), "schedule", 'schedule = "ztsnr"'),
    "weighting_scheme": (_D, ("train",), "timesteps", 'timesteps = "logit_normal"'),
    "full_bf16": (_K, ("train",), "weights_dtype", 'weights_dtype = "bfloat16"'),
    "allow_tf32": (_D, ("train",), "tf32", ""),
    "use_ema": (_D, ("train",), "ema_decay", "ema_decay > 0 turns it on"),
    "adam_weight_decay": (_D, ("train",), "weight_decay", ""),
    "adam_epsilon": (_D, ("train",), "adam_eps", ""),
    "optimizer_type": (_K, ("train",), "optimizer", 'lower case: AdamW8bit -> "adamw8bit"'),
    "use_8bit_adam": (_KD, ("train",), "optimizer", 'optimizer = "adamw8bit"'),
    "training_comment": (_K, ("train", "export"), "comment", ""),
    "log_with": (_K, ("train",), None, _LOGS),
    "report_to": (_D, ("train",), None, _LOGS),
    "logging_dir": (_K, ("train",), None, "logs are written to <train output>/logs"),
    "xformers": (_K, ("train",), None, _ATTENTION),
    "sdpa": (_K, ("train",), None, _ATTENTION),
    "enable_xformers_memory_efficient_attention": (_D, ("train",), None, _ATTENTION),
    "cache_latents": (_K, ("encode",), None, "the encode stage always stores the latents"),
    "cache_latents_to_disk": (_K, ("encode",), None, "the encode stage always stores the latents"),
    "cache_text_encoder_outputs": (_K, ("encode",), None, "the encode stage always stores the text embeddings"),
    "cache_text_encoder_outputs_to_disk": (_K, ("encode",), None, "the encode stage always stores them"),
    "clip_skip": (_K, ("encode",), None, "both text encoders' penultimate layers, always"),
    "no_half_vae": (_K, ("encode",), "vae_dtype", 'vae_dtype = "float32", the default'),
    "vae": (_K, ("encode",), "vae", ""),
    "pretrained_vae_model_name_or_path": (_D, ("encode",), "vae", ""),
    "shuffle_caption": (_K, ("encode",), "caption_variants", "tag-shuffled captions are encoded ahead: N variants"),
    "keep_tokens": (_K, ("encode",), "keep_tags", ""),
    "max_token_length": (_K, ("encode",), "max_windows", "in 75-token windows: 225 -> 3"),
    "flip_aug": (_K, ("encode",), "flip", "and [train] flip_rate"),
    "random_flip": (_D, ("encode",), "flip", "and [train] flip_rate"),
    "resolution": (_KD, ("bucket",), "max_area", "an area in pixels: 1024 -> 1048576"),
    "enable_bucket": (_K, ("bucket",), None, "the bucket stage always buckets"),
    "min_bucket_reso": (_K, ("bucket",), "min_side", ""),
    "max_bucket_reso": (_K, ("bucket",), "max_side", ""),
    "bucket_reso_steps": (_K, ("bucket",), "step", ""),
    "bucket_no_upscale": (_K, ("bucket",), "max_upscale", "max_upscale = 1"),
    "random_crop": (_K, ("bucket",), "crop", 'crop = "random"'),
    "center_crop": (_D, ("bucket",), "crop", 'crop = "center"'),
    "train_data_dir": (_KD, ("ingest",), "sources", 'with layout = "kohya" for <repeats>_<name> folders'),
    "instance_data_dir": (_D, ("ingest",), "sources", ""),
    "image_dir": (_K, ("ingest.sources",), "path", ""),
    "num_repeats": (_K, ("ingest", "ingest.sources"), "repeats", ""),
    "dataset_repeats": (_K, ("ingest", "ingest.sources"), "repeats", ""),
    "caption_extension": (_K, ("ingest", "ingest.sources"), "caption_ext", "kohya's default is .caption, ours .txt"),
    "caption_separator": (_K, ("ingest", "ingest.sources"), "tag_separator", ""),
    "output_dir": (_KD, _ANY_STAGE, "output", ""),
    "output_name": (_K, ("export",), "name", ""),
    "save_model_as": (_K, ("export",), "format", "kohya, peft, diffusers or single-file"),
    "save_precision": (_K, ("export",), "dtype", ""),
    "pretrained_model_name_or_path": (_KD, ("pipeline", "encode", "train", "export"), "model", ""),
}


def unknown_key(key: str, where: str, known: Any) -> str:
    """The one-line error for an unknown key in `where` ("[train]", "[ingest] sources[0]"): "did you mean" our
    name for a kohya or diffusers key, or the closest known key; else the known keys."""
    known = sorted(known)
    hint = _suggestion(key, _table_of(where), set(known))
    head = f"unknown key '{key}' in {where}"
    return f"{head}; {hint}" if hint else f"{head} (known: {', '.join(known)})"


def unknown_table(name: str, known: Any) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    if close:
        hint = f"did you mean [{close[0]}]?"
    elif name.endswith("_arguments"):  # the sections of a kohya config file (kohya_ss's saved TOML)
        hint = "a kohya config-file section: put its keys in the stage tables (each unknown one names ours)"
    elif name in ("general", "datasets"):  # kohya's dataset config (--dataset_config)
        hint = "a kohya dataset-config table: folders go in [[ingest.sources]] (path, repeats, layout = \"kohya\")"
    else:
        hint = f"known: {', '.join(known)}"
    return f"unknown table [{name}] ({hint})"


def _table_of(where: str) -> str:
    """The table a `where` names: "[train]" -> "train", "[ingest] sources[0]" -> "ingest.sources"."""
    found = re.match(r"\[([\w.]+)\](?:\s+(\w+)\[\d+\])?", where)
    if not found:
        return where
    return found[1] + (f".{found[2]}" if found[2] else "")


def _suggestion(key: str, table: str, known: set[str]) -> str | None:
    entry = FOREIGN_KEYS.get(key.lower().replace("-", "_"))
    if entry is not None:
        origin, tables, ours, note = entry
        if ours is None:
            return f"{origin} '{key}' has no counterpart here: {note}"
        if table in tables and ours in known:
            return f"did you mean '{ours}'? ({origin} name{'; ' + note if note else ''})"
        if table not in tables:
            return f"{origin} '{key}' is '{ours}' in [{tables[0]}]{f' ({note})' if note else ''}"
    close = difflib.get_close_matches(key, sorted(known), n=1)
    return f"did you mean '{close[0]}'?" if close else None


def resolve(cls: type, table: str, toml: dict, cli: dict[str, Any] | None = None) -> Any:
    """Build `cls` from CLI values (None = not given), the TOML data and the defaults."""
    own = dict(toml.get(table, {}))
    shared = toml.get("pipeline", {})
    known = {f.name for f in fields(cls)}
    for key in own:
        if key not in known:
            raise ConfigError(unknown_key(key, f"[{table}]", known))
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
            raise ConfigError(unknown_key(key, where, known))
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
    choices = meta.get("choices")
    for item in (value if isinstance(value, tuple) and choices else (value,)):
        if choices and item not in choices:
            close = difflib.get_close_matches(str(item), list(map(str, choices)), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            return f"{item!r} is not one of {', '.join(map(str, choices))}{hint}"
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
        exact = [a for a in inner if a in (str, Path) and isinstance(value, a)]  # `str | Path`: either as given
        return coerce(value, (exact or inner)[0], where)
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
    return _coerce_scalar(value, tp, where)


def _coerce_scalar(value: Any, tp: Any, where: str) -> Any:
    """`value` as the scalar type `tp` (bool, int, float, str, Path), or a one-line ConfigError."""
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
        if "\0" in value:  # no file name, model name or option holds one; the OS refuses it in a path
            raise ConfigError(f"{where}: {value!r} holds a NUL character (\\0), which no value may hold")
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"{where}: expected a path string, got {_kind(value)}")
        if value == "":  # Path("") is the current folder: never what an empty value meant
            raise ConfigError(f"{where}: expected a path, got an empty string")
        if "\0" in str(value):  # the OS cannot open it: `ValueError: embedded null byte` later
            raise ConfigError(f"{where}: {str(value)!r} holds a NUL character (\\0), which no path may hold")
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
