"""The train stage end to end on builtin:tiny: outputs and learning, exact resume after kill -9, refusing
changed configs and mismatched encoders, tar / zarr / URL sources agreeing, the NaN guard, precision options,
and 2 DDP ranks against 1 process with the doubled batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shared.core import integrity
from shared.models import loading as models
from shared.formats import shards
from shared.core.config import resolve
from shared.core.errors import ConfigError, DataError, InputError
from stages import train
from stages.cli import app
from tests.conftest import encode_sixteen

ROOT = Path(__file__).resolve().parents[1]
BASE = {"model": "builtin:tiny", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 6, "checkpoint_every": 3,
        "learning_rate": 3e-3, "eval_samples": 2, "lora_rank": 4, "lora_alpha": 4.0}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """16 captioned images of one size -> one 128x128 bucket, 4 shards of 4, tar + zarr, flipped latents."""
    return encode_sixteen(tmp_path_factory.mktemp("train"))


def run_train(work: Path, out: Path, **kw):
    return train.run(resolve(train.Config, "train", {}, {"workdir": work, "output": out, **{**BASE, **kw}}))


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def sdxl(args: list[str], env: dict | None = None, prefix: list[str] | None = None) -> subprocess.CompletedProcess:
    cmd = (prefix or [sys.executable, "-m"]) + ["stages.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1", **(env or {})})


def cli_args(work: Path, out: Path, **kw) -> list[str]:
    args = ["train", "--workdir", str(work), "--out", str(out)]
    for k, v in {**BASE, **kw}.items():
        flag = k.replace('_', '-')
        args += [f"--{flag}" if v is True else f"--no-{flag}"] if isinstance(v, bool) else [f"--{flag}", str(v)]
    return args


def test_config_groups_declare_each_option_once_and_are_typed_views_of_the_flat_keys():
    """Each option is declared once, in one group beside the code that uses it; the flat config is composed of
    the groups (the CLI / TOML contract and the fingerprint), and makes each group back as a typed view."""
    from dataclasses import fields
    from functools import cached_property

    from shared.core.config import fingerprinted
    from shared.core.groups import owned

    cfg = resolve(train.Config, "train", {}, {**BASE, "lr_schedule": "polynomial", "lr_power": 2.0, "dora": True})
    flat = [f.name for f in fields(cfg)]
    declared = [f.name for group in dict.fromkeys(train.Config.GROUP_OF.values()) for f in owned(group)]
    assert sorted(declared) == sorted(flat) and len(set(declared)) == len(declared)   # each option once
    groups = ("objective", "unet", "optim", "offload", "data", "checkpointing", "logging", "previews", "holdout_set",
              "vae_target", "text")
    for name in groups:
        group = getattr(cfg, name)
        assert getattr(cfg, name) is group  # made once
        for f in fields(group):
            derived = isinstance(getattr(type(cfg), f.name, None), (property, cached_property))  # adapter, ...
            assert f.name in flat or derived, (name, f.name)
            assert getattr(group, f.name) == getattr(cfg, f.name)
    assert cfg.unet.adapter.dora and cfg.unet.adapter.rank == 4 and cfg.optim.lr_power == 2.0
    assert resolve(train.Config, "train", {}, {**BASE, "method": "full"}).adapter is None
    assert train.Config.GROUP_OF["learning_rate"].__name__ == "OptimizerConfig"
    assert train.Config.GROUP_OF["seed"].__name__ == "ObjectiveConfig"   # borrowed by the others that read it
    assert set(fingerprinted(cfg)) < set(flat) and "learning_rate" in fingerprinted(cfg)
    with pytest.raises(ConfigError, match="lr_end 0.01 must be below learning_rate 0.003"):
        resolve(train.Config, "train", {}, {**BASE, "lr_schedule": "polynomial", "lr_end": 0.01})


def test_lora_training_writes_checkpoints_logs_and_learns(encoded, tmp_path):
    out = tmp_path / "t"
    m = run_train(encoded, out, max_steps=12, keep_checkpoints=2, lora_preset="attn+conv", dora=True)
    assert m.counts["out"] == 12 and m.extra["final_checkpoint"] == "checkpoints/step-000012"
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == ["step-000009", "step-000012"]
    final = out / "checkpoints" / "step-000012"
    weights = tensors(final / "weights.safetensors")
    assert weights and all(k.startswith("unet.") and ".lora_" in k for k in weights)
    assert any(k.endswith("lora_magnitude_vector") for k in weights)          # DoRA
    assert any(".resnets." in k and k.endswith("conv1.lora_A.weight") for k in weights)  # attn+conv
    man = json.loads((final / "manifest.json").read_text())
    assert man["step"] == 12 and man["lora"]["rank"] == 4 and man["config"]["learning_rate"] == 3e-3
    assert set(man["files"]) == {"weights.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
                                 "scaler.json", "progress.json", "rng-rank0.safetensors", "rng-rank0.json"}
    assert json.loads((final / "progress.json").read_text())["step"] == 12
    assert json.loads((final / "scheduler.json").read_text())["step"] == 12
    history = m.extra["eval_loss"]["history"]
    assert [h[0] for h in history] == [0, 3, 6, 9, 12]
    assert history[-1][1] < 0.9 * history[0][1], history  # learning: lower loss on fixed noise and timesteps
    rows = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 12]
    assert {"lr", "grad_norm", "samples_per_s", "loss_t00"} <= set(train_rows[0]) or "lr" in train_rows[0]
    assert list((out / "logs" / "tensorboard").glob("events.out.tfevents.*"))
    assert m.extra["tag_frequency"]["common"] == 16 and m.extra["resolution"] == [128, 128]


RESUMED = {
    "dropout-ema-vpred": dict(lora_dropout=0.2, ema_decay=0.9, caption_dropout=0.3, noise_offset=0.05,
                              min_snr_gamma=5.0, prediction="v_prediction", schedule="novelai", accumulate=2,
                              timesteps="logit_normal"),
    "restarts-warmup-fp16": dict(lr_schedule="cosine_with_restarts", lr_cycles=2, warmup_steps=2,
                                 mixed_precision="fp16", ema_decay=0.5),
    # issue 12: each optimizer's state through the checkpoint; the bf16 rounding keyed by step, not by a generator
    "adafactor-full-fused-ema-cpu": dict(optimizer="adafactor", method="full", fused_backward=True,
                                         max_grad_norm=0.0, learning_rate=1e-4, ema_decay=0.9, ema_device="cpu",
                                         ema_every=2),
    "sr-kahan-adamw-bf16-full": dict(method="full", weights_dtype="bfloat16", mixed_precision="bf16",
                                     kahan_summation=True, learning_rate=1e-5, adapter_lr=1.0),
    "adamw8bit-per-group-lr": dict(optimizer="adamw8bit", adapter_lr=1e-2, lora_dropout=0.2),
    "schedulefree": dict(optimizer="schedulefree_adamw", warmup_steps=2),
    "prodigy": dict(optimizer="prodigy", learning_rate=1.0),
    # issue 24: 16 samples in batches of 3: each epoch ends with a batch of 1 (a bucket's remainder, scaled)
    "bucket-remainder-batch3": dict(batch_size=3),
    # issue 12: memory savers under kill -9 (fp8 base, swapped blocks stepped on the host, offloaded activations)
    "fp8-base-swap-offload": dict(quantize_base="fp8", blocks_to_swap=6, activation_offload=True, lora_dropout=0.2,
                                  gradient_checkpointing=True, ema_decay=0.9),
}


@pytest.fixture(scope="module")
def uninterrupted(encoded, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted 8-step run of every RESUMED case, one after the other in ONE process started as the CLI
    is (a process's start, ~6 s of imports, costs more than a tiny run); the resumed runs, each in its own
    process, must still equal them bitwise, which also shows that runs in one process leave nothing to the next."""
    root = tmp_path_factory.mktemp("uninterrupted")
    runs = {case: cli_args(encoded, root / case, max_steps=8, **opts) for case, opts in RESUMED.items()}
    script = ("import json, logging, sys\nfrom stages.cli import app\n"
              "logging.getLogger('bitsandbytes').setLevel(logging.ERROR)\n"
              "for args in json.loads(sys.argv[1]):\n"
              "    try:\n        app(args, standalone_mode=False)\n"
              "    except SystemExit as e:\n        assert not e.code, (args, e.code)\n")
    done = subprocess.run([sys.executable, "-c", script, json.dumps(list(runs.values()))], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, "SDXL_PROGRESS": "0", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return {case: root / case for case in runs}


@pytest.mark.parametrize("case", list(RESUMED))
def test_kill_9_then_resume_equals_the_uninterrupted_run(encoded, uninterrupted, tmp_path, case):
    """Kill -9 after step 4 (checkpoint at 3), rerun: weights, EMA, optimizer, LR schedule, scaler, progress and
    RNG state at step 8 are bitwise those of a run never interrupted — with LoRA dropout (global RNG), EMA,
    caption dropout, flips, noise offset, min-SNR, v-prediction on the NovelAI schedule, and 2 accumulated
    micro-batches; and with warmup into a cosine schedule with restarts under fp16 with its gradient scaler."""
    opts = dict(max_steps=8, **RESUMED[case])
    killed = sdxl(cli_args(encoded, tmp_path / "b", **opts), env={"SDXL_FAULT": "train.step:4"})
    assert killed.returncode == -9
    assert not (tmp_path / "b").exists()
    assert [p.name for p in (tmp_path / "b.staging" / "checkpoints").iterdir()] == ["step-000003"]
    again = sdxl(cli_args(encoded, tmp_path / "b", **opts))
    assert again.returncode == 0, again.stderr[-2000:]
    assert "resuming from" in again.stdout and "step 3 of 8" in again.stdout
    a, b = uninterrupted[case] / "checkpoints" / "step-000008", tmp_path / "b" / "checkpoints" / "step-000008"
    for name in ("weights", "ema", "optimizer", "rng-rank0"):
        if name == "ema" and not opts.get("ema_decay"):
            continue
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name
    # (rng-rank0.json holds Python's and NumPy's generators: nothing in training seeds or draws from them, so
    # two processes differ there; the torch generator, which LoRA dropout draws from, is compared above)
    for name in ("optimizer", "scheduler", "scaler", "progress"):
        assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text()), name
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())   # issue 24: the time of both parts
    parts = manifest["parts"]
    assert [(p["from_step"], p["to_step"]) for p in parts] == [(0, 3), (3, 8)] and parts[0]["seconds"] > 0
    assert manifest["seconds"] == round(sum(p["seconds"] for p in parts), 1)


