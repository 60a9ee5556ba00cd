"""Interrupted at any point, resumed by one rerun of the same command (issue 24): Ctrl-C (SIGINT) and kill -9
while sample images render, while a checkpoint is written, during the commit, during export's writing and
encode's finish; each rerun must give what an uninterrupted run gives (checkpoints bitwise, the sample sets
complete and the same, nothing listed that is not there, no empty or partial folders), and an interrupted
`--force` rerun of an up-to-date output is resumed, not skipped with its staging folder left behind.

The interrupts come from the fault hooks (shared/core/faults.py): `SDXL_FAULT=<point>:<n>:INT` sends the process
SIGINT at an exact place (in-process here: the stage turns it into SystemExit 130, as Ctrl-C would),
`SDXL_FAULT=<point>:<n>` SIGKILLs it, `SDXL_HOLD=<point>:<seconds>:<n>` pauses there so a test can signal it."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.core import artifacts, faults
from shared.core.config import resolve
from stages import encode as encode_stage, export, train
from tests.conftest import caption, encode_folder, noise_image, save

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = """
[[prompt]]
prompt = "colour 1, common"
negative = "blurry"
seed = 3
width = 32
height = 48
steps = 2
cfg = 4.0

[[prompt]]
prompt = "common"
seed = 5
width = 32
height = 32
steps = 1
cfg = 1.0
"""
# 4 steps, checkpoints at 2 and 4, sample sets at 0, 2 and 4 (EMA weights), a LoRA file with each checkpoint
OPTS = {"model": "builtin:tiny", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 4, "checkpoint_every": 2,
        "learning_rate": 3e-3, "eval_samples": 2, "lora_rank": 4, "lora_alpha": 4.0, "ema_decay": 0.9,
        "lora_files": True, "sample_every": 2}
ENCODE = {"max_area": 128 * 128, "max_side": 128, "shard_samples": 4, "format": "wds"}


@pytest.fixture(scope="module")
def one_thread():
    """Runs in this process and in the CLI processes (OMP_NUM_THREADS=1) compute alike."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def work(tmp_path_factory, one_thread) -> Path:
    """8 captioned 128x128 images encoded into 2 shards, and the sample prompts file."""
    root = tmp_path_factory.mktemp("interrupts")
    for i in range(8):
        caption(save(noise_image(128, 128, seed=200 + i), root / "src" / f"img_{i}.png"), f"colour {i % 4}, common")
    work = encode_folder(root, **ENCODE)
    (work / "prompts.toml").write_text(PROMPTS)
    return work


def train_config(work: Path, out: Path) -> train.Config:
    return resolve(train.Config, "train", {}, {"workdir": work, "output": out, "sample_prompts": work / "prompts.toml",
                                               **OPTS})


def train_args(work: Path, out: Path) -> list[str]:
    """The same run as `train_config`, as a command line."""
    args = ["train", "--workdir", str(work), "--out", str(out), "--sample-prompts", str(work / "prompts.toml")]
    for k, v in OPTS.items():
        args += [f"--{k.replace('_', '-')}"] if v is True else [f"--{k.replace('_', '-')}", str(v)]
    return args


@pytest.fixture(scope="module")
def reference(work) -> Path:
    """The uninterrupted run (named as the runs compared with it: its LoRA files carry the name)."""
    out = work.parent / "reference" / "t"
    train.run(train_config(work, out))
    return out


@pytest.fixture
def interrupt(monkeypatch):
    """`interrupt("point:n")`: SIGINT the n-th time `point` is reached (until `clear()`)."""
    class Fault:
        def __call__(self, spec: str) -> None:
            monkeypatch.setattr(faults, "_hits", {})
            monkeypatch.setenv("SDXL_FAULT", f"{spec}:INT")

        def clear(self) -> None:
            monkeypatch.delenv("SDXL_FAULT", raising=False)
            monkeypatch.delenv("SDXL_HOLD", raising=False)
            monkeypatch.setattr(faults, "_hits", {})
            monkeypatch.setattr(faults, "_held", set())
    return Fault()


def interrupted(run, *args) -> None:
    with pytest.raises(SystemExit) as e:
        run(*args)
    assert e.value.code == 128 + signal.SIGINT


