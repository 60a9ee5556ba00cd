"""The training run: setup in named helpers, then the loop (`train_steps`), readable top to bottom.

One code path for one process and for N started by `torchrun` / `accelerate launch` (RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR/PORT): with N > 1 a process group is made (NCCL on GPUs, gloo on CPU), the UNet is
wrapped in DistributedDataParallel (or sharded with FSDP2, sharding.py), each rank streams its own shards, and
rank 0 logs and saves. The memory savers of offload.py wrap the forward and the backward pass.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ContextManager

import torch

from shared.core import artifacts, ranks
from shared.core.config import default_of, fingerprinted, to_plain
from shared.core.errors import ConfigError, DataError
from shared.core.faults import checkpoint as fault_point
from shared.core.log import say, warn
from shared.core.stage import BuildResult
from stages.train import checkpoint as ckpt
from stages.train import data as D
from stages.train import feed, fused, holdout as H, lorafiles, logs, model as M, objective, offload as OF
from stages.train import extend, initlora, optim as O, previews, sharding, step as S, textenc, vae as V
from shared.models.sampling import Objective
from stages.train.config import Config


@dataclass
class Progress:
    """The loop's position and counters, a checkpoint part. The step is the data position too (the data plan is
    a function of the config); epoch and step in epoch are stored for reading."""
    schedule: D.Schedule
    step: int = 0                  # optimizer steps done
    skipped: int = 0               # steps skipped for a non-finite loss or gradient
    bad_in_row: int = 0            # of them, the latest in a row
    eval: list = field(default_factory=list)   # [[step, evaluation loss on training samples], ...]
    val: list = field(default_factory=list)    # [[step, validation loss on the held-out set], ...]

    def state_dict(self) -> dict:
        epoch, in_epoch = self.schedule.locate(self.step)
        return {"step": self.step, "epoch": epoch, "step_in_epoch": in_epoch, "skipped": self.skipped,
                "bad_in_row": self.bad_in_row, "eval": [list(e) for e in self.eval],
                "val": [list(e) for e in self.val]}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.skipped, self.bad_in_row = state["step"], state["skipped"], state["bad_in_row"]
        self.eval = [list(e) for e in state["eval"]]
        self.val = [list(e) for e in state.get("val", [])]


@dataclass
class Run:
    cfg: Config
    staging: Path
    rank: ranks.Rank
    device: torch.device
    record: dict                       # {"config": fingerprinted config, "inputs": their fingerprints}
    data: feed.Data | None = None
    schedule: D.Schedule | None = None
    unet: Any = None
    model: Any = None                  # the UNet, or its DDP wrapper
    params: list = field(default_factory=list)
    weights: M.TrainedWeights | None = None
    opt: torch.optim.Optimizer | None = None
    lr: O.LRSchedule | None = None
    ema: O.EMA | None = None
    scaler: torch.amp.GradScaler | None = None   # built once; disabled unless fp16
    precision: S.Precision | None = None
    sigmas: torch.Tensor | None = None
    progress: Progress | None = None
    eval_set: list = field(default_factory=list)
    holdout: H.Holdout | None = None   # the held-out validation set (its samples on the main rank)
    log: logs.TrainLog | None = None
    offload: OF.Offload | None = None  # activation offload and block swap (offload.py)
    sharded: bool = False              # the UNet is sharded over the processes (FSDP2, sharding.py)
    previews: previews.Previews | None = None   # sample images (main rank, when asked for)
    vae: V.VaeTraining | None = None   # target vae: the VAE's losses and measures; `unet` is then its Reconstruction
    text: textenc.TextEncoders | None = None   # the text encoders when they run in the step (textenc.py)

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
        if self.rank.world > 1:
            torch.distributed.barrier()


def setup(run: Run) -> None:
    cfg = run.cfg
    run.data = feed.open_data(cfg.data)
    if cfg.holdout_set.on:
        run.holdout = H.prepare(run.data, cfg.holdout_set, run.staging, run.rank.main, run.barrier,
                                samples_everywhere=cfg.parallel == "fsdp" and run.rank.world > 1)
    run.schedule = feed.plan(run.data, cfg.data, run.rank.world)
    (setup_vae if cfg.target == "vae" else setup_unet)(run)
    make_state(run)
    start = ckpt.resolve_resume(cfg.checkpointing.resume, run.staging, run.rank.main)
    if start is not None:
        restore(run, start)
    run.model = run.unet
    if run.rank.world > 1 and not run.sharded:
        ids = [run.device.index] if run.device.type == "cuda" else None
        run.model = torch.nn.parallel.DistributedDataParallel(run.unet, device_ids=ids, gradient_as_bucket_view=True)
    if run.rank.main or run.sharded:   # sharded: every process runs the evaluation's forward passes
        held = set(run.holdout.ids) if run.holdout is not None else set()
        run.eval_set = feed.first_samples(run.data, cfg.logging.eval_samples, held)
    if run.rank.main:
        run.log = logs.TrainLog(cfg.logging, run.staging / "logs", run.schedule.total, run.progress.step,
                                cfg.batch_size * cfg.accumulate * run.rank.world, to_plain(cfg))
    if run.previews is not None:
        run.previews.forget_after(run.progress.step)


def setup_unet(run: Run) -> None:
    """The UNet to train, with what goes around it: its LoRA's start, previews, memory savers, FSDP."""
    cfg = run.cfg
    run.unet = M.build_unet(cfg.unet, run.device)
    if cfg.text.in_step:
        run.text = text_encoders(run)
    if cfg.init_lora is not None:
        initlora.load(cfg.init_lora, run.unet, cfg.adapter)
    if run.rank.main and cfg.sample_prompts is not None:
        run.previews = previews.Previews(cfg.previews, cfg.model, sampling_objective(cfg), run.staging / "samples",
                                         run.device)
    torch.manual_seed(cfg.seed + run.rank.rank)  # the global generator drives LoRA dropout only
    feed.check_shapes(run.unet, run.data.index, run.data.folder)
    run.offload = OF.install(cfg.offload, run.unet, run.device, run.rank.world)  # before the state: it moves weights
    if cfg.parallel == "fsdp" and run.rank.world > 1:   # before the state: the optimizer steps the shards
        blocks = [m for _, m in M.blocks(run.unet)]
        sharding.shard(run.unet, blocks)
        run.sharded = True
        if run.rank.main:
            say(f"train: FSDP: the UNet sharded over {run.rank.world} processes ({len(blocks)} blocks and the rest)")