def test_train_says_its_plan_and_what_a_dropped_remainder_leaves_out(encoded):
    """Issue 24: the plan line train prints before the first step; 16 samples in batches of 3 leave one sample an
    epoch untrained only when the remainder is dropped (said, with the reason)."""
    from stages.train import feed

    def described(remainder):
        cfg = resolve(train.Config, "train", {}, {"workdir": encoded, **BASE, "batch_size": 3,
                                                   "bucket_remainder": remainder})
        data = feed.open_data(cfg.data)
        return feed.describe(data, feed.plan(data, cfg.data, 1), cfg.data, 1)

    line, unused = described("drop")
    assert unused == 1 and "6 steps (2 epochs of 5 steps, batch 3) over 16 samples per epoch" in line
    assert "1 of them are not trained in the first epoch: the buckets' remainders are dropped" in line
    line, unused = described("train")
    assert unused == 0 and line.startswith("6 steps (1 epoch of 6 steps, batch 3)") and "smaller batch" in line


def test_changed_config_on_resume_is_refused_unless_forced(encoded, tmp_path):
    out = tmp_path / "t"
    killed = sdxl(cli_args(encoded, out), env={"SDXL_FAULT": "train.step:4"})
    assert killed.returncode == -9
    refused = sdxl(cli_args(encoded, out, learning_rate=1e-3))
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "learning_rate 0.003 -> 0.001" in refused.stderr and "--force-resume" in refused.stderr
    forced = sdxl(cli_args(encoded, out, learning_rate=1e-3) + ["--force-resume"])
    assert forced.returncode == 0, forced.stderr[-2000:]
    assert "resuming from" in forced.stdout
    # a finished run's checkpoints (now recording learning_rate 0.001) as an explicit starting point
    explicit = sdxl(cli_args(encoded, tmp_path / "u", learning_rate=5e-4) + ["--resume", str(out)])
    assert explicit.returncode == 2 and "learning_rate 0.001 -> 0.0005" in explicit.stderr


