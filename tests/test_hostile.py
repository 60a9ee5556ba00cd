"""Hostile conditions (issue 24, round two): kill -9 at every step of a commit, symlinked output folders, a full
disk, NUL bytes and byte-order marks in pipeline.toml, FIFOs and device links among the sources, absurd kohya
repeats, a caption shared by two images, workers outliving a killed stage, file modes and byte-identical
exports. Each ends in one line naming the path (exit 2) or in a safe recovery."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.core import artifacts
from shared.core.errors import ConfigError
from stages.cli import app
from tests.conftest import caption, make_dataset, noise_image, save
from tests.test_os_errors import one_line_error

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- 1. killed in the commit window

#: every fault point of a commit, in the order they are reached (remove.partial: inside the removal of the old
#: output, after its first entry)
COMMIT_POINTS = ("commit.recorded", "commit.manifest", "commit.job_removed", "commit.trash_cleared",
                 "commit.old_moved", "commit.renamed", "remove.partial")


def _forked(call, env: dict) -> tuple[int, str]:
    """Run `call()` in a forked child (the driver's imports are reused, so each run costs a fraction of a
    second); (exit code, or minus the signal that ended it; what it printed)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into the driver
        code = 0
        try:
            os.close(read)
            os.dup2(write, 1)
            os.dup2(write, 2)
            os.environ.update(env)
            call()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - reported to the driver as exit 99 with its traceback
            import traceback
            traceback.print_exc()
            code = 99
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "r", errors="replace") as fh:
        printed = fh.read()
    _, status = os.waitpid(pid, 0)
    return (-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)), printed


def _listing(work: Path) -> list[str]:
    return sorted(p.name for p in work.iterdir() if not p.name.startswith("."))


def _ingest_driver(tmp: str) -> list[dict]:
    """Ingest a small source; then for each commit point: a run with a changed config killed there, a rerun
    killed while it removes what the kill left (when there is anything to remove), and a plain rerun; what each
    left. The config alternates, so every killed run has an older output to replace."""
    from stages.cli import app as cli

    tmp_path = Path(tmp)
    make_dataset(tmp_path / "src", count=4)
    work = tmp_path / "w"
    args = ["ingest", str(tmp_path / "src"), "--workdir", str(work), "--workers", "1"]
    run = lambda flag, env=None: _forked(lambda: cli([*args, flag], prog_name="sdxl"),  # noqa: E731
                                         {"SDXL_PROGRESS": "0", **(env or {})})
    code, printed = run("--lowercase-tags")
    reference = (work / "ingest" / "items.jsonl").read_text()
    report = [{"point": "first run", "code": code, "printed": printed}]
    for number, point in enumerate(COMMIT_POINTS):
        flag = "--no-lowercase-tags" if number % 2 == 0 else "--lowercase-tags"  # the tags are lower case anyway
        killed, said = run(flag, {"SDXL_FAULT": f"{point}:1"})
        left = _listing(work)
        again, again_said = run(flag, {"SDXL_FAULT": "remove.partial:1"})
        left_again = _listing(work)
        final, final_said = run(flag)
        out = work / "ingest"
        manifest = artifacts.read_manifest(out)
        report.append({"point": point, "code": killed, "printed": said, "left": left,
                       "second": again, "second_printed": again_said, "left_again": left_again,
                       "final": final, "final_printed": final_said, "after": _listing(work),
                       "config": manifest.config["lowercase_tags"] if manifest else None,
                       "wanted": flag == "--lowercase-tags",
                       "same_items": (out / "items.jsonl").is_file() and (out / "items.jsonl").read_text() == reference,
                       "job_in_output": (out / artifacts.JOB).exists()})
    return report


