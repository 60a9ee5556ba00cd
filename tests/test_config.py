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
