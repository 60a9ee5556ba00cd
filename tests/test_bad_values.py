"""Issue 17: every bad value is refused when the config is made, in one line naming table, key, value and the
valid range, from pipeline.toml and from the command line alike (exit 2, no traceback, nothing written)."""
import typing
from dataclasses import fields

import pytest

from shared.core.config import resolve
from shared.core.errors import ConfigError
from stages import bucket, encode, export, ingest, train
from stages.cli import app

CONFIGS = {"ingest": ingest.Config, "bucket": bucket.Config, "encode": encode.Config, "train": train.Config,
           "export": export.Config}
#: what each stage needs besides the value under test
BASE = {"ingest": {"sources": ["src"]}, "bucket": {}, "encode": {"model": "builtin:tiny"},
        "train": {"model": "builtin:tiny"}, "export": {}}
NAN, INF = float("nan"), float("inf")

CASES = [
    # the list: silently wrong training today
    ("train", "max_grad_norm", -1.0, "max_grad_norm: -1.0 is outside [0, inf)"),
    ("train", "min_snr_gamma", -1.0, "min_snr_gamma: -1.0 is outside [0, inf)"),
    ("ingest", "tag_weight_power", NAN, "tag_weight_power: nan is not a finite number; valid: [0, inf)"),
    ("bucket", "max_ratio", NAN, "max_ratio: nan is not a finite number; valid: [1, inf)"),
    ("bucket", "max_upscale", NAN, "max_upscale: nan is not a finite number; valid: [1, inf)"),
    # the list: tracebacks today
    ("train", "learning_rate", NAN, "learning_rate: nan is not a finite number; valid: (0, inf)"),
    ("train", "adam_beta1", 1.5, "adam_beta1: 1.5 is outside [0, 1)"),
    ("train", "weight_decay", -1.0, "weight_decay: -1.0 is outside [0, inf)"),
    ("ingest", "tag_separator", "", "tag_separator: must not be empty"),
    ("encode", "zarr_level", 99, "zarr_level: 99 is outside [0, 22]"),
    ("export", "merge_scale", NAN, "merge_scale: nan is not a finite number"),
    # the list: five NaN steps first today
    ("train", "learning_rate", INF, "learning_rate: inf is not a finite number; valid: (0, inf)"),
    ("train", "noise_offset", NAN, "noise_offset: nan is not a finite number; valid: [0, inf)"),
    ("train", "lora_alpha", NAN, "lora_alpha: nan is not a finite number; valid: (0, inf)"),
    ("train", "adam_eps", 0.0, "adam_eps: 0.0 is outside (0, inf)"),
    # probabilities, betas, decays
    ("train", "caption_dropout", 1.5, "caption_dropout: 1.5 is outside [0, 1]"),
    ("train", "flip_rate", -0.1, "flip_rate: -0.1 is outside [0, 1]"),
    ("train", "flip_rate", NAN, "flip_rate: nan is not a finite number; valid: [0, 1]"),
    ("train", "adam_beta2", 1.0, "adam_beta2: 1.0 is outside [0, 1)"),
    ("train", "ema_decay", 1.0, "ema_decay: 1.0 is outside [0, 1)"),
    ("train", "lora_dropout", 1.0, "lora_dropout: 1.0 is outside [0, 1)"),
    ("train", "logit_mean", -INF, "logit_mean: -inf is not a finite number"),
    ("train", "logit_std", 0.0, "logit_std: 0.0 is outside (0, inf)"),
    ("train", "flow_shift", -2.0, "flow_shift: -2.0 is outside (0, inf)"),
    # counts, sizes and seeds
    ("train", "lora_rank", 0, "lora_rank: 0 is outside [1, inf)"),
    ("train", "batch_size", 0, "batch_size: 0 is outside [1, inf)"),
    ("train", "max_steps", -1, "max_steps: -1 is outside [0, inf)"),
    ("train", "seed", -1, "seed: -1 is outside [0, 2**63)"),
    ("train", "seed", 2 ** 63, "seed: 9223372036854775808 is outside [0, 2**63)"),
    ("train", "wandb_project", "", "wandb_project: must not be empty"),
    ("ingest", "workers", -1, "workers: -1 is outside [0, inf)"),
    ("ingest", "min_side", 0, "min_side: 0 is outside [1, inf)"),
    ("ingest", "tag_weight_min", 0.0, "tag_weight_min: 0.0 is outside (0, 1]"),
    ("ingest", "tag_weight_max", 0.5, "tag_weight_max: 0.5 is outside [1, inf)"),
    ("ingest", "caption_ext", "", "caption_ext: must not be empty"),
    ("ingest", "sources", [{"path": "src", "repeats": 0}], "sources[0] repeats: 0 is outside [1, 10000]"),
    ("ingest", "sources", [{"path": "src", "tag_separator": ""}], "sources[0] tag_separator: must not be empty"),
    ("ingest", "sources", [""], "sources[0] path: expected a path, got an empty string"),
    ("ingest", "output", "", "output: expected a path, got an empty string"),
    ("bucket", "step", 96, "step: 96 is not a multiple of 64"),
    ("bucket", "min_side", 32, "min_side: 32 is outside [64, inf), a multiple of 64"),
    ("bucket", "max_area", 1000, "max_area: 1000 is outside [4096, inf)"),
    ("bucket", "seed", -5, "seed: -5 is outside [0, 2**63)"),
    ("encode", "zarr_level", 10, "zarr_level: 10 is outside [0, 9], the levels of lz4"),
    ("encode", "zarr_level", -1, "zarr_level: -1 is outside [0, 22]"),
    ("encode", "workers", -1, "workers: -1 is outside [0, inf)"),
    ("encode", "caption_variants", -1, "caption_variants: -1 is outside [0, inf)"),
    ("encode", "tag_join", "", "tag_join: must not be empty"),
    ("encode", "vae", "", "vae: must not be empty"),
    ("export", "tolerance", 0.0, "tolerance: 0.0 is outside (0, inf)"),
    ("export", "merge_scale", -INF, "merge_scale: -inf is not a finite number"),
]