def test_resume_never_sets_the_unfinished_run_aside(encoded, tmp_path):
    out = tmp_path / "t"
    assert sdxl(cli_args(encoded, out), env={"SDXL_FAULT": "train.step:4"}).returncode == -9
    again = sdxl(cli_args(encoded, out, learning_rate=1e-3) + ["--resume", "never"])
    assert again.returncode == 0, again.stderr[-2000:]
    aside = list(tmp_path.glob("t.unfinished-*"))
    assert len(aside) == 1 and (aside[0] / "checkpoints" / "step-000003" / "manifest.json").is_file()


def test_tar_zarr_and_shard_urls_train_identically(encoded, tmp_path):
    run_train(encoded, tmp_path / "wds", max_steps=4, source="wds")
    run_train(encoded, tmp_path / "zarr", max_steps=4, source="zarr")
    pattern = f"pipe:cat {encoded / 'encode' / 'shards' / '128x128'}/{{000000..000003}}.tar"
    run_train(encoded, tmp_path / "url", max_steps=4, shards=(pattern,))
    ref = tmp_path / "wds" / "checkpoints" / "step-000004" / "weights.safetensors"
    for other in ("zarr", "url"):
        assert same_tensors(ref, tmp_path / other / "checkpoints" / "step-000004" / "weights.safetensors"), other