def tree(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) + ("/" if p.is_dir() else "") for p in folder.rglob("*"))


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def sample_notes(out: Path) -> list[int]:
    lines = [json.loads(x) for x in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    return [x["step"] for x in lines if "samples" in x]


def assert_same_run(ref: Path, out: Path) -> None:
    """`out` finished as the uninterrupted `ref`: checkpoints bitwise, the same LoRA files, the same complete sample
    sets and grid (byte for byte), each set noted once in the metrics, nothing partial or empty left."""
    assert out.is_dir() and not artifacts.staging_dir(out).exists()
    assert tree(out / "checkpoints") == tree(ref / "checkpoints")
    for step in ("step-000002", "step-000004"):
        a, b = ref / "checkpoints" / step, out / "checkpoints" / step
        for name in ("weights", "ema", "optimizer", "rng-rank0"):
            assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), (step, name)
        for name in ("optimizer", "scheduler", "progress"):
            assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text())
    assert tree(out / "loras") == tree(ref / "loras")
    for lora in (ref / "loras").iterdir():
        assert same_tensors(lora, out / "loras" / lora.name), lora.name
    assert tree(out / "samples") == tree(ref / "samples") == [
        "grid.png", "step-000000/", "step-000000/00.png", "step-000000/01.png", "step-000000/weights.txt",
        "step-000002/", "step-000002/00.png", "step-000002/01.png", "step-000002/weights.txt",
        "step-000004/", "step-000004/00.png", "step-000004/01.png", "step-000004/weights.txt"]
    for name in tree(ref / "samples"):
        if not name.endswith("/"):
            assert (out / "samples" / name).read_bytes() == (ref / "samples" / name).read_bytes(), name
    assert sample_notes(out) == sample_notes(ref) == [0, 2, 4]


def sdxl_process(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1", **env})


def test_ctrl_c_while_samples_render_is_resumed_by_one_rerun(work, reference, tmp_path):
    """The issue's run: Ctrl-C while the step-2 samples render (one image of the set written, the checkpoint of
    step 2 kept). One rerun of the same command renders that set again and finishes as the uninterrupted run."""
    out = tmp_path / "t"
    run = sdxl_process(train_args(work, out), {"SDXL_HOLD": "samples.image:120:4"})
    try:
        for line in run.stdout:
            if line.startswith("holding at samples.image"):
                break
        assert list((out.with_name("t.staging") / "samples").glob("*step-000002*/00.png"))  # one image written
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=60)
    finally:
        run.kill()
    assert run.returncode == 128 + signal.SIGINT, stderr[-2000:]
    assert "interrupted by SIGINT; checkpoint" in stdout and "step-000002 is kept" in stdout
    staging = out.with_name("t.staging")
    assert not (staging / "samples" / "step-000002").exists()  # the set being rendered is not in place
    train.run(train_config(work, out))
    assert_same_run(reference, out)


def test_kill_9_while_samples_render_is_resumed_by_one_rerun(work, reference, tmp_path):
    """kill -9 once the step-2 images are written but before the set is in place."""
    out = tmp_path / "t"
    killed = sdxl_process(train_args(work, out), {"SDXL_FAULT": "samples.written:2"})
    killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL
    train.run(train_config(work, out))
    assert_same_run(reference, out)


@pytest.mark.parametrize("point", [
    "samples.render:3",   # rendering the step-2 set (after its checkpoint)
    "samples.image:4",    # between the step-2 images
    "samples.renamed:2",  # the set in place; the grid, the metrics line not yet
    "samples.render:5",   # rendering the last set, after the last checkpoint
    "train.step:3",        # between steps, the step-2 set done: the rerun does not render it again
    "commit.manifest:1",   # committing the finished run
])
def test_ctrl_c_at_each_phase_is_resumed_by_one_rerun(work, reference, tmp_path, interrupt, point):
    out = tmp_path / "t"
    interrupt(point)
    interrupted(train.run, train_config(work, out))
    assert not out.exists() and artifacts.staging_dir(out).is_dir()
    interrupt.clear()
    train.run(train_config(work, out))
    assert_same_run(reference, out)


def test_ctrl_c_while_a_checkpoint_is_written_is_resumed_by_one_rerun(work, reference, tmp_path, interrupt,
                                                                      monkeypatch):
    """SIGINT half-way through the parts of the step-4 checkpoint: the rerun resumes from step 2."""
    from shared.formats import checkpoints

    real, calls = checkpoints.write_state, []

    def write_state(folder, name, *args, **kw):
        real(folder, name, *args, **kw)
        calls.append(name)
        if folder.name == "step-000004.partial" and len(calls) > 3:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(checkpoints, "write_state", write_state)
    out = tmp_path / "t"
    interrupted(train.run, train_config(work, out))
    staging = artifacts.staging_dir(out)
    assert (staging / "checkpoints" / "step-000004.partial").is_dir()
    monkeypatch.setattr(checkpoints, "write_state", real)
    train.run(train_config(work, out))
    assert_same_run(reference, out)


def test_ctrl_c_while_a_lora_file_is_written_is_resumed_by_one_rerun(work, reference, tmp_path, monkeypatch):
    from stages.train import lorafiles

    real = lorafiles.write

    def write(folder, stem, *args, **kw):
        if stem.endswith("step-000002"):
            os.kill(os.getpid(), signal.SIGINT)
        return real(folder, stem, *args, **kw)
    monkeypatch.setattr(lorafiles, "write", write)
    out = tmp_path / "t"
    interrupted(train.run, train_config(work, out))
    monkeypatch.setattr(lorafiles, "write", real)
    train.run(train_config(work, out))
    assert_same_run(reference, out)