def setup_vae(run: Run) -> None:
    """Target vae: the model's VAE to fine-tune on the shards' pixels (vae.py), in the UNet's place in the loop."""
    cfg = run.cfg
    V.VaeTraining.check_data(run.data.index.layout, run.data.folder)
    run.vae = V.VaeTraining(cfg.vae_target, run.device,
                            S.Precision.make(cfg.weights_dtype, cfg.mixed_precision, run.device.type))
    run.unet = run.vae.model
    torch.manual_seed(cfg.seed + run.rank.rank)  # nothing draws from it; as the UNet target, for the RNG part
    run.offload = OF.install(cfg.offload, run.unet, run.device, run.rank.world)


def text_encoders(run: Run) -> textenc.TextEncoders:
    """The text encoders for the step; the shards must hold token ids. With N processes the trained encoders
    are not wrapped in DDP: their gradients are averaged by `average_text_gradients`."""
    cfg = run.cfg
    if not run.data.index.layout.token_ids:
        raise ConfigError(f"{cfg.input}: the shards hold no token ids, which train_text_encoder / shuffle_tags / "
                          f"tag_dropout need: encode again with sdxl encode --token-ids")
    text = textenc.TextEncoders(cfg.text, run.device)
    if run.rank.world > 1:   # rank 0's trained weights everywhere, as DDP does for the UNet when it wraps it
        for p in trained_text_params(text):
            torch.distributed.broadcast(p.data, src=0)
    return text


def trained_text_params(text: textenc.TextEncoders | None) -> list[torch.Tensor]:
    return [p for ps in (text.groups().values() if text is not None else ()) for p in ps]


