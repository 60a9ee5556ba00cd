"""The training run: setup in named helpers, then the loop (`train_steps`), readable top to bottom.

One code path for one process and for N started by `torchrun` / `accelerate launch` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): with N > 1 a process group is made (NCCL on GPUs, gloo on CPU), the UNet is
wrapped in DistributedDataParallel, each rank streams its own shards, and rank 0 logs and saves.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from shared.core import artifacts, ranks
from shared.core.config import fingerprinted
from shared.core.errors import DataError, InputError
from shared.core.faults import checkpoint as fault_point
from shared.core.log import say, warn
from shared.core.stage import BuildResult
from stages.train import checkpoint as ckpt
from stages.train import data as D
from stages.train import logs, model as M, objective, step as S


@dataclass
class Run:
    cfg: Any
    staging: Path
    rank: ranks.Rank
    device: torch.device
    record: dict                       # fingerprinted config + inputs, stored in each checkpoint
    data: Any = None
    schedule: Any = None
    unet: Any = None
    model: Any = None                  # the UNet, or its DDP wrapper
    params: list = field(default_factory=list)
    opt: Any = None
    ema: Any = None
    scaler: Any = None
    sigmas: Any = None
    state: dict = field(default_factory=lambda: {"step": 0, "bad_in_row": 0, "skipped": 0, "eval": []})
    eval_set: list = field(default_factory=list)
    log: Any = None

    def barrier(self) -> None:
        if self.rank.world > 1:
            torch.distributed.barrier()


@dataclass
class Data:
    folder: Path
    index: dict
    infos: list
    read: Any
    empty: dict


def open_data(cfg: Any) -> Data:
    manifest = D.require_encode(cfg.input)
    index, infos = D.read_index(cfg.input, manifest)
    source = cfg.source if cfg.source != "auto" else ("wds" if index["format"] in ("wds", "both") else "zarr")
    if source == "wds" and index["format"] == "zarr" or source == "zarr" and index["format"] == "wds":
        raise InputError(f"{cfg.input}: encode wrote format {index['format']}, so --source {source} cannot be read")
    urls: dict[int, str] = {}
    if cfg.shards:
        if source == "zarr":
            raise InputError("--shards lists tar shards; it cannot be used with --source zarr")
        urls = D.match_urls(infos, D.expand_urls(cfg.shards))
        if len(urls) < len(infos):
            say(f"train: reading {len(urls)} of the {len(infos)} shards of {cfg.input} (those given by --shards)")
        infos, urls = D.select(infos, urls)
    return Data(Path(cfg.input), index, infos, D.ShardReader(cfg.input, infos, source, urls),
                D.load_empty(cfg.input, manifest))


def check_shapes(unet: Any, index: dict, where: Path) -> None:
    c = unet.config
    want = {"latent channels": (c.in_channels, index["latent_channels"]),
            "text width": (c.cross_attention_dim, index["te_dim"]),
            "pooled + time ids width": (c.projection_class_embeddings_input_dim,
                                        index["pooled_dim"] + 6 * c.addition_time_embed_dim)}
    bad = [f"{k}: UNet {a}, shards {b}" for k, (a, b) in want.items() if a != b]
    if bad:
        raise InputError(f"{where}: the shards do not fit this UNet ({'; '.join(bad)}); encode with this model")


def setup(run: Run) -> None:
    cfg = run.cfg
    run.data = open_data(cfg)
    run.schedule = D.Schedule.make(run.data.infos, run.rank.world, cfg.seed, cfg.batch_size, cfg.accumulate,
                                   cfg.epochs, cfg.max_steps)
    run.unet = M.build_unet(cfg, run.device)
    torch.manual_seed(cfg.seed + run.rank.rank)  # the global generator drives LoRA dropout only
    check_shapes(run.unet, run.data.index, run.data.folder)
    run.params = M.trainable(run.unet)
    run.opt = M.make_optimizer(cfg, run.params)
    run.ema = M.EMA(run.params, cfg.ema_decay) if cfg.ema_decay else None
    run.scaler = torch.amp.GradScaler(run.device.type) if cfg.mixed_precision == "fp16" else None
    run.sigmas = objective.schedule(cfg.schedule).float().to(run.device)
    start = ckpt.resolve_resume(cfg.resume, run.staging, run.rank.main)
    if start is not None:
        restore(run, start)
    run.model = run.unet
    if run.rank.world > 1:
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(run.unet, device_ids=ids)
    if run.rank.main:
        run.eval_set = eval_samples(run)
        run.log = logs.TrainLog(cfg, run.staging / "logs", run.schedule.total, run.state["step"],
                                cfg.batch_size * cfg.accumulate * run.rank.world)


def eval_samples(run: Run) -> list[dict]:
    out: list[dict] = []
    for info in run.data.infos:
        for _, sample in run.data.read(info.number):
            if len(out) == run.cfg.eval_samples:
                return out
            out.append(sample)
    return out


def restore(run: Run, folder: Path) -> None:
    saved = ckpt.check_resumable(folder, run.record, run.cfg.force_resume)
    if run.ema is not None and (folder / "ema.safetensors").is_file():
        M.load_weights_state(run.unet, run.cfg, ckpt.read_tensors(folder / "ema.safetensors"))
        run.ema.take_from_params()
    M.load_weights_state(run.unet, run.cfg, ckpt.read_tensors(folder / "weights.safetensors"))
    M.load_optimizer_state(run.opt, ckpt.read_tensors(folder / "optimizer.safetensors"),
                           ckpt.read_json(folder / "optimizer.json"))
    state = ckpt.read_json(folder / "state.json")
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    run.state.update(state["loop"])
    if not ckpt.restore_rng(folder, run.rank.rank, run.device):
        warn(f"{folder} has no RNG state of rank {run.rank.rank}; LoRA dropout draws will differ")
    if run.rank.main:
        say(f"train: resuming from {folder} (step {saved['step']} of {run.schedule.total})")


def micro_batches(run: Run) -> Iterator[tuple[list[dict], int, int]]:
    """(samples, step, micro-batch index) from the current position to the end of the schedule."""
    cfg, sched = run.cfg, run.schedule
    epoch, in_epoch = sched.locate(run.state["step"])
    base = sum(sched.steps[:epoch])
    for e in range(epoch, len(sched.steps)):
        plan = D.epoch_plan(run.data.infos, run.rank.rank, run.rank.world, cfg.seed, e, cfg.batch_size,
                            cfg.shuffle_buffer)[:sched.steps[e] * cfg.accumulate]
        first = in_epoch * cfg.accumulate if e == epoch else 0
        for i, samples in enumerate(D.stream_batches(plan[first:], run.data.read), start=first):
            yield samples, base + i // cfg.accumulate, i % cfg.accumulate
        base += sched.steps[e]


def train_steps(run: Run) -> None:
    cfg, total = run.cfg, run.schedule.total
    # the reader thread only reads and decodes (numpy); tensors are made here, because torch ops in a second
    # thread start a second OpenMP team that competes with the step (measured: 3x slower steps on 2 cores)
    batches = D.prefetch(micro_batches(run), cfg.prefetch)
    window = Window(run.device)
    for step in range(run.state["step"], total):
        lr = objective.learning_rate(step, cfg.learning_rate, total, cfg.warmup_steps, cfg.lr_schedule)
        for group in run.opt.param_groups:
            group["lr"] = lr
        for micro in range(cfg.accumulate):
            batch = S.assemble(*next(batches), run.data.empty, cfg).to(run.device)
            with sync(run, last=micro == cfg.accumulate - 1):
                loss, per_sample, u = S.loss(run.model, batch, cfg, run.sigmas)
                backward(run, loss / cfg.accumulate)
            window.add(loss.detach(), per_sample, u)
        norm = optimizer_step(run, step, loss.detach())
        run.state["step"] = step + 1
        fault_point("train.step")
        window.norm = norm
        if run.log is not None:
            run.log.step(step + 1, float(loss.detach()), lr)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total:
            report(run, step + 1, window.reduce(run.rank.world), lr)
            window = Window(run.device)
        if (step + 1) % cfg.checkpoint_every == 0 or step + 1 == total:
            save(run)


def sync(run: Run, last: bool) -> Any:
    """DDP all-reduces gradients only on the last micro-batch of a step."""
    if run.model is run.unet or last:
        return contextlib.nullcontext()
    return run.model.no_sync()


def backward(run: Run, loss: torch.Tensor) -> None:
    (run.scaler.scale(loss) if run.scaler is not None else loss).backward()


def optimizer_step(run: Run, step: int, loss: torch.Tensor) -> float:
    """Clip, then step — unless the loss or the gradient is not finite: then the step is skipped and counted,
    and `max_bad_steps` such steps in a row stop the run with an error."""
    cfg = run.cfg
    if run.scaler is not None:
        run.scaler.unscale_(run.opt)
    norm = torch.nn.utils.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf"))
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.device)
    if run.rank.world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() or (run.scaler is None and not torch.isfinite(norm)):
        run.opt.zero_grad(set_to_none=True)
        run.state["skipped"] += 1
        run.state["bad_in_row"] += 1
        if run.rank.main:
            warn(f"step {step + 1}: non-finite loss or gradient (loss {float(loss):.4g}, grad norm "
                 f"{float(norm):.4g}); step skipped ({run.state['skipped']} so far)")
        if run.state["bad_in_row"] >= cfg.max_bad_steps:
            raise DataError(f"{run.state['bad_in_row']} steps in a row had a non-finite loss or gradient (last at "
                            f"step {step + 1}); lower the learning rate, use --mixed-precision bf16 instead of "
                            f"fp16, or check the shards (latents from an fp16 VAE overflow)")
        return float(norm)
    if run.scaler is not None:
        run.scaler.step(run.opt)
        run.scaler.update()
    else:
        run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.state["bad_in_row"] = 0
    if run.ema is not None:
        run.ema.update(step)
    return float(norm)


class Window:
    """Loss statistics between two log lines (summed over ranks when written)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2 + 2 * logs.BINS, dtype=torch.float64, device=device)
        self.norm = 0.0

    def add(self, loss: torch.Tensor, per_sample: torch.Tensor, u: torch.Tensor) -> None:
        self.sums[0] += loss.double()
        self.sums[1] += 1
        bins = (u.to(self.sums.device) * logs.BINS).long().clamp(0, logs.BINS - 1)
        self.sums[2:2 + logs.BINS].index_add_(0, bins, per_sample.double())
        self.sums[2 + logs.BINS:].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float64))

    def reduce(self, world: int) -> dict:
        if world > 1:
            torch.distributed.all_reduce(self.sums)
        s = self.sums.cpu()
        counts = s[2 + logs.BINS:]
        bins = [float(s[2 + i] / counts[i]) if counts[i] > 0 else None for i in range(logs.BINS)]
        return {"loss": float(s[0] / max(s[1], 1)), "grad_norm": self.norm, "bins": bins}


