"""The training run: `build_run` makes it whole (data, target, optimizer state, resume), then the loop
(`train_steps`), readable top to bottom.

One code path for one process and for N started by `torchrun` / `accelerate launch` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): with N > 1 a process group is made (NCCL on GPUs, gloo on CPU), the target's
module is wrapped in DistributedDataParallel (or sharded with FSDP2, sharding.py), each rank streams its own
shards, and rank 0 logs and saves. What is trained is a `Target` (targets.py: the UNet; vae.py: the VAE); the
memory savers of offload.py wrap its forward and backward pass.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from shared.core import ranks
from shared.core.config import to_plain
from shared.core.faults import checkpoint as fault_point
from shared.core.log import say, warn
from shared.core.stage import BuildResult
from stages.train import checkpoint as ckpt
from stages.train import data as D
from stages.train import extend, feed, holdout as H, logs, lorafiles, optim as O, sharding, step as S
from stages.train.stepping import backward, optimizer_step, sync
from stages.train.data import Progress
from stages.train.logs import Window, epoch_position
from stages.train.config import Config
from stages.train.targets import TARGETS, Setting, Target


@dataclass
class Run:
    """A run, whole: made by `build_run`, nothing left to fill in."""
    cfg: Config
    staging: Path
    rank: ranks.Rank
    device: torch.device
    record: dict                       # {"config": fingerprinted config, "inputs": their fingerprints}
    data: feed.Data
    schedule: D.Schedule
    target: Target
    model: torch.nn.Module             # the target's module, or its DDP wrapper
    params: list[torch.nn.Parameter]
    weights: ckpt.Stateful             # the trained weights (the target's)
    opt: torch.optim.Optimizer
    lr: O.LRSchedule
    ema: O.EMA | None                  # None: EMA off
    scaler: torch.amp.GradScaler       # built once; disabled unless fp16
    progress: Progress
    holdout: H.Holdout | None          # the held-out validation set (its samples on the main rank); None: off
    eval_set: list                     # the fixed evaluation samples (main rank, or every rank when sharded)
    log: logs.TrainLog | None = None   # the main rank's, from the step resumed at
    clock: logs.WallClock | None = None   # wall time per part of the run (made when its first step is known)

    def parts(self) -> dict[str, ckpt.Stateful]:
        """What a checkpoint holds, restored in this order (the schedule after the optimizer: it sets the
        optimizer's learning rate). A new stateful part of training is one more entry here."""
        parts = {"weights": self.weights, "ema": self.ema, "optimizer": self.opt, "scheduler": self.lr,
                 "scaler": self.scaler, "progress": self.progress}
        return {name: part for name, part in parts.items() if part is not None}

    def rank_parts(self) -> dict[str, ckpt.Stateful]:
        """What each rank saves of its own."""
        return {f"rng-rank{self.rank.rank}": ckpt.RNGState(self.device)}

    def barrier(self) -> None:
        sharding.barrier(self.rank)()

    def evaluation_sets(self) -> list[tuple[str, list, list]]:
        held = self.holdout.samples if self.holdout is not None else []
        return [("eval_loss", self.eval_set, self.progress.eval), ("val_loss", held, self.progress.val)]


def build_run(cfg: Config, staging: Path, rank: ranks.Rank, device: torch.device, record: dict) -> Run:
    """The data, the target and every stateful part around it, restored from a checkpoint when resuming."""
    data = feed.open_data(cfg.data)
    holdout = (H.prepare(data, cfg.holdout_set, staging, rank.main, sharding.barrier(rank),
                         samples_everywhere=cfg.parallel == "fsdp" and rank.world > 1)
               if cfg.holdout_set.on else None)
    schedule = feed.plan(data, cfg.data, rank.world)
    if rank.main:
        say(f"train: {feed.describe(data, schedule, cfg.data, rank.world)[0]}")
    precision = S.Precision.make(cfg.weights_dtype, cfg.mixed_precision, device.type)
    target = TARGETS[cfg.target].build(Setting(cfg, data, rank, device, staging, precision))
    groups = O.param_groups(cfg.optim, target.groups())
    weights = target.weights()
    params = [p for g in groups for p in g["params"]]
    opt = O.make_stepper(cfg.optim, groups, cfg.seed, rank.world)
    ema = (O.EMA(weights, params, cfg.optim.ema_decay, cfg.optim.ema_every,
                 "cpu" if cfg.optim.ema_device == "cpu" else None) if cfg.optim.ema_decay else None)
    evaluated = rank.main or target.sharded   # sharded: every process runs the evaluation's forward passes
    eval_set = feed.first_samples(data, cfg.logging.eval_samples, set(holdout.ids) if holdout else set()) \
        if evaluated else []
    run = Run(cfg, staging, rank, device, record, data, schedule, target, target.module, params, weights, opt,
              O.LRSchedule(opt, cfg.optim, schedule.total), ema,
              torch.amp.GradScaler(device.type, enabled=cfg.mixed_precision == "fp16"), Progress(schedule), holdout,
              eval_set)
    start = ckpt.resolve_resume(cfg.checkpointing.resume, staging, rank.main)
    if start is not None:
        restore(run, start)
    if rank.world > 1 and not target.sharded:
        ids = [device.index] if device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(target.module, device_ids=ids,
                                                              gradient_as_bucket_view=True)
    if rank.main:
        run.log = logs.TrainLog(cfg.logging, staging / "logs", schedule.total, run.progress.step,
                                cfg.batch_size * cfg.accumulate * rank.world, to_plain(cfg))
    run.clock = logs.WallClock(staging / "logs", run.progress.step, rank.main)
    target.resumed_at(run.progress.step)
    return run


def restore(run: Run, folder: Path) -> None:
    saved = ckpt.check_resumable(folder, run.record["config"], run.record["inputs"],
                                 run.cfg.checkpointing.force_resume, extend.LENGTH, ckpt.config_defaults(Config))
    if run.rank.main:
        extend.check_length(folder, saved, run.cfg, run.schedule, run.data.infos, run.rank.world)
    missing = ckpt.restore(folder, {**run.parts(), **run.rank_parts()})
    if run.target.sharded:
        sharding.shard_optimizer_state(run.opt)
    O.after_restore(run.opt)
    if missing:
        warn(f"{folder} holds no state of {', '.join(missing)} (it starts afresh; with an RNG state missing, "
             f"LoRA dropout draws differ from an uninterrupted run)")
    if run.rank.main:
        say(f"train: resuming from {folder} (step {saved.step} of {run.schedule.total})")


def train_steps(run: Run) -> None:
    cfg, data, total, target = run.cfg, run.cfg.data, run.schedule.total, run.target
    # the reader thread only reads and decodes (numpy); tensors are made here, because torch ops in a second
    # thread start a second OpenMP team that competes with the step (measured: 3x slower steps on 2 cores)
    batches = D.prefetch(feed.micro_batches(run.data, run.schedule, data, run.rank.rank, run.rank.world,
                                            run.progress.step), data.prefetch)
    window = Window(run.device)
    for step in range(run.progress.step, total):
        lr, epoch = run.lr.lr, run.schedule.locate(step)[0]
        for micro in range(data.accumulate):
            samples, at, index = next(batches)
            batch = target.assemble(samples, at, index, epoch).to(run.device)
            with sync(run, last=micro == data.accumulate - 1):
                with target.offload.forward():
                    loss, per_sample, u = target.loss(run.model, batch)
                with target.offload.backward():   # a bucket's remainder: each sample weighs as in a full batch
                    backward(run, loss * (len(samples) / data.batch_size), data.accumulate)
            window.add(loss.detach(), per_sample, u)
        window.norm = optimizer_step(run, step, loss.detach())
        run.lr.step()
        run.progress.step = step + 1
        fault_point("train.step")
        if run.log is not None:
            run.log.step(step + 1, float(loss.detach()), lr, epoch_position(run.schedule, step + 1))
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == total:
            report(run, step + 1, window.reduce(run.rank.world), lr)
            window = Window(run.device)
        if checkpoint_due(run, step + 1):
            save(run)
        target.sample_images(step + 1, total, run.ema, run.log)


def checkpoint_due(run: Run, step: int) -> bool:
    """Every checkpoint_every steps, at the end of each epoch with checkpoint_epochs, and after the last step."""
    every = run.cfg.checkpointing
    end_of_epoch = every.checkpoint_epochs and run.schedule.locate(step)[1] == 0
    return step % every.checkpoint_every == 0 or step == run.schedule.total or bool(end_of_epoch)


def report(run: Run, step: int, stats: dict, lr: float) -> None:
    run.clock.note(step)
    if run.log is not None:
        run.log.write(step, {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                             "skipped_steps": run.progress.skipped,
                             "epoch": round(epoch_position(run.schedule, step), 4)}, stats["bins"])


def evaluate(run: Run) -> None:
    """The evaluation at the current step (the target's: losses, or the VAE's measures), noted in the progress
    and the logs (main rank; with a sharded model every process runs the forward passes, the main rank logs).
    Schedule-free is in its eval mode: its averaged weights are evaluated."""
    if run.rank.main or run.target.sharded:
        with O.eval_mode(run.opt):
            run.target.evaluate(run.progress.step, run.evaluation_sets(), run.log)


def save(run: Run) -> None:
    """Evaluate and checkpoint (schedule-free in its eval mode for both, entered once: its averaged weights)."""
    cfg, step = run.cfg, run.progress.step
    run.clock.note(step)
    with O.eval_mode(run.opt):
        evaluate(run)
        record = ckpt.run_manifest(cfg, run.target.method, step, run.schedule.locate(step)[0], run.record)
        if cfg.lora_files and run.rank.main:   # before the checkpoint: a resume from it never lacks its file
            lorafiles.write_step(run.staging / "loras", cfg, record, run.record, run.weights, run.ema,
                                 feed.dataset_extras(run.data.index), run.target.module.config)
        ckpt.save_run(run.staging / "checkpoints", cfg, record, run.parts(), run.rank_parts(), run.target.sharded,
                      run.rank.main, run.barrier)


def result(run: Run) -> BuildResult:
    cfg, index, sched = run.cfg, run.data.index, run.schedule
    evals, vals = run.progress.eval, run.progress.val
    extra = {"final_checkpoint": f"checkpoints/{ckpt.folder_name(sched.total)}",
             "steps": sched.total, "epochs": round(sched.total / max(sched.steps[0], 1), 4),
             "steps_per_epoch": list(sched.steps[:3]), "skipped_steps": run.progress.skipped,
             "eval_loss": {"first": evals[0] if evals else None, "last": evals[-1] if evals else None,
                           "history": evals},
             "val_loss": {"first": vals[0] if vals else None, "last": vals[-1] if vals else None,
                          "history": vals, "items": len(run.holdout.ids) if run.holdout is not None else 0},
             **feed.dataset_extras(index), "comment": cfg.comment, "seconds": run.clock.total,
             "parts": run.clock.parts}
    trained = [feed.planned_samples(run.data, sched, cfg.data, run.rank.world, e) for e in range(len(sched.steps))]
    extra["epoch_samples"] = sum(sum(i.repeats) for i in run.data.infos)   # per epoch, counting repeats
    extra["epoch_unused"] = extra["epoch_samples"] - trained[0]           # of the first epoch, not trained
    extra["bucket_remainder"] = cfg.bucket_remainder
    extra.update(run.target.summary(run.progress))
    return BuildResult({"in": index.samples, "out": sched.total, "dropped": {}, "samples_trained": sum(trained)},
                       extra)


def build(cfg: Config, staging: Path, inputs: dict) -> BuildResult | None:
    rank = ranks.current()
    device = torch.device(ranks.device(cfg.device, rank.local))
    made_group = sharding.init_distributed(rank, device)
    try:
        run = build_run(cfg, staging, rank, device, ckpt.record(cfg, inputs))
        if not run.progress.eval:
            evaluate(run)  # the evaluation loss at the start
        # at the start, and at the step a run resumes at: a set the interrupted run did not finish is rendered
        # there (Previews.due is false for a set already on disk)
        run.target.sample_images(run.progress.step, run.schedule.total, run.ema, run.log)
        train_steps(run)
        if rank.main:
            run.target.finish(run.eval_set, run.holdout.samples if run.holdout is not None else [], run.ema)
        if run.log is not None:
            run.log.close()
        run.barrier()
        run.clock.note(run.progress.step)
        return result(run) if rank.main else None
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
