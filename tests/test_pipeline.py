"""`sdxl run` decisions, the artifact contract under crashes, and the demo."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shared.core import artifacts
from shared.core.errors import InputError
from stages.cli import app
from tests.conftest import make_dataset, noise_image, save

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path: Path, max_area: int = 256 * 256) -> Path:
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"[pipeline]\nworkdir = '{tmp_path / 'w'}'\nmodel = 'builtin:tiny'\n[ingest]\n"
                   f"sources = ['{tmp_path / 'src'}']\nworkers = 1\n[bucket]\nmax_area = {max_area}\n"
                   f"min_side = 64\nmax_side = 512\n"
                   f"[encode]\nworkers = 0\n[train]\nbatch_size = 1\nmax_steps = 2\neval_samples = 1\n")
    return cfg


def test_run_skips_unchanged_and_says_why_it_reruns(tmp_path, runner):
    make_dataset(tmp_path / "src", count=6)
    first = runner.invoke(app, ["run", "--config", str(write_config(tmp_path))])
    assert first.exit_code == 0, first.output
    assert "ingest: runs: no previous output" in first.output
    assert "bucket: runs: no previous output" in first.output
    assert "train: runs: no previous output" in first.output
    again = runner.invoke(app, ["run", "--config", str(write_config(tmp_path))])
    assert "ingest: unchanged, skipped" in again.output and "bucket: unchanged, skipped" in again.output
    assert "encode: unchanged, skipped" in again.output and "train: unchanged, skipped" in again.output
    changed = runner.invoke(app, ["run", "--config", str(write_config(tmp_path, 192 * 256))])
    assert "ingest: unchanged, skipped" in changed.output
    assert "bucket: runs: config changed: max_area 65536 -> 49152" in changed.output
    assert "encode: runs: input changed: bucket" in changed.output
    save(noise_image(300, 300, 50), tmp_path / "src" / "more.png")
    grown = runner.invoke(app, ["run", "--config", str(write_config(tmp_path, 192 * 256))])
    assert "ingest: runs: input changed" in grown.output and "bucket: runs: input changed: ingest" in grown.output


def test_run_needs_sources(tmp_path, runner):
    cfg = tmp_path / "p.toml"
    cfg.write_text("[bucket]\nseed = 1\n")
    result = runner.invoke(app, ["run", "--config", str(cfg)])
    assert result.exit_code == 2 and "needs [ingest] sources" in result.stderr


def _sdxl(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "SDXL_PROGRESS": "0", **(env or {})})


@pytest.mark.parametrize("stage, point", [("ingest", "ingest.item:5"), ("bucket", "bucket.item:5")])
def test_kill_mid_stage_leaves_nothing_finished_and_rerun_completes(tmp_path, stage, point):
    make_dataset(tmp_path / "src", count=12)
    ingest_args = ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--workers", "1"]
    reference_args = ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "ref"), "--workers", "1"]
    assert _sdxl(reference_args).returncode == 0
    assert _sdxl(["bucket", "--workdir", str(tmp_path / "ref")]).returncode == 0
    args = ingest_args if stage == "ingest" else ["bucket", "--workdir", str(tmp_path / "w")]
    if stage == "bucket":
        assert _sdxl(ingest_args).returncode == 0
    killed = _sdxl(args, {"SDXL_FAULT": point})
    assert killed.returncode == -9
    out = tmp_path / "w" / stage
    assert not out.exists() and artifacts.staging_dir(out).exists()
    assert not (artifacts.staging_dir(out) / "manifest.json").exists()
    with pytest.raises(InputError, match="did not finish"):
        artifacts.require_input(out, stage, [1], "rerun")
    rerun = _sdxl(args)
    assert rerun.returncode == 0 and "previous run did not finish" in rerun.stdout
    assert not artifacts.staging_dir(out).exists()
    main = "items.jsonl" if stage == "ingest" else "plan.jsonl"
    strip = lambda p: [{k: v for k, v in json.loads(l).items() if k != "source"} for l in p.read_text().splitlines()]
    assert strip(out / main) == strip(tmp_path / "ref" / stage / main)


def test_commit_replaces_old_output_atomically(tmp_path):
    out = tmp_path / "out"
    for n in (1, 2):
        staging = artifacts.fresh_staging(out)
        (staging / "data.txt").write_text(str(n))
        m = artifacts.Manifest("ingest", 1, "c", {}, {}, f"fp{n}", {"in": n})
        artifacts.commit(staging, out, m)
        assert (out / "data.txt").read_text() == str(n)
        assert artifacts.read_manifest(out).fingerprint == f"fp{n}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(InputError, match="format version 1, which this version"):
        artifacts.require_input(out, "ingest", [2], "sdxl ingest")


def test_new_train_settings_reuse_encode_output_untouched(tmp_path, runner):
    make_dataset(tmp_path / "src", count=6)
    cfg = write_config(tmp_path)
    assert runner.invoke(app, ["run", "--config", str(cfg)]).exit_code == 0
    encode_out = tmp_path / "w" / "encode"
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in encode_out.rglob("*") if p.is_file()}
    cfg.write_text(cfg.read_text() + "learning_rate = 0.0005\n")
    second = runner.invoke(app, ["run", "--config", str(cfg)])
    assert second.exit_code == 0, second.output
    assert "encode: unchanged, skipped" in second.output
    assert "train: runs: config changed: learning_rate 0.0001 -> 0.0005" in second.output
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in encode_out.rglob("*") if p.is_file()} == before


def test_demo_runs_and_is_idempotent(tmp_path, runner):
    args = ["demo", "--workdir", str(tmp_path / "demo"), "--images", "24", "--steps", "20"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "demo: 24 images accepted (48 files with captions)" in first.output
    line = next(x for x in first.output.splitlines() if x.startswith("demo: loss on the fixed evaluation set"))
    start, end = (float(v) for v in re.findall(r"(\d+\.\d+) at step", line))
    assert end < start, line
    again = runner.invoke(app, args)
    assert "ingest: unchanged, skipped" in again.output and "bucket: unchanged, skipped" in again.output


STAGE_MODULES = ("stages.ingest", "stages.bucket", "stages.encode", "stages.train", "stages.export")


@pytest.mark.parametrize("edited, changed", [
    ("shared/images.py", {"stages.ingest", "stages.encode"}),
    ("stages/bucket/geometry.py", {"stages.bucket"}),
    ("shared/models/lora.py", {"stages.train", "stages.export"}),
    ("shared/core/log.py", set(STAGE_MODULES)),
])
def test_code_version_follows_what_a_stage_imports(tmp_path, edited, changed):
    """Editing a helper changes the code version of exactly the stages that reach it through their imports."""
    import shutil

    for package in ("shared", "stages"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    before = {m: artifacts.code_version(m, tmp_path) for m in STAGE_MODULES}
    assert before == {m: artifacts.code_version(m) for m in STAGE_MODULES}  # the copy is the checkout
    with open(tmp_path / edited, "a", encoding="utf-8") as fh:
        fh.write("\n# an edit\n")
    after = {m: artifacts.code_version(m, tmp_path) for m in STAGE_MODULES}
    assert {m for m in STAGE_MODULES if after[m] != before[m]} == changed