def average_text_gradients(run: Run) -> None:
    """The trained text encoders' gradients averaged over the ranks, as DDP averages the UNet's: one all-reduce
    of them flattened (per dtype), after the last micro-batch's backward pass. The ranks, starting from the same
    weights, then step them alike (so rank 0's checkpoint and every rank's EMA agree). A parameter without a
    gradient (encoder 1's last layer: its penultimate states are used) has none on every rank (same graph)."""
    if run.rank.world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in trained_text_params(run.text):
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= run.rank.world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sampling_objective(cfg: Config) -> Objective:
    return Objective(cfg.prediction, cfg.schedule, cfg.flow_shift, cfg.resolution_base if cfg.resolution_noise else 0)


def make_state(run: Run) -> None:
    """The stateful parts around the UNet, and the precision and sigmas of the step."""
    cfg, opt_cfg = run.cfg, run.cfg.optim
    if run.vae is not None:
        named = run.vae.groups()
        run.weights = run.vae.weights()
    else:
        named = {**M.trainable_groups(run.unet, cfg.method), **(run.text.groups() if run.text is not None else {})}
        run.weights = M.TrainedWeights(run.unet, cfg.method, run.text.trained if run.text is not None else None)
    groups = O.param_groups(opt_cfg, named)
    run.params = [p for g in groups for p in g["params"]]
    run.opt = make_optimizer(opt_cfg, groups, cfg.seed, run.rank.world)
    run.lr = O.LRSchedule(run.opt, opt_cfg, run.schedule.total)
    ema_device = "cpu" if opt_cfg.ema_device == "cpu" else None
    run.ema = (O.EMA(run.weights, run.params, opt_cfg.ema_decay, opt_cfg.ema_every, ema_device)
               if opt_cfg.ema_decay else None)
    run.scaler = torch.amp.GradScaler(run.device.type, enabled=cfg.mixed_precision == "fp16")
    run.precision = S.Precision.make(cfg.weights_dtype, cfg.mixed_precision, run.device.type)
    run.sigmas = objective.schedule(cfg.schedule).float().to(run.device)
    run.progress = Progress(run.schedule)


def make_optimizer(cfg: O.OptimizerConfig, groups: list[dict], seed: int, world: int) -> torch.optim.Optimizer:
    """The configured optimizer, or with fused_backward one per parameter stepped in the backward pass."""
    if not cfg.fused_backward:
        return O.make_optimizer(cfg, groups, seed)
    if world > 1:
        raise ConfigError(f"fused_backward steps each weight before DistributedDataParallel has averaged its "
                          f"gradient over the {world} processes: train on one process, or turn it off")
    return fused.FusedBackward(groups, lambda one, index: O.make_optimizer(cfg, one, seed, index))


def restore(run: Run, folder: Path) -> None:
    saved = ckpt.check_resumable(folder, run.record["config"], run.record["inputs"],
                                 run.cfg.checkpointing.force_resume, extend.LENGTH, config_defaults())
    if run.rank.main:
        extend.check_length(folder, saved, run.cfg, run.schedule, run.data.infos, run.rank.world)
    missing = ckpt.restore(folder, {**run.parts(), **run.rank_parts()})
    if run.sharded:
        sharding.shard_optimizer_state(run.opt)
    O.after_restore(run.opt)
    if missing:
        warn(f"{folder} holds no state of {', '.join(missing)} (it starts afresh; with an RNG state missing, "
             f"LoRA dropout draws differ from an uninterrupted run)")
    if run.rank.main:
        say(f"train: resuming from {folder} (step {saved.step} of {run.schedule.total})")


def train_steps(run: Run) -> None:
    cfg, data, total = run.cfg, run.cfg.data, run.schedule.total
    # the reader thread only reads and decodes (numpy); tensors are made here, because torch ops in a second
    # thread start a second OpenMP team that competes with the step (measured: 3x slower steps on 2 cores)
    batches = D.prefetch(feed.micro_batches(run.data, run.schedule, data, run.rank.rank, run.rank.world,
                                            run.progress.step), data.prefetch)
    window = Window(run.device)
    for step in range(run.progress.step, total):
        lr, epoch = run.lr.lr, run.schedule.locate(step)[0]
        for micro in range(data.accumulate):
            batch = (run.vae.assemble(*next(batches)) if run.vae is not None else
                     S.assemble(*next(batches), run.data.empty, cfg.objective, epoch, text=run.text)).to(run.device)
            with sync(run, last=micro == data.accumulate - 1):
                with run.offload.forward():
                    if run.vae is not None:
                        loss, per_sample, u = run.vae.loss(run.model, batch)
                    else:
                        with run.precision.autocast:
                            batch = S.condition(batch, run.text)
                        loss, per_sample, u = S.loss(run.model, batch, cfg.objective, run.sigmas, run.precision)
                with run.offload.backward():
                    backward(run, loss, data.accumulate)
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
        sample_images(run, step + 1)