def _driver(name: str, tmp_path: Path) -> list[dict]:
    """Run `name` (a driver function of this module) in a fresh interpreter, which forks its runs."""
    code = f"import json, sys; from tests import test_hostile as t; print(json.dumps(t.{name}({str(tmp_path)!r})))"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_ingest_killed_at_every_step_of_commit_reruns_and_completes(tmp_path):
    report = _driver("_ingest_driver", tmp_path)
    assert report[0]["code"] == 0, report[0]["printed"]
    for step in report[1:]:
        point = step["point"]
        assert step["code"] == -signal.SIGKILL, (point, step["printed"])
        assert "Traceback" not in step["second_printed"] + step["final_printed"], (point, step)
        assert "is not an unfinished" not in step["second_printed"] + step["final_printed"], (point, step)
        assert step["second"] in (0, -signal.SIGKILL), (point, step["second_printed"])
        assert step["final"] == 0, (point, step["final_printed"])
        assert step["after"] == ["ingest"], (point, step["after"])  # no staging, no .replaced left
        assert step["config"] == step["wanted"], point  # the output is the killed run's config's
        assert step["same_items"] and not step["job_in_output"], point
    by_point = {s["point"]: s for s in report[1:]}
    assert by_point["commit.recorded"]["left"] == ["ingest", "ingest.staging"]
    assert by_point["commit.old_moved"]["left"] == ["ingest.replaced", "ingest.staging"]
    assert by_point["commit.renamed"]["left"] == ["ingest", "ingest.replaced"]
    # killed before its manifest was written: the rerun builds again (and clears the leftover staging folder)
    assert "ingest: runs: config changed" in by_point["commit.recorded"]["second_printed"]
    # killed after: the rerun completes the commit (here killed again as it removes the old output, after the
    # rename; killed after the rename, it has only that left to do), the next removes what is left of the old
    # output and finds the new one up to date
    for point in (*COMMIT_POINTS[1:4], "commit.renamed", "remove.partial"):
        assert by_point[point]["second"] == -signal.SIGKILL, point
        assert by_point[point]["left_again"] == ["ingest", "ingest.replaced"], point
        assert "ingest: removed ingest.replaced, left by an interrupted run\ningest: unchanged, skipped" in \
            by_point[point]["final_printed"], point
    # killed with the old output moved aside: the rerun (killed again as it removes the old output first) ...
    assert by_point["commit.old_moved"]["left_again"] == ["ingest.replaced", "ingest.staging"]
    assert "ingest: finished the commit of an interrupted run (ingest.staging -> ingest)\ningest: unchanged" in \
        by_point["commit.old_moved"]["final_printed"]


def _toy_stage(out: Path):
    """A resumable stage (train's shape: its build resumes in what its staging folder holds) and a config
    maker."""
    from dataclasses import dataclass

    from shared.core.config import opt
    from shared.core.stage import BuildResult, Stage

    @dataclass(frozen=True)
    class Config:
        steps: int = opt(3, "steps")
        output: Path = opt(out, "out", fingerprint=False)

    def build(cfg, staging: Path, inputs: dict) -> BuildResult:
        log = staging / "log.txt"
        before = log.read_text() if log.exists() else ""
        log.write_text(before + ("resumed\n" if before else "built\n"))
        (staging / "weights.bin").write_bytes(b"w" * cfg.steps)
        return BuildResult({"in": 1, "out": 1})

    stage = Stage(name="toy", version=1, module="shared.core.stage", out_dir=lambda cfg: cfg.output,
                  inputs=lambda cfg: {}, build=build, resumable=True)
    return stage, Config


def _resumable_driver(tmp: str) -> list[dict]:
    """A resumable stage (as train): a run with a changed config killed at each commit point, then rerun."""
    from shared.core.command import user_errors
    from shared.core.stage import execute

    out = Path(tmp) / "toy"
    stage, Config = _toy_stage(out)

    def run(steps: int):
        with user_errors():
            execute(stage, Config(steps=steps))

    report = [{"point": "first run", "code": _forked(lambda: run(1), {})[0]}]
    for number, point in enumerate(COMMIT_POINTS, 2):
        killed, said = _forked(lambda: run(number), {"SDXL_FAULT": f"{point}:1"})
        final, final_said = _forked(lambda: run(number), {})
        report.append({"point": point, "code": killed, "printed": said, "final": final, "final_printed": final_said,
                       "after": _listing(Path(tmp)), "log": (out / "log.txt").read_text() if out.exists() else "",
                       "steps": len((out / "weights.bin").read_bytes()), "wanted": number})
    return report


