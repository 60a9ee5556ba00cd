"""What a run trains: the `Target` protocol the loop (loop.py) drives, the TARGETS registry users pick from
(`target = ...`), and the UNet target (the VAE's is in vae.py). A target gives the loop the module to train (DDP
wraps it), its parameter groups and trained weights (a checkpoint part), each micro-batch from the loader's
samples, the loss, its evaluation, sample images and what the manifest says of it; the loop owns everything
else (optimizer, schedule, EMA, checkpoints, logging, ranks)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

import torch

from shared.core import ranks
from shared.core.errors import ConfigError
from shared.core.log import say
from shared.core.registry import Registry
from shared.formats.samples import Sample
from shared.models.sampling import Objective
from stages.train import checkpoint as ckpt
from stages.train import feed, initlora, logs, model as M, objective, offload as OF, previews, sharding
from stages.train import step as S, textenc
from stages.train.optim import EMA

if TYPE_CHECKING:
    from stages.train.config import Config


class Target(Protocol):
    """One trained model of a run, as the loop sees it."""
    method: str                  # what the checkpoint and export record: lora | full | vae
    module: torch.nn.Module      # what the loop runs forward and backward (DDP wraps it)
    offload: OF.Offload          # activation offload / block swap around its forward and backward
    sharded: bool                # its weights are sharded over the processes (FSDP)

    def groups(self) -> dict[str, list[torch.nn.Parameter]]: ...

    def weights(self) -> ckpt.Stateful: ...

    def assemble(self, samples: list[Sample], step: int, micro: int, epoch: int) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]: ...

    def after_backward(self, world: int) -> None: ...

    def evaluate(self, step: int, sets: list[tuple[str, list[Sample], list]], log: logs.TrainLog | None) -> None: ...

    def sample_images(self, step: int, total: int, ema: EMA | None, log: logs.TrainLog | None) -> None: ...

    def finish(self, eval_set: list[Sample], held: list[Sample], ema: EMA | None) -> None: ...

    def summary(self, progress: Any) -> dict: ...


@dataclass(frozen=True)
class Setting:
    """Where a target is built: the run's config, data, process and folder."""
    cfg: Config              # the train config
    data: feed.Data
    rank: ranks.Rank
    device: torch.device
    staging: Path
    precision: S.Precision


@dataclass(frozen=True)
class TargetKind:
    """A training target users pick by name (`target = ...`)."""
    name: str
    help: str
    build: Callable[[Setting], Target]


TARGETS: Registry[TargetKind] = Registry("training target")


def sampling_objective(cfg: Config) -> Objective:
    """What the trained UNet predicts, as the samplers (previews, export, compare) read it."""
    return Objective(cfg.prediction, cfg.schedule, cfg.flow_shift, cfg.resolution_base if cfg.resolution_noise else 0)