def checkpoint_due(run: Run, step: int) -> bool:
    """Every checkpoint_every steps, at the end of each epoch with checkpoint_epochs, and after the last step."""
    every = run.cfg.checkpointing
    end_of_epoch = every.checkpoint_epochs and run.schedule.locate(step)[1] == 0
    return step % every.checkpoint_every == 0 or step == run.schedule.total or bool(end_of_epoch)


def sample_images(run: Run, step: int) -> None:
    """The sample prompts rendered at `step` when due (main rank; see previews.py)."""
    if run.previews is not None and run.previews.due(step, run.schedule.total):
        tb = run.log.tb if run.log is not None else None
        text = run.text if run.text is not None and run.text.cfg.trained else None
        grid = run.previews.render(run.unet, step, run.ema, run.precision.autocast, tb, text)
        if run.log is not None:
            run.log.note_text(step, "samples", str(grid.relative_to(run.staging)))
            run.log.images(step, run.previews.labelled(step))


def sync(run: Run, last: bool) -> ContextManager:
    """DDP all-reduces gradients only on the last micro-batch of a step."""
    if run.model is run.unet or last:
        return contextlib.nullcontext()
    return run.model.no_sync()


def backward(run: Run, loss: torch.Tensor, accumulate: int) -> None:
    """The backward pass; with fused backward it also steps every parameter (never for a non-finite loss)."""
    if isinstance(run.opt, fused.FusedBackward):
        run.opt.begin()
        if torch.isfinite(loss):
            loss.backward()
        return
    run.scaler.scale(loss / accumulate).backward()


def optimizer_step(run: Run, step: int, loss: torch.Tensor) -> float:
    """Clip, then step — unless the loss or the gradient is not finite: then the step is skipped and counted,
    and `max_bad_steps` such steps in a row stop the run with an error. (With fp16 the scaler skips a step
    whose gradient overflowed by itself, lowering its scale; that is not a bad step.) With fused backward the
    parameters were stepped in the backward pass; one whose gradient was not finite was left as it was."""
    cfg = run.cfg.optim
    if isinstance(run.opt, fused.FusedBackward):
        norm, unstepped = run.opt.end()
        bad = unstepped > 0 or not bool(torch.isfinite(loss))
    else:
        average_text_gradients(run)   # the UNet's: DDP's, in the last micro-batch's backward pass
        norm, bad = clip(run, loss, cfg.max_grad_norm)
        if not bad:
            run.scaler.step(run.opt)
            run.scaler.update()
            run.opt.zero_grad(set_to_none=True)
    if bad:
        skip_step(run, step, float(loss), norm, cfg.max_bad_steps)
        return norm
    run.progress.bad_in_row = 0
    if run.ema is not None:
        run.ema.update(step)
    return norm


def clip(run: Run, loss: torch.Tensor, max_grad_norm: float) -> tuple[float, bool]:
    """(the gradient's global norm after unscaling, whether the step is bad: a non-finite loss on any rank, or a
    non-finite gradient without the fp16 scaler, which handles its own)."""
    run.scaler.unscale_(run.opt)
    norm = torch.nn.utils.clip_grad_norm_(run.params, max_grad_norm or float("inf"))
    bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=run.device)
    if run.rank.world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    return float(norm), bool(bad.item()) or (not run.scaler.is_enabled() and not torch.isfinite(norm))