@pytest.mark.parametrize("stage, key, value, message", CASES, ids=[f"{c[0]}.{c[1]}={c[2]!r}" for c in CASES])
def test_bad_value_is_refused_in_one_line(stage, key, value, message):
    table = {**BASE[stage], key: value}
    with pytest.raises(ConfigError) as refused:
        resolve(CONFIGS[stage], stage, {stage: table})
    text = str(refused.value)
    assert text.startswith(f"[{stage}] "), text
    assert message in text, text
    assert "\n" not in text


ACCEPTED = [  # the edges of the ranges are valid values: the ranges are not tighter than they say
    ("train", {"max_grad_norm": 0.0, "min_snr_gamma": 0.0, "adam_beta1": 0.0, "caption_dropout": 1.0,
               "flip_rate": 0.0, "seed": 2 ** 63 - 1, "max_steps": 0, "ema_decay": 0.0, "logit_mean": -3.0}),
    ("ingest", {"tag_weight_power": 0.0, "tag_weight_min": 1.0, "tag_weight_max": 1.0, "workers": 0}),
    ("bucket", {"max_ratio": 1.0, "max_upscale": 1.0, "min_side": 64, "max_side": 64, "step": 128}),
    ("encode", {"zarr_level": 9, "caption_variants": 0, "keep_tags": 0}),
    ("encode", {"zarr_compression": "zstd", "zarr_level": 22}),
    ("export", {"merge_scale": -1.0}),
]


@pytest.mark.parametrize("stage, values", ACCEPTED)
def test_values_at_the_edges_are_accepted(stage, values):
    cfg = resolve(CONFIGS[stage], stage, {stage: {**BASE[stage], **values}})
    assert all(getattr(cfg, k) == v for k, v in values.items())


