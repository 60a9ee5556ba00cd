from pathlib import Path

import pytest

from shared.core.config import load_toml, resolve
from shared.core.errors import ConfigError
from stages import bucket, ingest
from stages.cli import app
from stages.pipeline import TABLES


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "pipeline.toml"
    p.write_text(text)
    return p


def test_precedence_cli_over_toml_over_default(tmp_path):
    toml = load_toml(write(tmp_path, "[pipeline]\nworkdir = 'w'\n[bucket]\nmax_area = 786432\nseed = 3\n"), TABLES)
    cfg = resolve(bucket.Config, "bucket", toml, {"seed": 9})
    assert cfg.max_area == 786432          # TOML beats default
    assert cfg.seed == 9                   # CLI beats TOML
    assert cfg.max_side == 2048            # default
    assert cfg.workdir == Path("w")        # [pipeline] supplies shared keys
    assert cfg.in_dir == Path("w/ingest") and cfg.out_dir == Path("w/bucket")


def test_stage_table_beats_pipeline_table(tmp_path):
    toml = load_toml(write(tmp_path, "[pipeline]\nworkdir = 'a'\n[bucket]\nworkdir = 'b'\n"), TABLES)
    assert resolve(bucket.Config, "bucket", toml).workdir == Path("b")


@pytest.mark.parametrize("text, needle", [
    ("[bucket]\nmax_areaa = 1\n", "unknown key 'max_areaa' in [bucket]"),
    ("[bucket]\nmax_area = '1024'\n", "[bucket] max_area: expected an integer"),
    ("[bucket]\nmax_ratio = true\n", "[bucket] max_ratio: expected a number"),
    ("[bucket]\ncrop = 'left'\n", "[bucket] crop: 'left' is not one of center, random"),
    ("[bucket]\nbuckets = [[1000, 1024]]\n", "[1000, 1024] is not a pair of positive multiples of 64"),
    ("[bucket]\nbuckets = [[2048, 1024]]\n", "area 2097152 > max_area"),
    ("[bucket]\nstep = 32\n", "[bucket] step: 32 is outside [64, inf), a multiple of 64"),
    ("[bucket]\nstep = 96\n", "[bucket] step: 96 is not a multiple of 64"),
])
def test_bad_values_name_key_and_table(tmp_path, text, needle):
    toml = load_toml(write(tmp_path, text), TABLES)
    with pytest.raises(ConfigError) as e:
        resolve(bucket.Config, "bucket", toml)
    assert needle in str(e.value)


def test_unknown_table_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown table \[bukcet\]"):
        load_toml(write(tmp_path, "[bukcet]\nx = 1\n"), TABLES)
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_toml(write(tmp_path, "[bucket\n"), TABLES)
    with pytest.raises(ConfigError, match="config file not found"):
        load_toml(tmp_path / "nope.toml", TABLES)


def test_nested_source_tables(tmp_path):
    toml = load_toml(write(tmp_path, "[ingest]\nrepeats = 2\n[[ingest.sources]]\npath = 'a'\nrepeats = 5\n"
                                     "[[ingest.sources]]\npath = 'b'\n"), TABLES)
    cfg = resolve(ingest.Config, "ingest", toml)
    a, b = (cfg.effective(s) for s in cfg.sources)
    assert (a.repeats, b.repeats) == (5, 2)
    bad = load_toml(write(tmp_path, "[[ingest.sources]]\npath = 'a'\nrepeat = 5\n"), TABLES)
    with pytest.raises(ConfigError, match=r"unknown key 'repeat' in \[ingest\] sources\[0\]"):
        resolve(ingest.Config, "ingest", bad)


def test_plain_string_sources_and_cli_sources(tmp_path):
    toml = load_toml(write(tmp_path, "[ingest]\nsources = ['x', 'y']\n"), TABLES)
    assert [s.path for s in resolve(ingest.Config, "ingest", toml).sources] == [Path("x"), Path("y")]
    cfg = resolve(ingest.Config, "ingest", toml, {"sources": ("z",)})
    assert [s.path for s in cfg.sources] == [Path("z")]