def test_a_resumable_stage_killed_at_every_step_of_commit_resumes(tmp_path):
    """What train (and export's hint `rerun sdxl train`) meet after such a kill: the staging folder is resumed,
    or its commit completed, instead of being refused as not an unfinished output."""
    report = _driver("_resumable_driver", tmp_path)
    assert report[0]["code"] == 0
    for step in report[1:]:
        point = step["point"]
        assert step["code"] == -signal.SIGKILL, (point, step["printed"])
        assert step["final"] == 0 and "error" not in step["final_printed"], (point, step["final_printed"])
        assert step["after"] == ["toy"] and step["steps"] == step["wanted"], (point, step)
        if point == "commit.recorded":  # no manifest yet: the build resumes in the staging folder it left
            assert "toy: runs: config changed: steps 1 -> 2" in step["final_printed"]
            assert step["log"] == "built\nresumed\n", step["log"]
        else:  # the manifest was written: the rerun completes the commit
            assert "toy: unchanged, skipped" in step["final_printed"], (point, step["final_printed"])
            if point in COMMIT_POINTS[1:5]:
                assert "toy: finished the commit of an interrupted run (toy.staging -> toy)" in step["final_printed"]
            assert step["log"] == "built\n", (point, step["log"])


def test_a_staging_folder_named_by_its_manifest_only_is_ours(tmp_path):
    from shared.core import outputs

    out = tmp_path / "ingest"
    staging = artifacts.staging_dir(out)
    staging.mkdir()
    (staging / "items.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError, match="is not an unfinished `ingest` output"):
        outputs.check_target(out, "ingest")  # no job.json, no manifest: someone else's
    (staging / "manifest.json").write_text(json.dumps({"stage": "bucket"}))
    with pytest.raises(ConfigError, match="is not an unfinished `ingest` output"):
        outputs.check_target(out, "ingest")  # another stage's
    (staging / "manifest.json").write_text(json.dumps({"stage": "ingest"}))
    outputs.check_target(out, "ingest")  # a commit killed after writing its manifest


# ---------------------------------------------------------------- 2. symlinked output folders


@pytest.mark.parametrize("linked", ["ingest", "ingest.staging", "ingest.replaced"])
def test_symlinked_output_folders_are_refused_before_anything_is_written(tmp_path, runner, linked):
    make_dataset(tmp_path / "src", count=2)
    work = tmp_path / "w"
    elsewhere = tmp_path / "elsewhere"
    args = ["ingest", str(tmp_path / "src"), "--workdir", str(work), "--workers", "1"]
    assert runner.invoke(app, [*args[:2], "--workdir", str(elsewhere), "--workers", "1"]).exit_code == 0
    target = elsewhere / "ingest"  # a real ingest output, reached through the link
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    work.mkdir()
    (work / linked).symlink_to(target, target_is_directory=True)
    for extra in ([], ["--force"]):
        line = one_line_error(runner.invoke(app, [*args, *extra]))
        assert f"{work / linked} is a symbolic link (to {target})" in line, line
        assert (work / linked).is_symlink() and _listing(work) == [linked]  # nothing renamed, nothing written
        assert {p.name: p.read_bytes() for p in target.iterdir()} == before


# ---------------------------------------------------------------- 3. a full disk


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_a_full_disk_is_one_line_naming_the_output_folder_and_its_free_space(tmp_path, runner, monkeypatch, kind):
    import stages.ingest as ingest
    from safetensors import SafetensorError

    make_dataset(tmp_path / "src", count=2)
    work = tmp_path / "w"

    def full(*a, **kw):
        if kind == "oserror":  # what a write() says: no file name
            raise OSError(errno.ENOSPC, "No space left on device")
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                              '"No space left on device" })')

    monkeypatch.setattr(ingest, "_tag_counts_json", full)
    args = ["ingest", str(tmp_path / "src"), "--workdir", str(work), "--workers", "1"]
    line = one_line_error(runner.invoke(app, args))
    assert line.startswith(f"error: {work / 'ingest.staging'}: no space left on device ("), line
    assert " free there); free some space" in line and "rerun the same command" in line
    monkeypatch.undo()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "previous run did not finish" in again.output


