"""Cluster launchers and where clusters keep shards, end to end on builtin:tiny: `accelerate launch` with two
CPU processes (gloo) trains exactly what `torchrun` with two processes trains, and train reads encode's output
from a URL (a localhost HTTP server) as it reads the folder."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shared.core.config import resolve
from stages import train
from stages.bench.server import LatencyServer
from tests.conftest import encode_sixteen

ROOT = Path(__file__).resolve().parents[1]
OPTS = {"model": "builtin:tiny", "batch_size": 4, "max_steps": 4, "shuffle_buffer": 1, "lora_dropout": 0.0,
        "learning_rate": 1e-2, "eval_samples": 0, "lora_rank": 4, "lora_alpha": 4.0, "checkpoint_every": 3}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory) -> Path:
    """16 captioned images of one size -> one 128x128 bucket, 4 shards of 4, tar + zarr (as tests/test_train.py)."""
    return encode_sixteen(tmp_path_factory.mktemp("launch"))


def train_args(work: Path, out: Path) -> list[str]:
    args = ["train", "--workdir", str(work), "--out", str(out)]
    for k, v in OPTS.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def launch(prefix: list[str], args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, "stages.cli", *args], capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1"})


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "checkpoints" / "step-000004" / "weights.safetensors"))


def test_accelerate_launch_with_two_cpu_processes_equals_torchrun(encoded, tmp_path):
    """`accelerate launch --multi_gpu --num_processes 2` starts the processes through torch's elastic launcher
    (RANK / WORLD_SIZE / LOCAL_RANK), and train picks gloo on a machine without CUDA. (`accelerate launch --cpu`
    does not start several processes without MPI: its multi-CPU path is `mpirun`.)"""
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29581",
                "-m"]
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", "29582", "-m"]
    a = launch(torchrun, train_args(encoded, tmp_path / "torchrun"))
    assert a.returncode == 0, a.stderr[-3000:]
    b = launch(accelerate, train_args(encoded, tmp_path / "accelerate"))
    assert b.returncode == 0, b.stderr[-3000:]
    wa, wb = weights(tmp_path / "torchrun"), weights(tmp_path / "accelerate")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert max(float(v.abs().max()) for k, v in wa.items() if "lora_B" in k) > 1e-3  # it trained


def test_train_reads_encode_output_from_a_url(encoded, tmp_path):
    local = train.run(resolve(train.Config, "train", {}, {**OPTS, "workdir": encoded, "output": tmp_path / "a"}))
    with LatencyServer(encoded, latency_ms=2, max_requests=20_000, max_seconds=300) as url:
        remote = train.run(resolve(train.Config, "train", {}, {**OPTS, "workdir": encoded,
                                                               "input": f"{url}/encode", "output": tmp_path / "b"}))
    assert remote is not None and local is not None
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_fsdp_two_ranks_train_as_one_process_and_resume_after_kill_9(encoded, tmp_path):
    """FSDP2 (`--parallel fsdp`, torch's fully_shard per UNet block) on 2 CPU ranks under gloo, full fine-tune:
    the weights after 4 steps equal one process's with the doubled batch (up to float summation order, as DDP's
    do: tests/test_train.py), the checkpoint holds the full tensors a DDP run writes (same files, keys, shapes),
    and a run killed (-9) after step 4 resumes from step 3 to bitwise the uninterrupted run's weights, AdamW
    state, schedule and progress."""
    opts = ["--method", "full", "--learning-rate", "1e-4", "--parallel", "fsdp"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29583",
                "-m"]
    a = launch(torchrun, train_args(encoded, tmp_path / "fsdp") + opts)
    assert a.returncode == 0, a.stderr[-3000:]
    one = train_args(encoded, tmp_path / "one") + opts + ["--batch-size", "8"]
    b = launch([sys.executable, "-m"], one)
    assert b.returncode == 0, b.stderr[-3000:]
    wa, wb = weights(tmp_path / "fsdp"), weights(tmp_path / "one")
    assert wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    assert "FSDP: the UNet sharded over 2 processes (14 blocks" in a.stdout
    from shared.models import loading as models

    start = models.load_model("builtin:tiny", ("unet",)).unet.state_dict()
    moved = torch.cat([(wa["unet." + k] - v).abs().flatten() for k, v in start.items()])
    differ = torch.cat([(wa[k] - wb[k]).abs().flatten() for k in wa])
    # AdamW's first steps are near lr·sign(g): a weight whose gradient is ~0 may step either way under another
    # summation order, so the largest difference is compared with lr (seen 6.3e-6 with transformers 5.25 and
    # torch 2.13, 1.7e-5 % of the weights over 1e-6), and the mean with the mean update (seen 5e-10 vs 2.3e-4)
    assert float(differ.max()) < 1e-5 and float(differ.mean()) * 1000 < float(moved.mean()), \
        (float(differ.max()), float(differ.mean()), float(moved.mean()))
    killed = subprocess.run([*torchrun, "stages.cli", *train_args(encoded, tmp_path / "k"), *opts],
                            capture_output=True, text=True, cwd=ROOT, timeout=600,
                            env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1",
                                 "SDXL_FAULT": "train.step:4"})
    assert killed.returncode != 0 and not (tmp_path / "k").exists()
    again = launch(torchrun, train_args(encoded, tmp_path / "k") + opts)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 3 of 4" in again.stdout
    fa, fk = (tmp_path / "fsdp" / "checkpoints" / "step-000004", tmp_path / "k" / "checkpoints" / "step-000004")
    from safetensors.torch import load_file

    for name in ("weights", "optimizer"):
        ta, tk = load_file(str(fa / f"{name}.safetensors")), load_file(str(fk / f"{name}.safetensors"))
        assert ta.keys() == tk.keys() and all(torch.equal(ta[k], tk[k]) for k in ta), name
    for name in ("optimizer", "scheduler", "progress"):
        assert (fa / f"{name}.json").read_text() == (fk / f"{name}.json").read_text(), name