def test_cli_config_errors_are_one_line_exit_2(tmp_path, runner):
    cfg = write(tmp_path, "[bucket]\nmax_areaa = 1\n")
    result = runner.invoke(app, ["bucket", "--config", str(cfg)])
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert result.stderr.strip().count("\n") == 0
    assert "unknown key 'max_areaa' in [bucket]" in result.stderr


def test_cli_flag_overrides_toml(tmp_path, runner):
    cfg = write(tmp_path, "[bucket]\nstep = 128\n")
    result = runner.invoke(app, ["bucket", "--config", str(cfg), "--step", "96"])
    assert result.exit_code == 2 and "[bucket] step: 96 is not a multiple of 64" in result.stderr


def test_every_option_has_help(runner):
    for cmd in ("ingest", "bucket", "run", "demo"):
        result = runner.invoke(app, [cmd, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0
    from dataclasses import fields
    for cls in (ingest.Config, ingest.Source, bucket.Config):
        for f in fields(cls):
            assert len(f.metadata.get("help", "")) > 10, f"{cls.__name__}.{f.name} lacks help"


def test_shipped_pipeline_toml_is_valid_and_documents_every_key():
    """Every field of every stage's config appears (set or commented) in that stage's own table."""
    import re
    from dataclasses import fields

    from stages.pipeline import STAGES

    root = Path(__file__).resolve().parents[1]
    text = (root / "pipeline.toml").read_text()
    toml = load_toml(root / "pipeline.toml", TABLES)
    sections = dict(re.findall(r"^\[+([\w.]+)\]+\n(.*?)(?=^\[|\Z)", text, flags=re.M | re.S))
    tables = [(table, module.Config) for table, module in STAGES] + [("ingest.sources", ingest.Source)]
    for table, cls in tables:
        if table != "ingest.sources":
            resolve(cls, table, toml)
        for f in fields(cls):
            documented = sections.get(table, "") if table != "ingest" else sections["ingest"]
            if table == "ingest.sources":  # the example sources table is commented out
                documented = text[text.index("# [[ingest.sources]]"):]
            if f.metadata.get("pipeline"):  # shared keys may be documented once, in [pipeline]
                documented += sections["pipeline"]
            assert re.search(rf"^#? ?{f.name} =", documented, flags=re.M), f"[{table}] {f.name} undocumented"


def test_unknown_pipeline_key(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'workdri' in \[pipeline\]"):
        load_toml(write(tmp_path, "[pipeline]\nworkdri = 'x'\n"), TABLES)


def test_validity_of_a_config_does_not_depend_on_what_was_imported(tmp_path):
    """No import-time registries: a fresh process that imports one stage only reads a full pipeline.toml the
    same way as the CLI, because the tables come from the one list of stages (stages/pipeline.py)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import sys; from stages import bucket; from shared.core.config import load_toml, resolve\n"
            "from stages.pipeline import TABLES\n"
            "toml = load_toml(sys.argv[1], TABLES); print(resolve(bucket.Config, 'bucket', toml).max_area)")
    done = subprocess.run([sys.executable, "-c", code, str(root / "pipeline.toml")], capture_output=True,
                          text=True, cwd=root)
    assert done.returncode == 0 and done.stdout.strip() == "1048576", done.stderr
    only = load_toml(write(tmp_path, "[pipeline]\nworkdir = 'w'\n[bucket]\nseed = 1\n"), {"bucket": bucket.Config})
    assert resolve(bucket.Config, "bucket", only).seed == 1
    with pytest.raises(ConfigError, match=r"unknown key 'model' in \[pipeline\]"):  # no stage here reads model
        load_toml(write(tmp_path, "[pipeline]\nmodel = 'x'\n"), {"bucket": bucket.Config})


# ---------------------------------------------------------------- issue 14: keys as kohya / diffusers users write them


@pytest.mark.parametrize("text, message", [
    ("[train]\nnetwork_dim = 32\n", "unknown key 'network_dim' in [train]; did you mean 'lora_rank'? (kohya's name)"),
    ("[train]\nnetwork_alpha = 16\n", "in [train]; did you mean 'lora_alpha'? (kohya's name)"),
    ("[train]\ntrain_batch_size = 4\n",
     "unknown key 'train_batch_size' in [train]; did you mean 'batch_size'? (kohya's and diffusers' name)"),
    ("[train]\nmax_train_steps = 9\n",
     "unknown key 'max_train_steps' in [train]; did you mean 'max_steps'? (kohya's and diffusers' name)"),
    ("[train]\nmax_train_epochs = 9\n", "did you mean 'epochs'? (kohya's name)"),
    ("[train]\ngradient_accumulation_steps = 2\n", "did you mean 'accumulate'?"),
    ("[train]\nlr_scheduler = 'cosine'\n", "did you mean 'lr_schedule'?"),
    ("[train]\nlr_warmup_steps = 10\n", "did you mean 'warmup_steps'?"),
    ("[train]\nsave_every_n_steps = 100\n", "did you mean 'checkpoint_every'? (kohya's name)"),
    ("[train]\ncaption_dropout_rate = 0.1\n", "did you mean 'caption_dropout'?"),
    ("[train]\nsnr_gamma = 5\n", "did you mean 'min_snr_gamma'? (diffusers' name)"),
    ("[train]\nv_parameterization = true\n",
     "did you mean 'prediction'? (kohya's name; prediction = \"v_prediction\")"),
    ("[train]\nzero_terminal_snr = true\n", "did you mean 'schedule'? (kohya's name; schedule = \"ztsnr\")"),
    ("[train]\npretrained_model_name_or_path = 'x'\n", "did you mean 'model'?"),
    ("[train]\noutput_dir = 'x'\n", "did you mean 'output'?"),
    ("[train]\noptimizer_type = 'AdamW8bit'\n", "did you mean 'optimizer'? (kohya's name; lower case"),
    ("[train]\nxformers = true\n", "kohya's 'xformers' has no counterpart here: attention is PyTorch's"),
    ("[train]\nresolution = 1024\n",
     "unknown key 'resolution' in [train]; kohya's and diffusers' 'resolution' is 'max_area' in [bucket] (an area in"),
    ("[train]\nshuffle_caption = true\n", "kohya's 'shuffle_caption' is 'caption_variants' in [encode]"),
    ("[encode]\ntrain_batch_size = 4\n", "'train_batch_size' is 'batch_size' in [train]"),  # not encode's batch_size
    ("[encode]\nclip_skip = 2\n", "kohya's 'clip_skip' has no counterpart here: both text encoders' penultimate"),
    ("[encode]\ncache_latents = true\n", "has no counterpart here: the encode stage always stores the latents"),
    ("[bucket]\nresolution = 1024\n", "did you mean 'max_area'? (kohya's and diffusers' name; an area in pixels"),
    ("[bucket]\nmin_bucket_reso = 256\n", "did you mean 'min_side'? (kohya's name)"),
    ("[bucket]\nenable_bucket = true\n", "has no counterpart here: the bucket stage always buckets"),
    ("[ingest]\ntrain_data_dir = 'img'\n", "did you mean 'sources'? (kohya's and diffusers' name; with layout"),
    ("[ingest]\ncaption_extension = '.caption'\n", "did you mean 'caption_ext'? (kohya's name; kohya's default"),
    ("[[ingest.sources]]\npath = 'a'\nnum_repeats = 5\n",
     "unknown key 'num_repeats' in [ingest] sources[0]; did you mean 'repeats'? (kohya's name)"),
    ("[[ingest.sources]]\nimage_dir = 'a'\n", "did you mean 'path'? (kohya's name)"),
    ("[export]\noutput_name = 'x'\n", "did you mean 'name'? (kohya's name)"),
    ("[export]\nsave_model_as = 'safetensors'\n", "did you mean 'format'?"),
    ("[train]\nlora_rnak = 4\n", "unknown key 'lora_rnak' in [train]; did you mean 'lora_rank'?"),   # a typo
    ("[bucket]\nzzz = 1\n", "unknown key 'zzz' in [bucket] (known: buckets, crop,"),                 # no idea
])
def test_unknown_keys_say_what_we_call_them(tmp_path, text, message):
    from stages.pipeline import STAGES

    toml = load_toml(write(tmp_path, text), TABLES)
    table = text.strip("[]\n").split("]")[0].split(".")[0]
    with pytest.raises(ConfigError) as e:
        resolve(dict(STAGES)[table].Config, table, toml)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_unknown_pipeline_key_and_tables_suggest_too(tmp_path):
    with pytest.raises(ConfigError, match=r"in \[pipeline\]; did you mean 'model'\? \(kohya's and diffusers' name\)"):
        load_toml(write(tmp_path, "[pipeline]\npretrained_model_name_or_path = 'x'\n"), TABLES)
    with pytest.raises(ConfigError, match=r"unknown table \[bukcet\] \(did you mean \[bucket\]\?\)"):
        load_toml(write(tmp_path, "[bukcet]\nx = 1\n"), TABLES)
    with pytest.raises(ConfigError, match=r"unknown table \[training_arguments\] \(a kohya config-file section"):
        load_toml(write(tmp_path, "[training_arguments]\nmax_train_steps = 1\n"), TABLES)
    with pytest.raises(ConfigError, match=r"unknown table \[datasets\] \(a kohya dataset-config table"):
        load_toml(write(tmp_path, "[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'a'\n"), TABLES)


def test_every_foreign_key_maps_to_a_real_key():
    """The mapping cannot go stale: each of our names exists in each table it names."""
    from dataclasses import fields

    from shared.core.config import FOREIGN_KEYS, pipeline_keys

    classes = {**TABLES, "ingest.sources": ingest.Source}
    known = {table: {f.name for f in fields(cls)} for table, cls in classes.items()}
    known["pipeline"] = pipeline_keys(TABLES)
    for name, (origin, tables, ours, note) in FOREIGN_KEYS.items():
        assert origin in ("kohya's", "diffusers'", "kohya's and diffusers'")
        assert ours is not None or note, name
        for table in tables:
            assert name not in known[table] or name == ours, f"{name} is a key of [{table}] itself"
            assert ours is None or ours in known[table], f"{name} -> [{table}] {ours}: no such key"


def test_kohya_key_on_the_command_line_is_one_line(tmp_path, runner):
    cfg = write(tmp_path, "[train]\nnetwork_dim = 8\n")
    result = runner.invoke(app, ["train", "--config", str(cfg)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.stderr == "error: unknown key 'network_dim' in [train]; did you mean 'lora_rank'? (kohya's name)\n"


def test_version_and_short_help(runner):
    """Issue 25: `sdxl --version`, and -h as --help for the app and every command."""
    from shared.core.artifacts import PACKAGE_VERSION

    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.output.strip() == f"sdxl-stages {PACKAGE_VERSION}"
    for args in (["-h"], ["train", "-h"], ["bench", "-h"], ["export", "-h"]):
        shown = runner.invoke(app, args)
        assert shown.exit_code == 0 and "Usage:" in shown.output, args


def test_kohya_and_diffusers_flag_names_work_on_the_command_line(runner, tmp_path, monkeypatch):
    """Issue 25: `--network-dim` is `--lora-rank` (the foreign names that mean exactly ours), shown beside ours."""
    from stages.train import planner

    seen = {}
    monkeypatch.setattr(planner, "print_plan", lambda cfg: seen.setdefault("cfg", cfg))
    done = runner.invoke(app, ["train", "--model", "builtin:tiny", "--plan", "--network-dim", "8",
                               "--train-batch-size", "3", "--gradient-accumulation-steps", "2",
                               "--output-dir", str(tmp_path / "t")])
    assert done.exit_code == 0, done.output
    cfg = seen["cfg"]
    assert (cfg.lora_rank, cfg.batch_size, cfg.accumulate, cfg.output) == (8, 3, 2, tmp_path / "t")
    assert "--lora-rank, --network-dim" in runner.invoke(app, ["train", "--help"]).output