def test_shards_of_other_encoders_are_refused(encoded, tmp_path):
    folder = models.save_folder({k: getattr(models.load_model("builtin:tiny"), k) for k in
                                 ("unet", "vae", "text_encoder", "text_encoder_2")}, tmp_path / "other")
    with pytest.raises(InputError) as e:
        run_train(encoded, tmp_path / "t", model=str(folder))
    assert "builtin:tiny" in str(e.value) and str(folder) in str(e.value) and "--allow-encoder-mismatch" in str(e.value)
    cfg = resolve(train.Config, "train", {}, {"workdir": encoded, "model": str(folder), "allow_encoder_mismatch": True})
    assert train._inputs(cfg)["model"]["name"] == str(folder)


def poisoned_copy(encoded: Path, dest: Path, rows: list[int]) -> Path:
    shutil.copytree(encoded / "encode", dest / "encode")
    store = shards.open_store(dest / "encode" / "zarr", mode="a")
    lat = store["128x128"]["latent"]
    for r in rows:
        lat[r] = np.full(lat.shape[1:], np.nan, lat.dtype)
    rerecord(dest / "encode")
    return dest


def rerecord(folder: Path) -> None:
    """Record an edited zarr store as if encode had written it so (its digests in index.json, index.json's hash
    in the manifest): data that is bad as encoded, not damaged afterwards."""
    index = json.loads((folder / "index.json").read_text())
    store = shards.open_store(folder / "zarr", mode="r")
    for b in index["buckets"]:
        g = store[f"{b['bucket'][0]}x{b['bucket'][1]}"]
        for s in b["shards"]:
            lo, hi = s["first"], s["first"] + s["samples"]
            s["zarr_sha256"] = shards.zarr_digest({n: np.asarray(g[n][lo:hi]) for n in g.array_keys()},
                                                  list(g.attrs["keys"][lo:hi]))
    (folder / "index.json").write_text(json.dumps(index, indent=1) + "\n")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["index.json"] = integrity.file_record(folder / "index.json")
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


