"""Issue 17: a path the system refuses (a file where a folder is needed, permission denied, a read-only or full
disk, an unusable SDXL_CACHE) is one line `error: <path>: <what the OS said>` and exit 2; a bug keeps its
traceback."""
import errno
import os
from pathlib import Path

import pytest
import typer

from shared.core.command import stage_command
from shared.core.config import resolve
from shared.core.errors import os_error_line
from stages import bucket, ingest
from stages.cli import app
from tests.conftest import make_dataset

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0
needs_non_root = pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders: chmod proves nothing")


def one_line_error(result) -> str:
    """The error line of a refused command, after checking it is the only thing on stderr."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    line = result.stderr.strip()
    assert line.startswith("error: ") and "\n" not in line, result.stderr
    return line


@pytest.fixture
def blocker(tmp_path) -> Path:
    """A regular file that some test puts where a folder is needed; it must survive untouched."""
    path = tmp_path / "a-file"
    path.write_text("precious\n")
    yield path
    assert path.read_text() == "precious\n"


def test_out_under_a_regular_file(tmp_path, runner, blocker):
    make_dataset(tmp_path / "src", count=2)
    result = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(blocker / "out"), "--workers", "1"])
    assert str(blocker) in one_line_error(result)


def test_workdir_under_a_regular_file(tmp_path, runner, blocker):
    make_dataset(tmp_path / "src", count=2)
    result = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--workdir", str(blocker / "w"), "--workers", "1"])
    assert str(blocker) in one_line_error(result)


def test_run_command_with_a_workdir_under_a_file(tmp_path, runner, blocker):
    make_dataset(tmp_path / "src", count=2)
    cfg = tmp_path / "pipeline.toml"
    cfg.write_text(f"[pipeline]\nworkdir = '{blocker / 'w'}'\n[ingest]\nsources = ['{tmp_path / 'src'}']\n")
    result = runner.invoke(app, ["run", "--config", str(cfg)])
    assert str(blocker) in one_line_error(result)


@needs_non_root
def test_out_in_an_unwritable_folder(tmp_path, runner):
    make_dataset(tmp_path / "src", count=2)
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        result = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--out", str(locked / "o"), "--workers", "1"])
    finally:
        locked.chmod(0o700)
    line = one_line_error(result)
    assert str(locked) in line and "Permission denied" in line


def _bucketed(root: Path) -> Path:
    make_dataset(root / "src", count=3)
    work = root / "w"
    ingest.run(resolve(ingest.Config, "ingest", {}, {"sources": (str(root / "src"),), "workdir": work,
                                                    "workers": 1}))
    bucket.run(resolve(bucket.Config, "bucket", {}, {"workdir": work, "max_area": 128 * 128, "min_side": 64,
                                                    "max_side": 256, "max_upscale": 4.0}))
    return work


@pytest.mark.parametrize("where", ["the file", "under the file"])
def test_sdxl_cache_that_is_or_is_under_a_file(tmp_path, runner, blocker, monkeypatch, where):
    """The builtin model is materialised into SDXL_CACHE on first use: a file there is one line naming it."""
    work = _bucketed(tmp_path)
    cache = blocker if where == "the file" else blocker / "cache"
    monkeypatch.setenv("SDXL_CACHE", str(cache))
    result = runner.invoke(app, ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--workers", "0"])
    line = one_line_error(result)
    if where == "the file":
        assert line == f"error: SDXL_CACHE={blocker}: not a folder; point SDXL_CACHE at a writable folder"
    else:
        assert line.startswith(f"error: {blocker}: Not a directory (a file where a folder is needed)")
        assert line.endswith("; the model cache (SDXL_CACHE) must be a writable folder")


@needs_non_root
def test_sdxl_cache_unwritable(tmp_path, runner, monkeypatch):
    work = _bucketed(tmp_path)
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o500)
    monkeypatch.setenv("SDXL_CACHE", str(cache))
    try:
        result = runner.invoke(app, ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--workers", "0"])
    finally:
        cache.chmod(0o700)
    line = one_line_error(result)
    assert str(cache) in line and "Permission denied" in line and "SDXL_CACHE" in line


def test_sdxl_cache_refusing_writes(tmp_path, runner, monkeypatch):
    """What an unwritable SDXL_CACHE does to the cache fill, simulated (so it is checked as root too)."""
    from shared.models import loading as models

    work = _bucketed(tmp_path)
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "cache"))

    def refused(components, folder, replace=True):
        raise PermissionError(errno.EACCES, "Permission denied", str(folder) + ".staging-1")
    monkeypatch.setattr(models, "save_folder", refused)
    result = runner.invoke(app, ["encode", "--workdir", str(work), "--model", "builtin:tiny", "--workers", "0"])
    assert one_line_error(result) == (f"error: {tmp_path / 'cache'}/builtin-tiny-v{models.BUILTIN_VERSION}.staging-1: "
                                      f"Permission denied; the model cache (SDXL_CACHE) must be a writable folder")


def test_encode_with_a_missing_vae_names_the_vae_folder(tmp_path, runner):
    work = _bucketed(tmp_path)
    result = runner.invoke(app, ["encode", "--workdir", str(work), "--model", "builtin:tiny",
                                 "--vae", str(tmp_path / "nonexistent")])
    assert one_line_error(result).startswith(f"error: --vae {tmp_path / 'nonexistent'}: no such folder; expected a "
                                             f"diffusers AutoencoderKL folder")


def test_os_errors_without_a_path(tmp_path):
    assert os_error_line(OSError(errno.ENOSPC, "No space left on device")).startswith("no space left on device; ")
    assert os_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/x")) == "/mnt/x: Read-only file system"
    assert os_error_line(OSError("something else")) is None         # no path, no known cause: a bug
    assert os_error_line(OSError(errno.EEXIST, "File exists", str(tmp_path))) == f"{tmp_path}: File exists"
    (tmp_path / "f").write_text("")
    assert os_error_line(FileExistsError(errno.EEXIST, "File exists", str(tmp_path / "f"))) == \
        f"{tmp_path / 'f'}: File exists (and is not a folder)"


@pytest.mark.parametrize("error, expect_one_line", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), True),
    (OSError(errno.ENOSPC, "No space left on device"), True),
    (OSError("an OSError from a bug, with no path"), False),
    (ValueError("a bug"), False),
])
def test_a_bug_keeps_its_traceback(tmp_path, runner, error, expect_one_line):
    def failing_run(cfg, force=False):
        raise error

    one = typer.Typer()
    one.command()(stage_command(ingest.Config, "ingest", failing_run, "ingest that fails", {"ingest": ingest.Config}))
    result = runner.invoke(one, [str(tmp_path)])
    if expect_one_line:
        assert one_line_error(result) == f"error: {os_error_line(error)}"
    else:
        assert result.exit_code == 1 and result.exception is error