def test_an_interrupted_forced_rerun_of_a_finished_output_is_resumed_not_skipped(work, reference, tmp_path,
                                                                                 interrupt, capsys):
    """The finished output is up to date (sample options are outside the fingerprint), so adding samples needs
    --force; that rerun is stopped while it renders. Rerun without --force: it is resumed (the staging folder
    is not left behind under "unchanged, skipped"); with --force, the same."""
    import shutil

    for force in (False, True):
        out = tmp_path / str(force) / "t"
        shutil.copytree(reference, out)
        interrupt("samples.render:3")
        interrupted(train.run, train_config(work, out), True)
        interrupt.clear()
        capsys.readouterr()
        train.run(train_config(work, out), force)
        said = capsys.readouterr().out
        assert "unchanged, skipped" not in said and "resuming from" in said and "step 2 of 4" in said
        if not force:
            assert "an interrupted rerun did not finish (t.staging is resumed)" in said
        assert_same_run(reference, out)


def export_config(work: Path, src: Path, out: Path) -> export.Config:
    return resolve(export.Config, "export", {}, {"workdir": work, "input": src, "output": out, "format": ("kohya",)})


def test_ctrl_c_during_export_is_redone_by_one_rerun(work, reference, tmp_path, interrupt, capsys):
    """Export stopped after writing its file (before verifying it): the rerun writes the same bytes. An
    interrupted --force export of an up-to-date output, rerun without --force, is skipped and its leftover
    staging folder removed."""
    ref, out = tmp_path / "ref", tmp_path / "e"
    export.run(export_config(work, reference, ref))
    interrupt("export.format:1")
    interrupted(export.run, export_config(work, reference, out))
    assert artifacts.staging_dir(out).is_dir() and not out.exists()
    interrupt.clear()
    export.run(export_config(work, reference, out))
    assert tree(out) == tree(ref) and not artifacts.staging_dir(out).exists()
    assert (out / "sdxl.kohya.safetensors").read_bytes() == (ref / "sdxl.kohya.safetensors").read_bytes()

    interrupt("export.format:1")
    interrupted(export.run, export_config(work, reference, out), True)
    interrupt.clear()
    capsys.readouterr()
    export.run(export_config(work, reference, out))
    said = capsys.readouterr().out
    assert "unchanged, skipped" in said and "removed e.staging, left by an interrupted run" in said
    assert not artifacts.staging_dir(out).exists() and tree(out) == tree(ref)


def test_ctrl_c_during_encodes_finish_is_resumed_by_one_rerun(work, tmp_path, interrupt, capsys):
    """encode stopped after its index is written (every shard done, no manifest yet): the rerun redoes no shard
    and writes the same index."""
    cfg = resolve(encode_stage.Config, "encode", {}, {"workdir": work, "output": tmp_path / "enc",
                                                     "model": "builtin:tiny", "workers": 0, "decoder": "pil",
                                                     "shard_samples": 4, "format": "wds"})
    interrupt("encode.finish:1")
    interrupted(encode_stage.run, cfg)
    interrupt.clear()
    capsys.readouterr()
    encode_stage.run(cfg)
    assert "2 of 2 shards of this rank already done" in capsys.readouterr().out
    enc, ref = tmp_path / "enc", work / "encode"
    assert tree(enc) == tree(ref)
    assert (enc / "index.json").read_bytes() == (ref / "index.json").read_bytes()


def test_a_resumed_run_drops_partial_and_incomplete_sample_sets(tmp_path):
    """What a stopped render (or an older sdxl's, which wrote into the set's own folder) left: a resumed run keeps
    the complete sets up to its step, drops the rest, and the grid and WandB list only images that exist."""
    from PIL import Image

    from stages.train import previews

    (tmp_path / "p.toml").write_text(PROMPTS)
    p = previews.Previews.__new__(previews.Previews)
    p.prompts, p.folder = previews.load_prompts(tmp_path / "p.toml"), tmp_path / "samples"

    def make(name: str, images: int) -> None:
        (p.folder / name).mkdir(parents=True)
        (p.folder / name / "weights.txt").write_text("live\n")
        for i in range(images):
            Image.new("RGB", (32, 32), "red").save(p.folder / name / f"{i:02d}.png")
    make("step-000000", 2)
    make("step-000002", 0)            # an older sdxl's set stopped before its first image
    make("step-000004", 1)            # ... after its first
    make("step-000006", 2)            # after the step resumed at
    make(".step-000008.partial", 1)   # a set being rendered
    (p.folder / "grid.png").write_bytes(b"stale")
    p.forget_after(6 - 2)
    assert tree(p.folder) == ["grid.png", "step-000000/", "step-000000/00.png", "step-000000/01.png",
                              "step-000000/weights.txt"]
    assert Image.open(p.folder / "grid.png").size[1] == previews.R.HEADER_HEIGHT + 48  # one row
    assert p.rendered(0) and not p.rendered(2) and not p.rendered(4)
    assert set(p.labelled(4)) == {"samples/grid"}
    p.forget_after(-1)
    assert tree(p.folder) == []