#: float fields whose every finite value is meaningful
UNBOUNDED = {("train", "logit_mean"), ("export", "merge_scale")}


def _numeric_fields():
    """(stage, class, field, its number type) for every int and float field, ingest's Source included."""
    for stage, cls in [*CONFIGS.items(), ("ingest", ingest.Source)]:
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            kinds = set(typing.get_args(hints[f.name])) or {hints[f.name]}
            for kind in kinds & {int, float}:
                yield stage, cls, f, kind


def _resolve_with(stage, cls, key, value):
    if cls is ingest.Source:
        return resolve(ingest.Config, "ingest", {"ingest": {"sources": [{"path": "src", key: value}]}})
    return resolve(cls, stage, {stage: {**BASE[stage], key: value}})


def test_every_numeric_option_states_its_valid_range(runner):
    """Every int and float field of every stage has a declared range (floats at least: finite), and --help
    shows it."""
    for stage, cls, f, _ in _numeric_fields():
        if (stage, f.name) not in UNBOUNDED:
            assert f.metadata.get("range") is not None, f"{cls.__qualname__}.{f.name} has no range"
    shown = " ".join(runner.invoke(app, ["train", "--help"]).output.split())
    assert "AdamW β1. Range: [0, 1). [default: 0.9]" in shown
    assert "0 = no clipping. Range: [0, inf)." in shown
    shown = " ".join(runner.invoke(app, ["export", "--help"]).output.split())
    assert "Range: any finite number." in shown
    shown = " ".join(runner.invoke(app, ["bucket", "--help"]).output.split())
    assert "Range: [64, inf), a multiple of 64. [default: 64]" in shown


def test_nan_and_inf_are_refused_for_every_float_field():
    floats = [(stage, cls, f) for stage, cls, f, kind in _numeric_fields() if kind is float]
    assert len(floats) > 20
    for stage, cls, f in floats:
        for bad in (NAN, INF, -INF):
            with pytest.raises(ConfigError, match=f"{f.name}: {bad!r} is not a finite number"):
                _resolve_with(stage, cls, f.name, bad)


def test_every_bounded_field_refuses_a_value_just_outside():
    """From each declared range, a value just below its lower bound (or at an excluded one) is refused."""
    checked = 0
    for stage, cls, f, kind in _numeric_fields():
        valid = f.metadata.get("range")
        if valid is None or valid.low is None:
            continue
        below = valid.low if not valid.low_inclusive else valid.low - (1 if kind is int else 1e-6)
        with pytest.raises(ConfigError, match=f"{f.name}: .* is outside"):
            _resolve_with(stage, cls, f.name, kind(below))
        checked += 1
    assert checked > 40


CLI = [
    (["train", "--model", "builtin:tiny", "--adam-beta1", "1.5"], "[train] adam_beta1: 1.5 is outside [0, 1)"),
    (["train", "--model", "builtin:tiny", "--max-grad-norm", "-1"], "[train] max_grad_norm: -1.0 is outside [0, inf)"),
    (["train", "--model", "builtin:tiny", "--learning-rate", "inf"], "[train] learning_rate: inf is not a finite"),
    (["ingest", "src", "--tag-separator", ""], "[ingest] tag_separator: must not be empty"),
    (["bucket", "--max-ratio", "nan"], "[bucket] max_ratio: nan is not a finite number"),
    (["encode", "--model", "builtin:tiny", "--zarr-level", "99"], "[encode] zarr_level: 99 is outside [0, 22]"),
    (["export", "--merge-scale", "nan"], "[export] merge_scale: nan is not a finite number"),
]


@pytest.mark.parametrize("args, message", CLI, ids=[" ".join(a[:1] + a[-2:]) for a, _ in CLI])
def test_bad_flag_is_one_line_exit_2_and_nothing_written(args, message, runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("error: ") and result.stderr.strip().count("\n") == 0, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []
