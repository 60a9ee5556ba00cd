"""Issue 23: a choice enters through one registry entry. A plugin module defined here (nothing else in the repo
changes) registers an optimizer, an adapter type, a loss and an export format; through SDXL_PLUGINS they are in
--help, a run trains with them, --plan counts them, a kill -9 resume is bitwise the uninterrupted run, and export
writes and verifies the format (and merges the adapter into a single file)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from shared.core.errors import ConfigError
from shared.core.registry import Registry, load_plugins
from tests.conftest import encode_sixteen

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = textwrap.dedent('''
    """A third-party plugin: an optimizer, an adapter type, a loss and an export format, each one registry entry."""
    import torch

    from shared.models import lora
    from stages.export import formats, verify
    from stages.train import objective, optim


    def make_sgd(cfg, groups, seed, first_index):
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)


    optim.OPTIMIZERS.add(optim.Optimizer(
        "sgd_nesterov", "torch's SGD with Nesterov momentum 0.9 (a test plugin).", make_sgd,
        state_bytes=lambda cfg, shape, dtype, rounding: shape.numel() * dtype.itemsize, fusable=True))


    def ia3(spec, targets):
        from peft import IA3Config

        return IA3Config(target_modules=targets, feedforward_modules=[], init_ia3_weights=True)


    lora.ADAPTERS.add(lora.Adapter("ia3_test", "peft's (IA)^3 output scaling (a test plugin).", ia3, "ia3_l"))
    objective.LOSSES.add(objective.Loss("l1_test", "absolute error (a test plugin).",
                                        lambda pred, target, level, cfg: (pred.float() - target.float()).abs()))


    def write_kohya32(job, path):
        formats.write_kohya(path, job.weights, job.ckpt.spec.alpha, job.unet_config, job.info, job.provenance,
                            "float32")
        return {"plugin": "kohya32"}


    formats.FORMATS.add(formats.ExportFormat(
        "kohya32", "kohya names in float32 whatever --dtype says (a test plugin).", "lora",
        lambda out, name: out / f"{name}.kohya32.safetensors", write_kohya32, verify.load_kohya,
        adapters=("lora",)))
''')
OPTS = {"model": "builtin:tiny", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 8, "checkpoint_every": 3,
        "learning_rate": 1e-2, "eval_samples": 2, "lora_rank": 4, "lora_alpha": 4.0, "optimizer": "sgd_nesterov",
        "adapter_type": "ia3_test", "loss": "l1_test"}


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    folder = tmp_path_factory.mktemp("plugin")
    (folder / "my_sdxl_plugin.py").write_text(PLUGIN)
    path = os.pathsep.join([str(folder), str(ROOT), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "SDXL_PLUGINS": "my_sdxl_plugin", "SDXL_PROGRESS": "0",
            "OMP_NUM_THREADS": "1"}


def sdxl(args, env, fault=None):
    env = {**env, **({"SDXL_FAULT": fault} if fault else {})}
    return subprocess.run([sys.executable, "-m", "stages.cli", *args], capture_output=True, text=True, cwd=ROOT,
                          env=env)


def train_args(work, out, **kw):
    args = ["train", "--workdir", str(work), "--out", str(out)]
    for k, v in {**OPTS, **kw}.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    return args


def test_registry_refuses_twice_and_suggests():
    r = Registry("thing")
    entry = type("E", (), {"name": "alpha", "help": "a."})()
    r.add(entry)
    with pytest.raises(ValueError, match="registered twice"):
        r.add(entry)
    with pytest.raises(ConfigError, match="unknown thing 'alpah'; did you mean 'alpha'"):
        r["alpah"]


def test_a_plugin_that_cannot_be_imported_is_one_line(monkeypatch, plugin_env):
    monkeypatch.setenv("SDXL_PLUGINS", "no_such_plugin_module")
    with pytest.raises(ConfigError, match="SDXL_PLUGINS names 'no_such_plugin_module'"):
        load_plugins()
    done = sdxl(["--help"], {**plugin_env, "SDXL_PLUGINS": "no_such_plugin_module"})
    assert done.returncode == 2 and done.stderr.strip().count("\n") == 0 and "no_such_plugin_module" in done.stderr


def test_plan_counts_what_the_entries_say():
    """--plan's optimizer state is the optimizer entry's count (one momentum buffer per weight here), its step
    measured; its weights hold the parameters the adapter entry adds."""
    from shared.core.config import resolve
    from stages import train
    from stages.train import model as M, optim as O, planner

    def make(cfg, groups, seed, first):
        return torch.optim.SGD(groups, lr=cfg.learning_rate, momentum=0.9)

    entry = O.Optimizer("sgd_in_test", "SGD.", make, lambda cfg, shape, dtype, rounding: shape.numel() * 4)
    with O.OPTIMIZERS.added(entry):
        cfg = resolve(train.Config, "train", {}, {"model": "builtin:tiny", "method": "full", "optimizer": entry.name})
        parts = {p.name: p for p in planner.plan(cfg, (64, 64), 1).parts}
    unet = M.build_unet(cfg.unet, torch.device("cpu"))
    assert parts["optimizer state"].bytes == sum(p.numel() * 4 for p in unet.parameters())
    assert "measured" in parts["step temporaries"].how   # SGD steps in place: 0 bytes here
    assert "sgd_in_test" not in O.OPTIMIZERS

    from peft import IA3Config
    from shared.models import lora

    kind = lora.Adapter("ia3_in_test", "(IA)^3.", lambda spec, targets: IA3Config(target_modules=targets,
                                                                                  feedforward_modules=[]), "ia3_l")
    with lora.ADAPTERS.added(kind):
        cfg = resolve(train.Config, "train", {}, {"model": "builtin:tiny", "adapter_type": kind.name})
        parts = {p.name: p for p in planner.plan(cfg, (64, 64), 1).parts}
        unet = M.build_unet(cfg.unet, torch.device("cpu"))
    trained = [p for n, p in unet.named_parameters() if ".ia3_l" in n]
    assert trained and all(p.requires_grad for p in trained)
    assert parts["gradients"].bytes == sum(p.numel() * 4 for p in trained)


def test_plugin_optimizer_and_format_everywhere(plugin_env, tmp_path_factory):
    work = encode_sixteen(tmp_path_factory.mktemp("ext"))
    tmp = tmp_path_factory.mktemp("runs")
    helps = " ".join((sdxl(["train", "--help"], plugin_env).stdout + sdxl(["export", "--help"], plugin_env).stdout)
                     .split())
    assert all(f"{name}: " in helps for name in ("sgd_nesterov", "ia3_test", "l1_test", "kohya32")), helps
    assert "sgd_nesterov" not in subprocess.run([sys.executable, "-m", "stages.cli", "train", "--help"],
                                                capture_output=True, text=True, cwd=ROOT).stdout

    plan = sdxl(["train", "--model", "builtin:tiny", "--plan", "--optimizer", "sgd_nesterov", "--adapter-type",
                 "ia3_test", "--loss", "l1_test"], plugin_env)
    assert plan.returncode == 0, plan.stderr[-2000:]
    state = next(line for line in plan.stdout.splitlines() if "optimizer state" in line)
    assert state.split()[-1] == "sgd_nesterov"   # the bytes: test_plan_counts_what_the_entries_say

    whole = sdxl(train_args(work, tmp / "a"), plugin_env)
    assert whole.returncode == 0, whole.stderr[-2000:]
    killed = sdxl(train_args(work, tmp / "b"), plugin_env, fault="train.step:4")
    assert killed.returncode == -9
    again = sdxl(train_args(work, tmp / "b"), plugin_env)
    assert again.returncode == 0 and "resuming from" in again.stdout, again.stderr[-2000:]
    a, b = tmp / "a" / "checkpoints" / "step-000008", tmp / "b" / "checkpoints" / "step-000008"
    from safetensors.torch import load_file

    for name in ("weights", "optimizer"):
        ta, tb = load_file(str(a / f"{name}.safetensors")), load_file(str(b / f"{name}.safetensors"))
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    assert any("momentum_buffer" in k for k in load_file(str(a / "optimizer.safetensors")))
    weights = load_file(str(a / "weights.safetensors"))
    assert weights and all(".ia3_l" in k for k in weights)   # the adapter's parameters, and only them
    assert any(not torch.equal(v, torch.ones_like(v)) for v in weights.values())   # trained from (IA)^3's ones

    refused = sdxl(["export", "--in", str(tmp / "a"), "--out", str(tmp / "no"), "--format", "kohya32"], plugin_env)
    assert refused.returncode == 2 and "cannot hold" in refused.stderr and "ia3_test" in refused.stderr
    merged = sdxl(["export", "--in", str(tmp / "a"), "--out", str(tmp / "m"), "--device", "cpu"], plugin_env)
    assert merged.returncode == 0, merged.stderr[-2000:]   # no LoRA file holds it: a model format by default
    assert json.loads((tmp / "m" / "manifest.json").read_text())["formats"]["single-file"]["verified"]

    plain = sdxl(train_args(work, tmp / "c", adapter_type="lora", loss="l2", max_steps=3), plugin_env)
    assert plain.returncode == 0, plain.stderr[-2000:]
    export = sdxl(["export", "--in", str(tmp / "c"), "--out", str(tmp / "x"), "--format", "kohya32",
                   "--device", "cpu"], plugin_env)
    assert export.returncode == 0, export.stderr[-2000:]
    record = json.loads((tmp / "x" / "manifest.json").read_text())["formats"]["kohya32"]
    assert record["verified"] and record["plugin"] == "kohya32" and record["file"] == "sdxl.kohya32.safetensors"
    assert all(v.dtype == torch.float32 for v in load_file(str(tmp / "x" / record["file"])).values())