def report(run: Run, step: int, stats: dict, lr: float) -> None:
    if run.log is not None:
        run.log.write(step, {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                             "skipped_steps": run.state["skipped"]}, stats["bins"])


def save(run: Run) -> None:
    cfg, step = run.cfg, run.state["step"]
    if run.rank.main and run.eval_set:
        value = S.evaluate(run.unet, run.eval_set, cfg, run.sigmas, run.device)
        run.state["eval"].append([step, value])
        run.log.note(step, "eval_loss", value)
    epoch, _ = run.schedule.locate(step)

    def files(folder: Path) -> None:
        meta = {"format": "sdxl-stages", "method": cfg.method,
                "lora": M.lora_spec(cfg).to_json() if cfg.method == "lora" else ""}
        ckpt.write_tensors(folder / "weights.safetensors", M.weights_state(run.unet, cfg), meta)
        if run.ema is not None:
            with run.ema.swapped():
                ckpt.write_tensors(folder / "ema.safetensors", M.weights_state(run.unet, cfg), meta)
        tensors, opt_meta = M.optimizer_state(run.opt)
        ckpt.write_tensors(folder / "optimizer.safetensors", tensors)
        (folder / "optimizer.json").write_text(M.dumps(opt_meta), encoding="utf-8")
        state = {"loop": run.state, "epoch": epoch, "scaler": M.scaler_state(run.scaler)}
        (folder / "state.json").write_text(M.dumps(state), encoding="utf-8")

    manifest = {"step": step, "epoch": epoch,
                "fingerprint": artifacts.hash_json(run.record), "created": artifacts.now(), **run.record,
                "method": cfg.method, "lora": M.lora_spec(cfg).__dict__ if cfg.method == "lora" else None,
                "model": cfg.model, "weights_dtype": cfg.weights_dtype}
    ckpt.save(run.staging / "checkpoints", step, run.rank.rank, run.rank.main, run.barrier,
              ckpt.rng_state(run.device), files, manifest, cfg.keep_checkpoints)