def skip_step(run: Run, step: int, loss: float, norm: float, max_bad_steps: int) -> None:
    run.opt.zero_grad(set_to_none=True)
    run.scaler.update()  # ends this step's unscale_ (and lowers an fp16 scale); no-op when disabled
    progress = run.progress
    progress.skipped += 1
    progress.bad_in_row += 1
    if run.rank.main:
        warn(f"step {step + 1}: non-finite loss or gradient (loss {loss:.4g}, grad norm {norm:.4g}); step "
             f"skipped ({progress.skipped} so far)")
    if progress.bad_in_row >= max_bad_steps:
        raise DataError(f"{progress.bad_in_row} steps in a row had a non-finite loss or gradient (last at "
                        f"step {step + 1}); lower the learning rate, use --mixed-precision bf16 instead of "
                        f"fp16, or check the shards (latents from an fp16 VAE overflow)")


class Window:
    """Loss statistics between two log lines (summed over ranks when written)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2 + 2 * logs.BINS, dtype=torch.float64, device=device)
        self.norm = 0.0

    def add(self, loss: torch.Tensor, per_sample: torch.Tensor, u: torch.Tensor | None) -> None:
        """`u`: each sample's timestep position, binned; None where there is none (the VAE target)."""
        self.sums[0] += loss.double()
        self.sums[1] += 1
        if u is None:
            return
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


def epoch_position(schedule: D.Schedule, step: int) -> float:
    """Epochs done after `step` optimizer steps, with the fraction of the current one (1.5 = half way into the
    second)."""
    epoch, in_epoch = schedule.locate(step)
    return epoch + (in_epoch / schedule.steps[epoch] if epoch < len(schedule.steps) else 0.0)


def report(run: Run, step: int, stats: dict, lr: float) -> None:
    if run.log is not None:
        run.log.write(step, {"loss": stats["loss"], "lr": lr, "grad_norm": stats["grad_norm"],
                             "skipped_steps": run.progress.skipped,
                             "epoch": round(epoch_position(run.schedule, step), 4)}, stats["bins"])


def evaluate(run: Run) -> None:
    """The evaluation loss at the current step, noted in the progress and the logs (main rank)."""
    with O.eval_mode(run.opt):
        _evaluate(run)


def _evaluate(run: Run) -> None:
    """The fixed-noise loss on training samples (eval_loss) and on the held-out set (val_loss), side by side
    (main rank; with a sharded model every process runs the forward passes, the main rank logs)."""
    if run.vae is not None:
        return V.evaluate(run)
    if not (run.rank.main or run.sharded):
        return
    step = run.progress.step
    held = run.holdout.samples if run.holdout is not None else []
    for name, samples, history in (("eval_loss", run.eval_set, run.progress.eval),
                                   ("val_loss", held, run.progress.val)):
        if samples:
            each = S.evaluate_each(run.unet, samples, run.cfg.objective, run.sigmas, run.precision, run.device,
                                   run.text)
            history.append([step, float(each.mean())])
            if run.log is not None:
                run.log.evaluation(step, name, each, samples)


def save(run: Run) -> None:
    """Evaluate and checkpoint (schedule-free in its eval mode for both: its averaged weights are saved)."""
    with O.eval_mode(run.opt):
        _save(run)


def _save(run: Run) -> None:
    evaluate(run)
    cfg, step = run.cfg, run.progress.step
    method = "vae" if run.vae is not None else cfg.method   # what export reads: lora | full | vae
    record = ckpt.CheckpointManifest(
        step=step, epoch=run.schedule.locate(step)[0], method=method, lora=cfg.adapter if method == "lora" else None,
        model=cfg.model,
        weights_dtype=cfg.weights_dtype, config=run.record["config"], inputs=run.record["inputs"],
        fingerprint=artifacts.hash_json(run.record), created=artifacts.now())
    metadata = {"format": "sdxl-stages", "method": method,
                "lora": cfg.adapter.to_json() if method == "lora" else ""}
    parts = sharding.snapshots(run.parts()) if run.sharded else run.parts()   # sharded: gathered by every process
    ckpt.save(run.staging / "checkpoints", record, parts, run.rank_parts(), cfg.checkpointing.keep_checkpoints,
              metadata, run.rank.main, run.barrier)
    if cfg.lora_files and run.rank.main:
        write_lora_files(run, record)


