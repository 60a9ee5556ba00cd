"""No user's data is lost: `--out` that is not the stage's own output is refused before anything is written,
one writer per output (an OS lock that kill -9 releases), waits on other ranks end when they are gone, and
SIGINT / SIGTERM end a stage with one line saying what is kept."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared.core import artifacts, outputs, ranks
from shared.core.errors import ConfigError, InputError
from stages.cli import app
from tests.conftest import make_dataset

ROOT = Path(__file__).resolve().parents[1]


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def sdxl(args: list[str], env: dict | None = None, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})}, **kw)


def wait_until_holding(p: subprocess.Popen, point: str) -> None:
    for line in p.stdout:
        if f"holding at {point}" in line:
            return
    raise AssertionError(f"never reached {point}: {p.stderr.read()}")


def finished(p: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


@pytest.fixture
def ingested(tmp_path, runner):
    make_dataset(tmp_path / "src", count=6)
    work = tmp_path / "w"
    result = runner.invoke(app, ["ingest", str(tmp_path / "src"), "--workdir", str(work), "--workers", "1",
                                 "--min-side", "64"])
    assert result.exit_code == 0, result.output
    return tmp_path, work


def refused(runner, args: list[str], needle: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], result.stderr
    assert "Traceback" not in result.output


# ---------------------------------------------------------------- 1. data loss


def test_ingest_out_on_its_source_is_refused_and_deletes_nothing(tmp_path, runner):
    src = make_dataset(tmp_path / "photos", count=4)
    before = snapshot(src)
    refused(runner, ["ingest", str(src), "--out", str(src)], "is the source folder")
    refused(runner, ["ingest", str(src), "--out", str(tmp_path)], "contains the source folder")
    refused(runner, ["ingest", str(src), "--out", str(src / "ingest")], "lies inside the source folder")
    assert snapshot(src) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # not even a staging folder or a lock


def test_out_on_or_around_the_input_is_refused(ingested, runner):
    root, work = ingested
    before = snapshot(work)
    refused(runner, ["bucket", "--in", str(work / "ingest"), "--out", str(work / "ingest")], "is the input folder")
    refused(runner, ["bucket", "--in", str(work / "ingest"), "--out", str(work)], "contains the input folder")
    refused(runner, ["bucket", "--in", str(work / "ingest"), "--out", str(work / "ingest" / "b")],
            "lies inside the input folder")
    for stage in (["encode", "--model", "builtin:tiny"], ["train", "--model", "builtin:tiny"], ["export"]):
        refused(runner, stage + ["--in", str(work / "ingest"), "--out", str(work / "ingest")], "is the input folder")
    assert snapshot(work) == before


def test_out_holding_a_user_folder_a_file_or_another_stage_is_refused(ingested, runner):
    root, work = ingested
    mine = root / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(runner, ["bucket", "--workdir", str(work), "--out", str(mine)], "not a `bucket` output")
    assert (mine / "thesis.tex").read_text() == "years of work"
    note = root / "note.txt"
    note.write_text("keep")
    refused(runner, ["bucket", "--workdir", str(work), "--out", str(note)], "is a file")
    refused(runner, ["bucket", "--workdir", str(work), "--out", str(note / "sub")], "is a file")
    assert note.read_text() == "keep" and not (root / "note.txt.staging").exists()
    src2 = make_dataset(root / "src2", count=2)
    result = runner.invoke(app, ["bucket", "--workdir", str(work), "--out", str(work / "bk"), "--min-side", "64"])
    assert result.exit_code == 0, result.output
    refused(runner, ["ingest", str(src2), "--out", str(work / "bk"), "--min-side", "64"], "holds a `bucket` output")
    assert artifacts.read_manifest(work / "bk").stage == "bucket"


def test_empty_folder_and_own_output_are_replaced(ingested, runner):
    root, work = ingested
    empty = root / "empty"
    empty.mkdir()
    assert runner.invoke(app, ["bucket", "--workdir", str(work), "--out", str(empty), "--min-side", "64"]).exit_code == 0
    again = runner.invoke(app, ["bucket", "--workdir", str(work), "--out", str(empty), "--min-side", "64",
                                "--seed", "3"])
    assert again.exit_code == 0 and "config changed: seed 0 -> 3" in again.output
    assert artifacts.read_manifest(empty).config["seed"] == 3


def test_a_foreign_staging_folder_is_never_deleted(ingested, runner):
    root, work = ingested
    staging = work / "bucket.staging"
    staging.mkdir()
    (staging / "photo.jpg").write_bytes(b"precious")
    refused(runner, ["bucket", "--workdir", str(work)], "is not an unfinished `bucket` output")
    assert (staging / "photo.jpg").read_bytes() == b"precious"


def test_a_staging_folder_whose_job_record_is_being_written_is_not_foreign(tmp_path):
    """The main rank makes `<out>.staging` and writes job.json atomically (job.json.tmp, then a rename) while
    the other ranks check their target: that moment is neither empty nor foreign, and must pass."""
    out = tmp_path / "train"
    staging = artifacts.staging_dir(out)
    staging.mkdir()
    (staging / "job.json.tmp").write_text('{"stage": "tr')
    outputs.check_target(out, "train")
    (staging / "notes.txt").write_text("x")  # anything else still makes it foreign
    with pytest.raises(ConfigError, match="is not an unfinished `train` output"):
        outputs.check_target(out, "train")


def test_error_hints_never_propose_writing_over_data(ingested, runner):
    root, work = ingested
    result = runner.invoke(app, ["encode", "--model", "builtin:tiny", "--in", str(work / "ingest"),
                                 "--out", str(root / "e")])
    assert result.exit_code == 2 and "holds `ingest` output, expected `bucket` output" in result.stderr
    assert "--out " + str(work / "ingest") not in result.stderr
    with pytest.raises(InputError) as e:
        artifacts.require_input(work / "ingest.staging", "ingest", [1], f"sdxl ingest --out {work}/ingest.staging")
    assert "--out" not in str(e.value)
    user = root / "plain"
    user.mkdir()
    (user / "a.txt").write_text("x")
    with pytest.raises(InputError) as e:
        artifacts.require_input(user, "bucket", [1], f"sdxl bucket --out {user}")
    assert f"--out {user}" not in str(e.value)


@pytest.mark.parametrize("out, protected, needle", [
    ("a", [("input folder", "a")], "is the input folder"),
    ("a", [("source folder", "a/b/c")], "contains the source folder"),
    ("a/b", [("model", "a")], "lies inside the model"),
])
def test_check_apart(tmp_path, out, protected, needle):
    with pytest.raises(ConfigError, match=needle):
        outputs.check_apart(tmp_path / out, [(w, tmp_path / p) for w, p in protected])
    outputs.check_apart(tmp_path / "x", [(w, tmp_path / p) for w, p in protected])  # apart: fine


# ---------------------------------------------------------------- 2. one writer per output

HOLDER = """
import sys, time
from shared.core import outputs
outputs.claim(__import__('pathlib').Path(sys.argv[1]), 'ingest', 0, outputs.job_id(1))
print('held', flush=True)
time.sleep(60)
"""


def test_claim_is_exclusive_names_its_holder_and_dies_with_it(tmp_path):
    out = tmp_path / "w" / "ingest"
    p = subprocess.Popen([sys.executable, "-c", HOLDER, str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert p.stdout.readline().strip() == "held"
        with pytest.raises(outputs.BusyError, match=rf"another `sdxl` run is writing it \(`ingest` pid {p.pid}"):
            outputs.claim(out, "ingest", 0, outputs.job_id(1))
        assert outputs.held(outputs.lock_path(out))
    finally:
        p.kill()
        p.wait()
    assert not outputs.held(outputs.lock_path(out))
    c = outputs.claim(out, "ingest", 0, outputs.job_id(1))  # kill -9 freed it
    assert outputs.claim(out, "ingest", 0, outputs.job_id(1)) is c  # reentrant in one process
    outputs.release(c)
    outputs.release(c)
    assert not outputs.held(outputs.lock_path(out))


def test_second_run_on_a_live_output_is_refused_then_resumes_after_kill(tmp_path):
    make_dataset(tmp_path / "src", count=6)
    args = ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--workers", "1", "--min-side", "64"]
    first = sdxl(args, {"SDXL_HOLD": "ingest.item:60"})
    try:
        wait_until_holding(first, "ingest.item")
        code, out, err = finished(sdxl(args))
        assert code == 2 and f"pid {first.pid}" in err and "another `sdxl` run is writing it" in err, err
        assert len(err.strip().splitlines()) == 1
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    code, out, err = finished(sdxl(args))
    assert code == 0 and "previous run did not finish" in out, err
    assert len((tmp_path / "w" / "ingest" / "items.jsonl").read_text().splitlines()) == 6


def test_wait_for_stops_when_the_partner_never_starts_or_dies(monkeypatch):
    monkeypatch.setenv("SDXL_RANK_GRACE", "0.3")
    start = time.monotonic()
    with pytest.raises(ranks.RankLost, match="did not start within"):
        ranks.wait_for(lambda: False, "rank 0 to prepare", alive=lambda: False, poll=0.05)
    assert time.monotonic() - start < 5
    states = iter([True, True, False, False])
    with pytest.raises(ranks.RankLost, match="it stopped"):
        ranks.wait_for(lambda: False, "the shards of rank 1", alive=lambda: next(states), poll=0.01)
    calls = iter([False, False, True])
    ranks.wait_for(lambda: next(calls), "x", alive=lambda: True, poll=0.01)  # a live partner: keeps waiting


def test_job_id_is_shared_by_ranks_of_one_launch(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "node1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "abc")
    a = outputs.job_id(2)
    monkeypatch.setenv("MASTER_PORT", "29501")
    assert outputs.job_id(2) != a and "TORCHELASTIC_RUN_ID=abc" in a
    assert outputs.job_id(1) == f"pid {os.getpid()} on {__import__('socket').gethostname()}"


# ---------------------------------------------------------------- 5. signals


@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_mid_stage_prints_what_is_kept(tmp_path, sig, code):
    make_dataset(tmp_path / "src", count=6)
    args = ["ingest", str(tmp_path / "src"), "--workdir", str(tmp_path / "w"), "--workers", "1", "--min-side", "64"]
    p = sdxl(args, {"SDXL_HOLD": "ingest.item:60"})
    wait_until_holding(p, "ingest.item")
    p.send_signal(sig)
    rc, out, err = finished(p, timeout=30)
    assert rc == code, err
    assert f"ingest: interrupted by {signal.Signals(sig).name}; nothing of this run is kept; rerun the same " \
           f"command to start again" in out
    assert "Traceback" not in err
    assert not (tmp_path / "w" / "ingest").exists()


# ---------------------------------------------------------------- encode and train: ranks, writers, signals


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    make_dataset(root / "src", count=6)
    work = root / "w"
    for args in (["ingest", str(root / "src"), "--workers", "1", "--min-side", "64"],
                 ["bucket", "--max-area", str(128 * 128), "--min-side", "64", "--max-side", "256",
                  "--max-upscale", "4"]):
        code, out, err = finished(sdxl(args + ["--workdir", str(work)]))
        assert code == 0, err
    return work


ENCODE = ["encode", "--model", "builtin:tiny", "--shard-samples", "2", "--batch-size", "1", "--decoder", "pil"]


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def test_sigterm_mid_encode_keeps_finished_shards_ends_workers_and_resumes(bucketed, tmp_path):
    out = tmp_path / "enc"
    args = ENCODE + ["--workdir", str(bucketed), "--out", str(out), "--workers", "2"]
    p = sdxl(args, {"SDXL_HOLD": "encode.shard:60"})
    wait_until_holding(p, "encode.shard")
    workers = children(p.pid)
    assert workers, "the PIL decode workers should be running"
    p.send_signal(signal.SIGTERM)
    rc, stdout, err = finished(p, timeout=60)
    assert rc == 143, err
    assert "encode: interrupted by SIGTERM; 0 finished shards are kept in" in stdout
    assert "rerun the same command to resume" in stdout and "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(Path(f"/proc/{w}").exists() for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(Path(f"/proc/{w}").exists() for w in workers), "decode workers outlived their parent"
    rc, stdout, err = finished(sdxl(args))
    assert rc == 0 and "previous run did not finish" in stdout, err


def test_a_rank_whose_partner_never_comes_stops_instead_of_hanging(bucketed, tmp_path):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29999",
           "SDXL_RANK_GRACE": "2"}
    start = time.monotonic()
    rc, stdout, err = finished(sdxl(ENCODE + ["--workdir", str(bucketed), "--out", str(tmp_path / "enc")], env),
                               timeout=120)
    assert rc == 2 and "stopped waiting for rank 0 to prepare" in err and "did not start within 2 s" in err, err
    assert time.monotonic() - start < 100


def test_a_second_encode_or_train_on_a_live_output_is_refused(bucketed, tmp_path):
    out = tmp_path / "enc"
    args = ENCODE + ["--workdir", str(bucketed), "--out", str(out), "--workers", "0"]
    first = sdxl(args, {"SDXL_HOLD": "encode.batch:60"})
    try:
        wait_until_holding(first, "encode.batch")
        rc, stdout, err = finished(sdxl(args))
        assert rc == 2 and f"`encode` pid {first.pid}" in err, err
    finally:
        first.kill()
        first.wait()
    assert finished(sdxl(args))[0] == 0
    train = ["train", "--model", "builtin:tiny", "--in", str(out), "--out", str(tmp_path / "t"), "--batch-size", "1",
             "--max-steps", "3", "--eval-samples", "0", "--no-tensorboard"]
    first = sdxl(train, {"SDXL_HOLD": "train.step:60"})
    try:
        wait_until_holding(first, "train.step")
        rc, stdout, err = finished(sdxl(train))
        assert rc == 2 and f"`train` pid {first.pid}" in err, err
    finally:
        first.send_signal(signal.SIGTERM)
        rc, stdout, err = finished(first)
    assert rc == 143 and "train: interrupted by SIGTERM; no checkpoint was written yet" in stdout, stdout + err