def record(cfg: Any, inputs: dict) -> dict:
    return {"config": fingerprinted(cfg), "inputs": {k: v["fingerprint"] for k, v in inputs.items()}}


def result(run: Run, started: float) -> BuildResult:
    cfg, index = run.cfg, run.data.index
    buckets = sorted(([*b["bucket"], b["samples"]] for b in index["buckets"]), key=lambda b: -b[2])
    evals = run.state["eval"]
    extra = {"final_checkpoint": f"checkpoints/{ckpt.folder_name(run.schedule.total)}",
             "steps": run.schedule.total, "epochs": round(run.schedule.total / max(run.schedule.steps[0], 1), 4),
             "steps_per_epoch": list(run.schedule.steps[:3]), "skipped_steps": run.state["skipped"],
             "eval_loss": {"first": evals[0] if evals else None, "last": evals[-1] if evals else None,
                           "history": evals},
             "tag_frequency": index.get("tag_frequency", {}), "resolution": buckets[0][:2] if buckets else None,
             "buckets": buckets, "comment": cfg.comment, "seconds": round(time.monotonic() - started, 1)}
    per_step = cfg.batch_size * cfg.accumulate * run.rank.world
    occurrences = sum(sum(i.repeats) for i in run.data.infos)
    extra["epoch_samples"] = occurrences  # per epoch, counting repeats
    extra["epoch_unused"] = occurrences - run.schedule.steps[0] * per_step  # first epoch's remainder, not trained
    return BuildResult({"in": index["samples"], "out": run.schedule.total, "dropped": {},
                        "samples_trained": run.schedule.total * per_step}, extra)


def eval_at_start(run: Run) -> None:
    if run.rank.main and run.eval_set and not run.state["eval"]:
        value = S.evaluate(run.unet, run.eval_set, run.cfg, run.sigmas, run.device)
        run.state["eval"].append([0, value])
        run.log.note(0, "eval_loss", value)


def init_distributed(rank: ranks.Rank, device: torch.device) -> bool:
    if rank.world == 1 or torch.distributed.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def build(cfg: Any, staging: Path, inputs: dict) -> BuildResult | None:
    rank = ranks.current()
    device = torch.device(ranks.device(cfg.device, rank.local))
    made_group = init_distributed(rank, device)
    started = time.monotonic()
    run = Run(cfg, staging, rank, device, record(cfg, inputs))
    try:
        setup(run)
        eval_at_start(run)
        train_steps(run)
        if run.log is not None:
            run.log.close()
        run.barrier()
        return result(run, started) if rank.main else None
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
