"""Issue 23 item 3: the stage graph. Stages declare the formats they read and write; `sdxl run`'s order, the default
`--in`, the "run X first" hints and what a stage accepts as input follow from those declarations. A stage defined
here (nothing else in the repository changes) that reads the plan and writes it back with its captions upper-cased
runs between bucket and encode in `sdxl run`, and encode reads its output."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from shared.core import artifacts, graph
from shared.core.config import _ANY_STAGE, load_toml, opt
from shared.core.errors import ConfigError, InputError
from shared.core.stage import BuildResult, Stage, execute
from shared.formats import plan as plans
from shared.formats.items import ITEMS
from shared.formats.samples import SAMPLES
from shared.formats.shards import read_tar
from stages import cli, pipeline  # (a module, not its names: the plugin below imports this file from stages.cli)
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def caps_stage(name: str = "caps", reads: tuple = (plans.PLAN,), writes: tuple = (plans.PLAN,)) -> SimpleNamespace:
    """A stage module made here: reads a plan, writes it back with every caption upper-cased."""

    @dataclass(frozen=True)
    class Config:
        workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                            pipeline=True, fingerprint=False)
        input: Path | None = opt(None, "A folder holding a plan [default: from the stage graph].", flag="--in",
                                 fingerprint=False)
        output: Path | None = opt(None, f"Output folder [default: <workdir>/{name}].", flag="--out",
                                  fingerprint=False)

        def __post_init__(self) -> None:
            object.__setattr__(self, "input", self.input or graph.default_input(self.workdir, name))
            object.__setattr__(self, "output", self.output or self.workdir / name)

    def inputs(cfg: Config) -> dict:
        manifest = plans.require(cfg.input)
        return {"plan": {"path": str(cfg.input), "fingerprint": manifest.fingerprint, "what": "plan changed"}}

    def build(cfg: Config, staging: Path, found: dict) -> BuildResult:
        rows = plans.read_plan(cfg.input)
        with plans.PlanWriter(staging) as out:
            for row in rows:
                out.write(dataclasses.replace(row, caption=(row.caption or "").upper()))
        return BuildResult({"in": len(rows), "out": out.count, "dropped": {}})

    stage = Stage(name=name, version=1, module=__name__, out_dir=lambda cfg: cfg.output, inputs=inputs,
                  build=build, protected=lambda cfg: [("input folder", cfg.input)], reads=reads, writes=writes)
    return SimpleNamespace(Config=Config, STAGE=stage, run=lambda cfg, force=False: execute(stage, cfg, force),
                           __doc__=f"`sdxl {name}`: the plan with its captions upper-cased (a test stage).")


def write_config(tmp_path: Path) -> Path:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"[pipeline]\nworkdir = '{tmp_path / 'w'}'\nmodel = 'builtin:tiny'\n[ingest]\n"
                   f"sources = ['{tmp_path / 'src'}']\nworkers = 1\n[bucket]\nmax_area = {256 * 256}\n"
                   f"min_side = 64\nmax_side = 512\n[encode]\nworkers = 0\n"
                   f"[train]\nbatch_size = 1\nmax_steps = 2\neval_samples = 1\n")
    return cfg


def test_a_stage_between_bucket_and_encode_runs_in_sdxl_run(tmp_path, runner):
    make_dataset(tmp_path / "src", count=6)
    w = tmp_path / "w"
    with graph.STAGES.added(graph.node(caps_stage())):
        assert [n.name for n in graph.nodes(runs_only=True)] == ["ingest", "bucket", "caps", "encode", "train",
                                                                   "export"]
        assert graph.default_input(w, "caps") == w / "bucket" and graph.default_input(w, "encode") == w / "caps"
        result = runner.invoke(cli.app, ["run", "--config", str(write_config(tmp_path))])
        assert result.exit_code == 0, result.output
        assert "caps: runs: no previous output" in result.output and "export: done" in result.output
        caps = artifacts.read_manifest(w / "caps")
        encoded = artifacts.read_manifest(w / "encode")
        assert caps.holds == {"plan": plans.PLAN_VERSION} and encoded.holds == {"samples": SAMPLES.version}
        assert encoded.inputs["bucket"]["path"] == str(w / "caps")          # encode read the new stage's plan
        assert encoded.inputs["bucket"]["fingerprint"] == caps.fingerprint
        captions = [s["json"]["caption"] for tar in sorted((w / "encode" / "shards").rglob("*.tar"))
                    for s in read_tar(tar)]
        assert len(captions) == 6 and all(c == c.upper() and c.startswith("TAG") for c in captions), captions
        again = runner.invoke(cli.app, ["run", "--config", str(write_config(tmp_path))])
        assert "caps: unchanged, skipped" in again.output and "encode: unchanged, skipped" in again.output
    assert [n.name for n in graph.nodes(runs_only=True)] == ["ingest", "bucket", "encode", "train", "export"]


def test_a_plugin_stage_enters_through_sdxl_plugins(tmp_path):
    """The plugin route: a module named in SDXL_PLUGINS registers the stage; `sdxl --help` lists it and its
    --help names the default input the graph gives it."""
    (tmp_path / "caps_plugin.py").write_text(textwrap.dedent("""
        from shared.core import graph
        from tests.test_stage_graph import caps_stage

        graph.STAGES.add(graph.node(caps_stage()))
    """))
    env = {**os.environ, "SDXL_PROGRESS": "0", "SDXL_PLUGINS": "caps_plugin",
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    code = ("from stages.cli import app; from shared.core import graph; from pathlib import Path\n"
            "print([n.name for n in graph.order()], graph.default_input(Path('w'), 'encode'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("] ")[0] + "]" == str(["ingest", "bucket", "caps", "encode", "train", "export",
                                                     "generate"])
    assert done.stdout.strip().endswith(str(Path("w") / "caps"))
    listed = subprocess.run([sys.executable, "-m", "stages.cli", "--help"], capture_output=True, text=True,
                            cwd=ROOT, env=env)
    assert listed.returncode == 0 and "caps" in listed.stdout and "upper-cased" in listed.stdout


def _ingest_and_bucket(tmp_path: Path, runner) -> Path:
    make_dataset(tmp_path / "src", count=6)
    w = tmp_path / "w"
    assert runner.invoke(cli.app, ["ingest", str(tmp_path / "src"), "--workdir", str(w), "--workers", "1",
                               "--min-side", "64"]).exit_code == 0
    assert runner.invoke(cli.app, ["bucket", "--workdir", str(w), "--max-area", str(256 * 256), "--min-side", "64",
                               "--max-side", "512"]).exit_code == 0
    return w


def test_an_input_is_accepted_by_its_format_not_its_folder_or_producer_name(tmp_path, runner):
    w = _ingest_and_bucket(tmp_path, runner)
    (w / "ingest").rename(w / "my items")
    result = runner.invoke(cli.app, ["bucket", "--in", str(w / "my items"), "--out", str(w / "planned"),
                                 "--max-area", str(256 * 256), "--min-side", "64", "--max-side", "512"])
    assert result.exit_code == 0, result.output
    assert (w / "planned" / "plan.jsonl").read_bytes() == (w / "bucket" / "plan.jsonl").read_bytes()
    assert len(plans.read_plan(w / "planned")) == 6
    # a plan written by a stage of another name is a plan
    with graph.STAGES.added(graph.node(caps_stage("shout"))):
        stage = graph.STAGES["shout"]
        stage.run(stage.Config(workdir=w, input=w / "planned"))
        assert plans.require(w / "shout").stage == "shout"
        assert {r.caption for r in plans.read_plan(w / "shout")} == {r.caption.upper() for r in
                                                                     plans.read_plan(w / "planned")}
    # an output written before manifests recorded their formats: read as the formats its stage makes
    manifest = json.loads((w / "planned" / "manifest.json").read_text())
    assert manifest.pop("holds") == {"plan": plans.PLAN_VERSION}
    (w / "planned" / "manifest.json").write_text(json.dumps(manifest))
    assert artifacts.read_manifest(w / "planned").held() == {"plan": plans.PLAN_VERSION}
    assert len(plans.read_plan(w / "planned")) == 6
    with pytest.raises(InputError, match="expected `ingest` output"):
        artifacts.require_input(w / "planned", ITEMS)


def test_an_input_of_the_wrong_format_is_refused_in_one_line_naming_what_to_run(tmp_path, runner):
    w = _ingest_and_bucket(tmp_path, runner)
    result = runner.invoke(cli.app, ["encode", "--model", "builtin:tiny", "--in", str(w / "ingest"),
                                 "--out", str(tmp_path / "e")])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert "holds `ingest` output, expected `bucket` output (format plan; it holds items v1)" in result.stderr
    assert "give --in a folder that `sdxl bucket` wrote" in result.stderr
    with graph.STAGES.added(graph.node(caps_stage())):
        with pytest.raises(InputError) as e:
            plans.require(w / "ingest")
        assert "expected `bucket` or `caps` output" in str(e.value) and "`sdxl bucket` or `sdxl caps`" in str(e.value)
        result = runner.invoke(cli.build_app(), ["encode", "--model", "builtin:tiny", "--workdir", str(w)])
        assert result.exit_code == 2 and result.stderr.count("\n") == 1
        assert f"{w / 'caps'}: no `bucket` or `caps` output found; run: sdxl caps --out {w / 'caps'}" \
            in result.stderr  # encode's default input is now the new stage's output, which is not there yet
    result = runner.invoke(cli.app, ["bucket", "--workdir", str(tmp_path / "none")])
    assert "run: sdxl ingest SOURCE... --out" in result.stderr


def test_cli_pipeline_and_toml_list_the_stages_from_one_place(tmp_path):
    toml = tmp_path / "p.toml"
    toml.write_text("[caps]\nworkdir = 'w'\n")
    builtin = ["ingest", "bucket", "encode", "train", "export", "generate"]
    assert list(graph.NAMES) == builtin == list(_ANY_STAGE) == list(pipeline.TABLES)
    assert [t for t, _ in pipeline.STAGES] + [t for t, _ in pipeline.OPTIONAL] == builtin
    with pytest.raises(ConfigError, match=r"unknown table \[caps\]"):
        load_toml(toml, pipeline.TABLES)
    with graph.STAGES.added(graph.node(caps_stage())):
        names = [c.name for c in cli.build_app().registered_commands]
        assert "caps" in names and names.index("bucket") < names.index("caps") < names.index("encode")
        assert "caps" in _ANY_STAGE and "caps" in pipeline.TABLES and "caps" in dict(pipeline.STAGES)
        assert load_toml(toml, pipeline.TABLES) == {"caps": {"workdir": "w"}}
    assert "caps" not in pipeline.TABLES and "caps" not in [c.name for c in cli.build_app().registered_commands]


def test_stages_that_read_each_others_output_are_refused():
    looped = caps_stage("looped", reads=(SAMPLES,), writes=(plans.PLAN,))  # a second plan maker after encode
    with graph.STAGES.added(graph.node(looped)):
        with pytest.raises(ConfigError, match="a cycle"):
            graph.order()