def test_nan_steps_are_skipped_counted_and_stop_the_run_when_persistent(encoded, tmp_path):
    some = poisoned_copy(encoded, tmp_path / "some", [0])
    m = run_train(some, tmp_path / "some" / "train", source="zarr", max_steps=8, flip_rate=0.0)
    assert 1 <= m.extra["skipped_steps"] < 8
    weights = tensors(tmp_path / "some" / "train" / "checkpoints" / "step-000008" / "weights.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    every = poisoned_copy(encoded, tmp_path / "all", list(range(16)))
    with pytest.raises(DataError, match="3 steps in a row"):
        run_train(every, tmp_path / "all" / "train", source="zarr", flip_rate=0.0, max_bad_steps=3)


def test_full_finetune_in_bf16_moves_the_weights_at_lr_1e_6(encoded, tmp_path):
    """bf16 weights without float32 master copies: at lr 1e-6 an AdamW update (about lr per step) is far below
    bf16's resolution at most weights' magnitude. Rounded to nearest, nearly every weight stays as it was;
    rounded stochastically, the weights move (each by one ulp with probability update / ulp)."""
    unet = models.load_model("builtin:tiny", ("unet",)).unet
    before = {k: v.to(torch.bfloat16) for k, v in unet.state_dict().items()}
    moved = {}
    for rounding in (True, False):
        out = tmp_path / f"sr-{rounding}"
        m = run_train(encoded, out, method="full", weights_dtype="bfloat16", mixed_precision="bf16", max_steps=8,
                      learning_rate=1e-6, gradient_checkpointing=True, stochastic_rounding=rounding, eval_samples=0)
        weights = tensors(out / "checkpoints" / "step-000008" / "weights.safetensors")
        assert set(weights) == {"unet." + k for k in before} and m.extra["skipped_steps"] == 0
        assert all(v.dtype == torch.bfloat16 for v in weights.values())
        changed = sum(int((weights["unet." + k] != v).sum()) for k, v in before.items())
        moved[rounding] = changed / sum(v.numel() for v in before.values())
    assert moved[True] > 0.03 and moved[True] > 4 * moved[False], moved  # seen: 6.4 % and 1.1 %


def test_fp16_autocast_with_gradient_scaler(encoded, tmp_path):
    m = run_train(encoded, tmp_path / "t", mixed_precision="fp16", max_steps=3)
    scaler = json.loads((tmp_path / "t" / "checkpoints" / "step-000003" / "scaler.json").read_text())
    assert scaler["scale"] > 0 and m.counts["out"] == 3


def test_user_errors_are_one_line(encoded, tmp_path, runner):
    missing = runner.invoke(app, ["train", "--workdir", str(tmp_path), "--model", "builtin:tiny"])
    assert missing.exit_code == 2 and "no `encode` output found" in missing.output
    big = runner.invoke(app, cli_args(encoded, tmp_path / "t", batch_size=64, bucket_remainder="drop"))
    assert big.exit_code == 2 and "no full step" in big.output and "--bucket-remainder train" in big.output
    eps = runner.invoke(app, cli_args(encoded, tmp_path / "t", schedule="ztsnr"))
    assert eps.exit_code == 2 and "v_prediction" in eps.output


def test_two_ddp_ranks_match_one_process_with_the_doubled_batch(encoded, tmp_path):
    """What is compared: the LoRA weights (UNet and both text encoders) and their EMA after 4 optimizer steps.
    With shards of 4 samples, batch 4 per rank, shuffle buffer 1 and one bucket, the 2 ranks' batches at each
    step are together exactly the 1-process batch of 8 (rank r reads shards r, r+2, ... of the epoch's order);
    per-sample noise and timesteps are keyed by sample and step, so both runs see the same draws, and DDP
    averages the ranks' UNet gradients (the text encoders': one all-reduce) as one process's mean over 8 does.
    Equal up to float summation order. Rank 0 saves; were rank 1's text encoders to drift from rank 0's, its
    UNet gradients, and so the averaged UNet weights, would differ too."""
    opts = dict(max_steps=4, shuffle_buffer=1, lora_dropout=0.0, learning_rate=1e-2, eval_samples=0,
                train_text_encoder="both", ema_decay=0.5)
    one = sdxl(cli_args(encoded, tmp_path / "one", batch_size=8, **opts))
    assert one.returncode == 0, one.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29573",
                "-m"]
    two = sdxl(cli_args(encoded, tmp_path / "two", batch_size=4, **opts), prefix=torchrun)
    assert two.returncode == 0, two.stderr[-3000:]
    half = sdxl(cli_args(encoded, tmp_path / "half", batch_size=4, **opts))  # control: one rank's data only
    assert half.returncode == 0, half.stderr[-2000:]
    a, b, c = ({**tensors(tmp_path / name / "checkpoints" / "step-000004" / "weights.safetensors"),
                **{"ema." + k: v for k, v in
                   tensors(tmp_path / name / "checkpoints" / "step-000004" / "ema.safetensors").items()}}
               for name in ("one", "two", "half"))
    assert a.keys() == b.keys()
    for prefix in ("unet.", "text_encoder.", "text_encoder_2.", "ema.text_encoder_2."):
        moved = max(float(v.abs().max()) for k, v in a.items() if k.startswith(prefix) and "lora_B" in k)
        assert moved > 1e-3, prefix  # the weights really changed (lora_B starts at 0)
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    control = max(float((a[k] - c[k]).abs().max()) for k in a)
    # seen: 5.0e-6 vs 7.9e-2 (transformers 5.17), 4.4e-5 vs 7.9e-2 (5.25: a text encoder 2 lora_A, AdamW at
    # lr 1e-2 amplifying float summation order); without the text encoders' all-reduce: 3.5e-2
    assert worst < 1e-4 and control > 100 * worst, (worst, control)


