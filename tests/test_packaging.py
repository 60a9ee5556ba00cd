"""The project as a user installs it: the wheel built from this checkout, installed (not editable) into a fresh
venv next to torch, with pip resolving every other dependency from pyproject.toml, runs `sdxl demo` from a folder
outside the checkout. This is what proves the declared requirements (and the package data: CLIP's BPE
vocabulary) are the ones the code needs; the dev venv, with its extras and leftovers, cannot.

It needs the package index (PyPI) for the dependencies; where that cannot be reached the test skips, saying so.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = "torch==2.13.0"  # first, as README and .ci/setup do: a bare `torch` resolved by pip is a multi-GB build
VOCAB = "shared/models/bpe_simple_vocab_16e6.txt.gz"
# not the project's source (top-level folders of a working checkout): left out of the copy the wheel is built from
NOT_SOURCE = {".git", ".venv", "build", "dist", ".pytest_cache", "work", "demo", "wheels", ".wheels"}


def run(cmd: list[str], cwd: Path, env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def clean_env(tmp: Path) -> dict:
    """The environment of a user's shell: nothing pointing at this checkout or the dev venv; a fresh cache."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env.update(SDXL_CACHE=str(tmp / "cache"), SDXL_PROGRESS="0", PIP_DISABLE_PIP_VERSION_CHECK="1")
    return env


def require_index(tmp: Path, env: dict) -> None:
    """Skip unless pip can reach its package index (the dependencies come from there)."""
    probe = run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--retries", "1",
                 "--timeout", "20", "-d", str(tmp / "probe"), "braceexpand==0.1.7"], tmp, env, 180)
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"the package index is unreachable, so the dependencies cannot be installed ({last[:160]})")


def check(result: subprocess.CompletedProcess, what: str) -> str:
    assert result.returncode == 0, f"{what} failed ({result.returncode}):\n{result.stdout[-3000:]}\n" \
                                   f"{result.stderr[-6000:]}"
    return result.stdout


def not_source(folder: str, names: list[str]) -> set[str]:
    top = NOT_SOURCE if Path(folder) == ROOT else set()
    return {n for n in names if n in top or n == "__pycache__" or n.endswith(".egg-info")}


def build_wheel(tmp: Path, env: dict) -> Path:
    """The wheel, built (as pip builds it, in an isolated build env) from a copy of the checkout, so no build/
    folder is left in, or reused from, the checkout."""
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=not_source)
    check(run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(src), "-w", str(tmp / "dist")],
              tmp, env, 600), "pip wheel")
    (wheel,) = (tmp / "dist").glob("sdxl_stages-*.whl")
    assert VOCAB in zipfile.ZipFile(wheel).namelist(), "the CLIP BPE vocabulary is missing from the wheel"
    return wheel


def make_venv(tmp: Path, wheel: Path, env: dict) -> Path:
    venv = tmp / "venv"
    check(run([sys.executable, "-m", "venv", str(venv)], tmp, env, 300), "python -m venv")
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile"]  # no .pyc: faster
    check(run(pip + [TORCH], tmp, env, 900), f"pip install {TORCH}")
    check(run(pip + [str(wheel)], tmp, env, 1200), "pip install of the wheel")
    return venv


@pytest.fixture
def tmp_path(tmp_path: Path) -> Iterator[Path]:
    """pytest's tmp_path, emptied afterwards: the venv holds a full torch (about 1 GB), and pytest keeps the
    last three runs' folders."""
    yield tmp_path
    shutil.rmtree(tmp_path, ignore_errors=True)


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_outside_the_checkout(tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    require_index(tmp_path, env)
    venv = make_venv(tmp_path, build_wheel(tmp_path, env), env)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = check(run([str(venv / "bin" / "python"), "-c", "import importlib.util, stages, shared; "
                       "print(stages.__file__); print(shared.__file__); print(importlib.util.find_spec('open_clip'))"],
                      outside, env, 120), "import")
    stages_file, shared_file, open_clip = where.split()
    site = next((venv / "lib").glob("python3*/site-packages")).resolve()
    for f in (stages_file, shared_file):
        assert Path(f).resolve().is_relative_to(site), f"{f} is not the installed copy (expected under {site})"
    assert open_clip == "None", "open-clip-torch came in with the project; the CLIP vocabulary ships with it"

    demo = run([str(venv / "bin" / "sdxl"), "demo", "--workdir", str(tmp_path / "demo"), "--images", "8",
                "--steps", "2"], outside, env, 900)
    out = check(demo, "sdxl demo")
    assert "demo: loss on the fixed evaluation set" in out