class UnetTarget:
    """The UNet (a LoRA on it, or all its weights), with the text encoders when they run in the step and the
    sample images rendered during training."""

    def __init__(self, at: Setting):
        cfg, rank = at.cfg, at.rank
        self.cfg, self.device, self.precision, self.staging = cfg, at.device, at.precision, at.staging
        self.method = cfg.method
        self.module = M.build_unet(cfg.unet, at.device)
        self.text = _text_encoders(at) if cfg.text.in_step else None
        if cfg.init_lora is not None:
            initlora.load(cfg.init_lora, self.module, cfg.adapter)
        self.previews = (previews.Previews(cfg.previews, cfg.model, sampling_objective(cfg), at.staging / "samples",
                                           at.device) if rank.main and cfg.sample_prompts is not None else None)
        torch.manual_seed(cfg.seed + rank.rank)  # the global generator drives LoRA dropout only
        feed.check_shapes(self.module, at.data.index, at.data.folder)
        self.offload = OF.install(cfg.offload, self.module, at.device, rank.world)  # before the optimizer
        self.sharded = cfg.parallel == "fsdp" and rank.world > 1
        if self.sharded:   # before the state: the optimizer steps the shards
            blocks = [m for _, m in M.blocks(self.module)]
            sharding.shard(self.module, blocks)
            if rank.main:
                say(f"train: FSDP: the UNet sharded over {rank.world} processes ({len(blocks)} blocks and the rest)")
        self.sigmas = objective.schedule(cfg.schedule).float().to(at.device)
        self.empty = at.data.empty

    def groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {**M.trainable_groups(self.module, self.cfg.method),
                **(self.text.groups() if self.text is not None else {})}

    def weights(self) -> M.TrainedWeights:
        return M.TrainedWeights(self.module, self.cfg.method, self.text.trained if self.text is not None else None)

    def assemble(self, samples: list[Sample], step: int, micro: int, epoch: int) -> S.Batch:
        return S.assemble(samples, step, micro, self.empty, self.cfg.objective, epoch, text=self.text)

    def loss(self, model: torch.nn.Module, batch: S.Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        with self.precision.autocast:
            batch = S.condition(batch, self.text)
        return S.loss(model, batch, self.cfg.objective, self.sigmas, self.precision)

    def after_backward(self, world: int) -> None:
        """The trained text encoders' gradients averaged over the ranks (the UNet's: DDP's, in the backward)."""
        average_text_gradients(self.text, world)

    def evaluate(self, step: int, sets: list[tuple[str, list[Sample], list]], log: logs.TrainLog | None) -> None:
        """The fixed-noise loss per set (eval_loss on training samples, val_loss on the held-out ones)."""
        for name, samples, history in sets:
            if samples:
                each = S.evaluate_each(self.module, samples, self.cfg.objective, self.sigmas, self.precision,
                                       self.device, self.text)
                history.append([step, float(each.mean())])
                if log is not None:
                    log.evaluation(step, name, each, samples)

    def sample_images(self, step: int, total: int, ema: EMA | None, log: logs.TrainLog | None) -> None:
        """The sample prompts rendered at `step` when due and not on disk yet (main rank; see previews.py): asked
        again at the step a run resumes at, it renders there the set the interrupted run did not finish."""
        if self.previews is None or not self.previews.due(step, total):
            return
        text = self.text if self.text is not None and self.text.cfg.trained else None
        grid = self.previews.render(self.module, step, ema, self.precision.autocast, log.tb if log else None, text)
        if log is not None:
            log.note_text(step, "samples", str(grid.relative_to(self.staging)))
            log.images(step, self.previews.labelled(step))

    def resumed_at(self, step: int) -> None:
        """Sample sets after `step`, partial or incomplete ones are dropped (rendered again when due), and the set of
        `step` itself unless the metrics note it (a run stopped between the set's rename and its metrics line)."""
        if self.previews is not None:
            done = _noted(self.staging / "logs" / "metrics.jsonl", step, "samples")
            self.previews.forget_after(step if done else step - 1)

    def finish(self, eval_set: list[Sample], held: list[Sample], ema: EMA | None) -> None:
        return None

    def summary(self, progress: Any) -> dict:
        return {}


def _noted(metrics: Path, step: int, name: str) -> bool:
    """Whether metrics.jsonl has the line `log.note_text(step, name, ...)` writes."""
    import json

    try:
        lines = metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return False
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and row.get("step") == step and name in row:
            return True
    return False


def _text_encoders(at: Setting) -> textenc.TextEncoders:
    """The text encoders for the step; the shards must hold token ids. With N processes the trained encoders
    are not wrapped in DDP: their gradients are averaged by `average_text_gradients`."""
    cfg = at.cfg
    if not at.data.index.layout.token_ids:
        raise ConfigError(f"{cfg.input}: the shards hold no token ids, which train_text_encoder / shuffle_tags / "
                          f"tag_dropout need: encode again with sdxl encode --token-ids")
    text = textenc.TextEncoders(cfg.text, at.device)
    if at.rank.world > 1:   # rank 0's trained weights everywhere, as DDP does for the UNet when it wraps it
        for p in trained_text_params(text):
            torch.distributed.broadcast(p.data, src=0)
    return text


def trained_text_params(text: textenc.TextEncoders | None) -> list[torch.Tensor]:
    return [p for ps in (text.groups().values() if text is not None else ()) for p in ps]


def average_text_gradients(text: textenc.TextEncoders | None, world: int) -> None:
    """The trained text encoders' gradients averaged over the ranks, as DDP averages the UNet's: one all-reduce
    of them flattened (per dtype), after the last micro-batch's backward pass. The ranks, starting from the same
    weights, then step them alike (so rank 0's checkpoint and every rank's EMA agree). A parameter without a
    gradient (encoder 1's last layer: its penultimate states are used) has none on every rank (same graph)."""
    if world == 1:
        return
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for p in trained_text_params(text):
        if p.grad is not None:
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
    for grads in by_dtype.values():
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


TARGETS.add(TargetKind("unet", "the UNet on encode's latents (method lora: an adapter on it; full: its weights).",
                       UnetTarget))