def test_block_swap_and_activation_offload_train_exactly_as_without(encoded, tmp_path):
    """Full fine-tune through the train stage: with 13 of the 14 blocks swapped (stepped by AdamW on the host)
    and the activations offloaded, the weights, optimizer state and evaluation losses are bitwise the plain
    run's."""
    opts = dict(method="full", max_steps=2, checkpoint_every=2, learning_rate=1e-4, accumulate=2, eval_samples=1)
    a = run_train(encoded, tmp_path / "plain", **opts)
    b = run_train(encoded, tmp_path / "swap", blocks_to_swap=13, activation_offload=True, **opts)
    assert a.extra["eval_loss"]["history"] == b.extra["eval_loss"]["history"]
    for name in ("weights", "optimizer"):
        assert same_tensors(tmp_path / "plain" / "checkpoints" / "step-000002" / f"{name}.safetensors",
                            tmp_path / "swap" / "checkpoints" / "step-000002" / f"{name}.safetensors"), name


def test_a_lora_on_a_quantized_base_exports_as_one_on_the_plain_base(encoded, tmp_path):
    """An fp8 base: the LoRA checkpoint has the plain run's keys, shapes and dtypes (float32), and its kohya export
    the same names and shapes (nf4 / int8 keep the same LoRA keys: tests/test_quant.py)."""
    from stages import export

    files = {}
    for kind in ("no", "fp8"):
        run_train(encoded, tmp_path / kind, max_steps=2, quantize_base=kind, eval_samples=0)
        export.run(export.Config(input=tmp_path / kind, output=tmp_path / f"e-{kind}", device="cpu",
                                 format=("kohya",)))
        weights = tensors(tmp_path / kind / "checkpoints" / "step-000002" / "weights.safetensors")
        kohya = tensors(next((tmp_path / f"e-{kind}").glob("*.safetensors")))
        files[kind] = ({k: (v.shape, v.dtype) for k, v in weights.items()},
                       {k: (v.shape, v.dtype) for k, v in kohya.items()})
    assert files["fp8"] == files["no"]
    assert all(dtype == torch.float32 for _, dtype in files["no"][0].values())