def write_lora_files(run: Run, record: ckpt.CheckpointManifest) -> None:
    """The kohya LoRA file of the live weights (and of the EMA) beside the checkpoint just saved."""
    cfg = run.cfg
    parts = [("", run.weights, f"step-{record.step:06d}")] + ([("-ema", run.ema, "ema")] if run.ema else [])
    for suffix, part, kind in parts:
        info, prov = lorafiles.metadata(run.record["config"], run.record["inputs"], dataset_extras(run),
                                        step=record.step, epoch=record.epoch, spec=cfg.adapter, base=cfg.model,
                                        comment=cfg.comment, fingerprint=record.fingerprint,
                                        objective=sampling_objective(cfg).to_dict(), weights=kind)
        lorafiles.write(run.staging / "loras", f"{cfg.output.name}-step-{record.step:06d}{suffix}",
                        part.state_dict(), cfg.adapter, run.unet.config, info, prov, cfg.lora_file_dtype)


def dataset_extras(run: Run) -> dict:
    """What the manifest and a LoRA file's metadata say of the data: tag frequency, buckets, main resolution."""
    index = run.data.index
    buckets = sorted(([*b.bucket, b.samples] for b in index.buckets), key=lambda b: -b[2])
    return {"tag_frequency": index.tag_frequency, "resolution": buckets[0][:2] if buckets else None,
            "buckets": buckets}


def config_defaults() -> dict:
    """Every fingerprinted key's default, as the record holds values (what a key absent from an older checkpoint
    stands for)."""
    return {f.name: to_plain(default_of(f)) for f in fields(Config) if f.metadata.get("fingerprint", True)}


def record(cfg: Config, inputs: dict) -> dict:
    return {"config": fingerprinted(cfg), "inputs": {k: v["fingerprint"] for k, v in inputs.items()}}


def result(run: Run, started: float) -> BuildResult:
    cfg, index, sched = run.cfg, run.data.index, run.schedule
    evals, vals = run.progress.eval, run.progress.val
    extra = {"final_checkpoint": f"checkpoints/{ckpt.folder_name(sched.total)}",
             "steps": sched.total, "epochs": round(sched.total / max(sched.steps[0], 1), 4),
             "steps_per_epoch": list(sched.steps[:3]), "skipped_steps": run.progress.skipped,
             "eval_loss": {"first": evals[0] if evals else None, "last": evals[-1] if evals else None,
                           "history": evals},
             "val_loss": {"first": vals[0] if vals else None, "last": vals[-1] if vals else None,
                          "history": vals, "items": len(run.holdout.ids) if run.holdout is not None else 0},
             **dataset_extras(run), "comment": cfg.comment, "seconds": round(time.monotonic() - started, 1)}
    per_step = cfg.batch_size * cfg.accumulate * run.rank.world
    occurrences = sum(sum(i.repeats) for i in run.data.infos)
    extra["epoch_samples"] = occurrences  # per epoch, counting repeats
    extra["epoch_unused"] = occurrences - sched.steps[0] * per_step  # first epoch's remainder, not trained
    if run.vae is not None:
        extra["vae"] = V.summary(run)
    return BuildResult({"in": index.samples, "out": sched.total, "dropped": {},
                        "samples_trained": sched.total * per_step}, extra)


def init_distributed(rank: ranks.Rank, device: torch.device) -> bool:
    if rank.world == 1 or torch.distributed.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def build(cfg: Config, staging: Path, inputs: dict) -> BuildResult | None:
    rank = ranks.current()
    device = torch.device(ranks.device(cfg.device, rank.local))
    made_group = init_distributed(rank, device)
    started = time.monotonic()
    run = Run(cfg, staging, rank, device, record(cfg, inputs))
    try:
        setup(run)
        if not run.progress.eval:
            evaluate(run)  # the evaluation loss at the start
        if run.progress.step == 0:
            sample_images(run, 0)
        train_steps(run)
        if run.vae is not None and rank.main:
            V.write_grid(run)
        if run.log is not None:
            run.log.close()
        run.barrier()
        return result(run, started) if rank.main else None
    finally:
        if made_group:
            torch.distributed.destroy_process_group()