def test_a_full_disk_error_with_a_path_names_it():
    from shared.core.errors import os_error_line

    line = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/tmp/x/y.bin"), "/tmp/elsewhere")
    assert line.startswith("/tmp/x/y.bin: no space left on device (") and "free there" in line


# ---------------------------------------------------------------- 4. pipeline.toml: NUL bytes and a BOM


@pytest.mark.parametrize("toml, where", [
    ('[pipeline]\nworkdir = "w\\u0000x"\n[ingest]\nsources = ["src"]\n', "[ingest] workdir: 'w\\x00x'"),
    ('[ingest]\nsources = ["s\\u0000rc"]\n', "[ingest] sources[0] path: 's\\x00rc'"),
    ('[ingest]\nsources = [{path = "src", caption_ext = ".t\\u0000xt"}]\n', "[ingest] sources[0] caption_ext"),
])
def test_a_nul_byte_in_a_config_value_is_refused_naming_the_key(tmp_path, runner, toml, where):
    cfg = tmp_path / "p.toml"
    cfg.write_text(toml)
    line = one_line_error(runner.invoke(app, ["ingest", "--config", str(cfg)]))
    assert where in line and "NUL character" in line, line


def test_a_toml_file_starting_with_a_byte_order_mark_is_read(tmp_path, runner):
    make_dataset(tmp_path / "src", count=2)
    cfg = tmp_path / "p.toml"
    cfg.write_bytes(b"\xef\xbb\xbf" + f"[pipeline]\nworkdir = '{tmp_path / 'w'}'\n[ingest]\nsources = "
                                       f"['{tmp_path / 'src'}']\nworkers = 1\n".encode())
    result = runner.invoke(app, ["ingest", "--config", str(cfg)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "w" / "ingest" / "items.jsonl").is_file()


# ---------------------------------------------------------------- 5. ingest: what stands at a source's names


@pytest.fixture
def alarm():
    """Fail instead of hanging: a blocked open() of a FIFO is interrupted by the alarm's exception."""
    def ring(signum, frame):
        raise TimeoutError("ingest hung (a FIFO opened for reading?)")
    before = signal.signal(signal.SIGALRM, ring)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


def test_fifos_devices_and_oversized_files_are_rejected_rows_not_a_hang(tmp_path, alarm):
    import stages.ingest as ingest
    from stages.ingest.files import MAX_CAPTION_BYTES

    src = tmp_path / "src"
    save(noise_image(300, 300, 1), src / "good.png")
    caption(src / "good.png", "fine")
    os.mkfifo(src / "fifo.png")                                    # an image name on a FIFO
    save(noise_image(300, 300, 2), src / "piped.png")
    os.mkfifo(src / "piped.txt")                                   # its caption a FIFO
    save(noise_image(300, 300, 3), src / "zero.png")
    os.symlink("/dev/zero", src / "zero.txt")                      # its caption a link to an endless device
    os.symlink("/dev/urandom", src / "random.png")                 # an image: a link to an endless device
    save(noise_image(300, 300, 4), src / "huge.png")
    (src / "huge.txt").write_bytes(b"a, " * (MAX_CAPTION_BYTES // 3 + 1))  # a caption over the limit
    save(noise_image(300, 300, 5), tmp_path / "elsewhere.png")
    os.symlink(tmp_path / "elsewhere.png", src / "linked.png")   # a link to a regular file: read
    os.mkfifo(src / "metadata.jsonl")                              # a caption table on a FIFO
    cfg = ingest.Config(sources=(ingest.Source(path=src),), workdir=tmp_path / "w", workers=1, min_side=64)
    ingest.run(cfg)
    out = tmp_path / "w" / "ingest"
    items = {json.loads(l)["path"] for l in (out / "items.jsonl").read_text().splitlines()}
    rows = {json.loads(l)["path"]: json.loads(l) for l in (out / "rejected.jsonl").read_text().splitlines()}
    assert items == {"good.png", "linked.png"}
    reasons = {p: (r["reason"], r["detail"]) for p, r in rows.items()}
    assert reasons["fifo.png"][0] == "not_regular" and "FIFO" in reasons["fifo.png"][1]
    assert reasons["piped.png"][0] == "not_regular" and "caption file piped.txt is a FIFO" in reasons["piped.png"][1]
    assert reasons["zero.png"][0] == "not_regular" and "'/dev/zero'" in reasons["zero.png"][1]
    assert reasons["random.png"][0] == "not_regular" and "character device" in reasons["random.png"][1]
    assert reasons["huge.png"][0] == "too_large" and "caption file huge.txt" in reasons["huge.png"][1]
    assert reasons["metadata.jsonl"][0] == "not_regular"


def test_read_regular_stops_at_its_limit_and_follows_links_to_regular_files(tmp_path):
    from shared.images import Rejected
    from stages.ingest.files import read_regular

    (tmp_path / "f").write_bytes(b"x" * 100)
    os.symlink(tmp_path / "f", tmp_path / "link")
    assert read_regular(tmp_path / "link", 100) == b"x" * 100
    with pytest.raises(Rejected, match="too_large: file of 100 bytes, more than the 99 bytes read"):
        read_regular(tmp_path / "f", 99)
    with pytest.raises(Rejected, match="not_regular: file is a folder"):
        read_regular(tmp_path, 10)


def test_a_kohya_folder_asking_for_absurd_repeats_is_one_line(tmp_path, runner):
    src = tmp_path / "src"
    save(noise_image(300, 300, 1), src / "999999999_x" / "a.png")
    result = runner.invoke(app, ["ingest", str(src), "--workdir", str(tmp_path / "w"), "--layout", "kohya"])
    line = one_line_error(result)
    assert f"{src / '999999999_x'}: a kohya folder asking for 999999999 repeats, more than 10000" in line, line
    assert not (tmp_path / "w" / "ingest.staging").exists()  # refused before anything was written


def test_one_caption_for_two_images_is_said(tmp_path, runner):
    src = tmp_path / "src"
    save(noise_image(300, 300, 1), src / "anim.gif")
    save(noise_image(300, 300, 2), src / "anim.webp")
    caption(src / "anim.gif", "a cat")
    result = runner.invoke(app, ["ingest", str(src), "--workdir", str(tmp_path / "w"), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert (f"warning: {src / 'anim.txt'}: one caption file for 2 images (anim.gif, anim.webp); each of them is "
            f"captioned by it") in result.stderr


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has ended; only its parent's wait is missing


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_ingest_workers_end_within_seconds_when_the_stage_is_killed(tmp_path):
    """The workers are killed with the stage even when it dies while they are still starting (the parent-death
    signal is set too late then): held in their start-up until the stage is gone, they must not live on."""
    src = tmp_path / "src"
    src.mkdir()
    for i in range(64):  # the pool is used from 64 files on
        (src / f"f{i:02d}.png").write_bytes(b"")
    hold = 2.0
    p = subprocess.Popen([sys.executable, "-m", "stages.cli", "ingest", str(src), "--workdir", str(tmp_path / "w"),
                          "--workers", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env={**os.environ, "SDXL_PROGRESS": "0", "SDXL_HOLD": f"ingest.worker:{hold}"})
    try:
        for line in p.stdout:
            if "holding at ingest.worker" in line:
                break
        else:
            raise AssertionError("no worker started")
        workers = [c for c in _children(p.pid) if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()]
        assert workers
        p.kill()
        p.wait()
        deadline = time.monotonic() + hold + 2.0
        while any(map(_alive, workers)) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [w for w in workers if _alive(w)]
    finally:
        p.kill()
    for w in left:
        os.kill(w, signal.SIGKILL)
    assert not left, f"workers {left} outlived the killed stage"


_LATE_WORKER = """
import os, sys, time
from stages.ingest import _leave_with
read, write = os.pipe()
if os.fork() == 0:                      # the stage
    stage = os.getpid()
    if os.fork() == 0:                  # its worker, still starting when the stage is killed
        while os.getppid() == stage:
            time.sleep(0.01)
        _leave_with(stage)              # the parent-death signal is set too late to fire
        os.write(write, b"alive")
        time.sleep(10)
        os._exit(0)
    os._exit(0)                         # the stage dies at once
os.close(write)
start = time.monotonic()
said = os.read(read, 100)               # b"" once the worker has ended (it held the pipe's other end)
print(repr(said), round(time.monotonic() - start, 1))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_worker_that_starts_after_the_stage_died_ends_at_once():
    done = subprocess.run([sys.executable, "-c", _LATE_WORKER], cwd=ROOT, capture_output=True, text=True, timeout=60)
    said, seconds = done.stdout.split()
    assert said == "b''" and float(seconds) < 2, done.stdout + done.stderr


# ---------------------------------------------------------------- 6. file modes, byte-identical exports


def test_commit_gives_files_the_umasks_mode(tmp_path):
    mask = os.umask(0o027)
    try:
        out = tmp_path / "out"
        staging = artifacts.fresh_staging(out, "ingest")
        (staging / "private.bin").write_bytes(b"x")
        os.chmod(staging / "private.bin", 0o600)  # as safetensors' save_file makes its files
        artifacts.commit(staging, out, artifacts.Manifest("ingest", 1, "c", {}, {}, "fp"))
        assert oct((out / "private.bin").stat().st_mode & 0o777) == oct(0o640)
    finally:
        os.umask(mask)


def test_safetensors_files_have_sorted_metadata_and_the_umasks_mode(tmp_path):
    import torch

    from shared.formats.tensorfile import save_file

    meta = {k: "v" for k in "qwertyuiopasdfghjkl"}
    for name in ("a", "b"):
        save_file({"t": torch.zeros(3), "s": torch.ones(2)}, tmp_path / f"{name}.safetensors", metadata=meta)
    a, b = (tmp_path / "a.safetensors").read_bytes(), (tmp_path / "b.safetensors").read_bytes()
    assert a == b
    size = int.from_bytes(a[:8], "little")
    assert list(json.loads(a[8:8 + size])["__metadata__"]) == sorted(meta)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o666 & ~artifacts.umask()


def test_two_exports_of_one_training_are_byte_identical(tmp_path, monkeypatch):
    import torch
    from safetensors import safe_open

    from stages import export
    from tests.test_export import make_train_output

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train = make_train_output(tmp_path / "t")
        files = {}
        for name in ("a", "b"):
            m = export.run(export.Config(input=train, output=tmp_path / name, device="cpu", format=("kohya",),
                                         verify=False))
            files[name] = tmp_path / name / m.extra["formats"]["kohya"]["file"]
        assert files["a"].read_bytes() == files["b"].read_bytes()
        with safe_open(str(files["a"]), "pt") as f:
            assert f.metadata()["modelspec.date"] == "2025-01-02T00:00:00+00:00"  # when the training finished
        assert files["a"].stat().st_mode & 0o777 == 0o666 & ~artifacts.umask()
        monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
        m = export.run(export.Config(input=train, output=tmp_path / "c", device="cpu", format=("kohya",),
                                     verify=False))
        with safe_open(str(tmp_path / "c" / m.extra["formats"]["kohya"]["file"]), "pt") as f:
            assert f.metadata()["modelspec.date"] == "2023-11-14T22:13:20+00:00"
        assert m.created == "2023-11-14T22:13:20+00:00"
    finally:
        torch.set_num_threads(threads)
