"""Training logs on the main rank: a progress bar, `logs/metrics.jsonl`, TensorBoard scalars, and WandB when
asked for (scalars, and the sample images with their grid as wandb.Image). Loss is also binned by timestep
position (10 bins), since a mean over random timesteps hides which noise levels improve."""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.core.errors import ConfigError
from shared.core.config import opt

BINS = 10


@dataclass(frozen=True, kw_only=True)
class LogConfig:
    """What the main rank measures and where it goes: options of `sdxl train` (config.py composes them)."""
    log_every: int = opt(10, "Write metrics every N optimizer steps.", fingerprint=False, ge=1)
    eval_samples: int = opt(8, "Samples in the fixed evaluation set (loss on fixed noise and timesteps, at the "
                               "start, at each checkpoint and at the end); 0 = off.", fingerprint=False, ge=0)
    tensorboard: bool = opt(True, "Write TensorBoard scalars to <out>/logs/tensorboard.", fingerprint=False)
    wandb: bool = opt(False, "Also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline "
                             "works without an account).", fingerprint=False)
    wandb_project: str = opt("sdxl-stages", "WandB project name.", fingerprint=False, nonempty=True)
    item_losses: bool = opt(False, "Log each evaluated item's loss with its id and caption to "
                                   "<out>/logs/item_losses.jsonl (to find bad captions).", fingerprint=False)


class TrainLog:
    def __init__(self, cfg: LogConfig, folder: Path, total: int, start: int, batch_per_step: int,
                 run_config: dict):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics = folder / "metrics.jsonl"
        self.items = folder / "item_losses.jsonl" if cfg.item_losses else None
        _truncate_after(self.metrics, start)
        if self.items is not None:
            _truncate_after(self.items, start)
        self.batch_per_step = batch_per_step
        self.bar = _bar(total, start)
        self.tb = _tensorboard(folder / "tensorboard") if cfg.tensorboard else None
        self.wandb = _wandb(cfg.wandb_project, folder, run_config) if cfg.wandb else None
        self.clock, self.clock_step = time.monotonic(), start

    def step(self, step: int, loss: float, lr: float, epoch: float = 0.0) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=f"{epoch:.2f}", loss=f"{loss:.4f}", lr=f"{lr:.2e}", refresh=False)

    def write(self, step: int, values: dict[str, float], bins: list[float | None]) -> None:
        now = time.monotonic()
        rate = (step - self.clock_step) / max(now - self.clock, 1e-9)
        self.clock, self.clock_step = now, step
        row = dict(values, step=step, samples_per_s=round(rate * self.batch_per_step, 3),
                   steps_per_s=round(rate, 4))
        for i, v in enumerate(bins):
            if v is not None:
                row[f"loss_t{i * 100 // BINS:02d}"] = v
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.bar is not None:
            self.bar.set_postfix(epoch=f"{values.get('epoch', 0):.2f}", loss=f"{values['loss']:.4f}",
                                 lr=f"{values['lr']:.2e}", samples_s=f"{row['samples_per_s']:.1f}")
        scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
        if self.tb is not None:
            for k, v in scalars.items():
                tag = f"loss_by_timestep/{k[6:]}" if k.startswith("loss_t") else f"train/{k}"
                self.tb.add_scalar(tag, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)

    def evaluation(self, step: int, name: str, each: Any, samples: list) -> None:
        """A fixed-noise loss (`each`: [samples, EVAL_FRACTIONS] tensor): its mean and per-timestep columns in
        metrics.jsonl (`<name>`, `<name>_t10` …) and TensorBoard (eval/<name>, <name>_by_timestep/t10 …), and with
        item_losses each sample's mean loss, id and caption in item_losses.jsonl."""
        from stages.train.step import EVAL_FRACTIONS

        row = {"step": step, name: float(each.mean())}
        row.update({f"{name}_t{round(f * 100):02d}": float(v) for f, v in zip(EVAL_FRACTIONS, each.mean(dim=0))})
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step":
                    self.tb.add_scalar(f"eval/{k}" if k == name else f"{name}_by_timestep/{k[len(name) + 1:]}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"eval/{k}": v for k, v in row.items() if k != "step"}, step=step)
        if self.items is not None:
            with open(self.items, "a", encoding="utf-8") as fh:
                for s, loss in zip(samples, each.mean(dim=1)):
                    fh.write(json.dumps({"step": step, "set": name, "id": s.key, "caption": s.caption,
                                         "loss": float(loss)}, ensure_ascii=False) + "\n")

    def measures(self, step: int, values: dict[str, float], group: str) -> None:
        """Measurements at `step` (e.g. the VAE target's PSNR): one metrics.jsonl row of `values`, and each as
        `<group>/<name>` in TensorBoard and WandB."""
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, **values}) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(f"{group}/{k}", v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({f"{group}/{k}": v for k, v in values.items()}, step=step)

    def images(self, step: int, images: dict[str, tuple[Path, str]]) -> None:
        """Image files ({name: (path, caption)}, e.g. the sample grid) to WandB; TensorBoard gets the sample
        images where they are rendered (previews.py)."""
        if self.wandb is not None:
            import wandb

            self.wandb.log({name: wandb.Image(str(path), caption=caption) for name, (path, caption) in images.items()},
                           step=step)

    def note_text(self, step: int, name: str, value: str) -> None:
        """A non-numeric line of metrics.jsonl (e.g. where the sample grid was written)."""
        with open(self.metrics, "a", encoding="utf-8") as fh:
            fh.write(json.dumps({"step": step, name: value}) + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _truncate_after(path: Path, step: int) -> None:
    """A resumed run rewrites the metrics of steps after its checkpoint (they are trained again)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except ValueError:
            continue
    partial = path.with_name(path.name + ".partial")   # a stop while rewriting loses no line
    partial.write_text("".join(k + "\n" for k in keep), encoding="utf-8")
    partial.replace(path)


def _bar(total: int, start: int) -> Any:
    from tqdm import tqdm

    forced = os.environ.get("SDXL_PROGRESS")
    disable = (forced == "0") if forced is not None else None
    return tqdm(total=total, initial=start, desc="train", unit="step", disable=disable, dynamic_ncols=True,
                smoothing=0.1, file=sys.stderr)


def _tensorboard(folder: Path) -> Any:
    from torch.utils.tensorboard import SummaryWriter  # tensorboard is a required dependency

    return SummaryWriter(log_dir=str(folder))


def _wandb(project: str, folder: Path, run_config: dict) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb: the wandb package is not installed (pip install wandb)") from None
    return wandb.init(project=project, dir=str(folder), config=run_config, resume="allow")


class Window:
    """Loss statistics between two log lines (summed over ranks when written)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(2 + 2 * BINS, dtype=torch.float64, device=device)
        self.norm = 0.0

    def add(self, loss: torch.Tensor, per_sample: torch.Tensor, u: torch.Tensor | None) -> None:
        """`u`: each sample's timestep position, binned; None where there is none (the VAE target)."""
        self.sums[0] += loss.double()
        self.sums[1] += 1
        if u is None:
            return
        bins = (u.to(self.sums.device) * BINS).long().clamp(0, BINS - 1)
        self.sums[2:2 + BINS].index_add_(0, bins, per_sample.double())
        self.sums[2 + BINS:].index_add_(0, bins, torch.ones_like(per_sample, dtype=torch.float64))

    def reduce(self, world: int) -> dict:
        if world > 1:
            torch.distributed.all_reduce(self.sums)
        s = self.sums.cpu()
        counts = s[2 + BINS:]
        bins = [float(s[2 + i] / counts[i]) if counts[i] > 0 else None for i in range(BINS)]
        return {"loss": float(s[0] / max(s[1], 1)), "grad_norm": self.norm, "bins": bins}


def epoch_position(schedule: Any, step: int) -> float:
    """Epochs done after `step` optimizer steps, with the fraction of the current one (1.5 = half way into the
    second)."""
    epoch, in_epoch = schedule.locate(step)
    return epoch + (in_epoch / schedule.steps[epoch] if epoch < len(schedule.steps) else 0.0)


class WallClock:
    """Wall time of each part of a run (the first start and each resume) and in all, kept in
    `<staging>/logs/parts.json` (main rank), noted at every log line and checkpoint: what the manifest reports, so
    a run resumed after an interrupt reports its whole time, not its last part's."""

    def __init__(self, folder: Path, step: int, main: bool):
        self.path, self.main, self.started = folder / "parts.json", main, time.monotonic()
        self.parts: list[dict] = self._earlier() if main else []
        self.parts.append({"from_step": step, "to_step": step, "seconds": 0.0})

    def _earlier(self) -> list[dict]:
        try:
            parts = json.loads(self.path.read_text(encoding="utf-8"))
            return [{k: p[k] for k in ("from_step", "to_step", "seconds")} for p in parts]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, TypeError, KeyError):  # damaged: the earlier parts' time is unknown
            return [{"from_step": None, "to_step": None, "seconds": None}]

    def note(self, step: int) -> None:
        if not self.main:
            return
        self.parts[-1].update(to_step=step, seconds=round(time.monotonic() - self.started, 1))
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.parts) + "\n", encoding="utf-8")
        partial.replace(self.path)

    @property
    def total(self) -> float | None:
        """Seconds of every part (None when an earlier part's record was damaged)."""
        known = [p["seconds"] for p in self.parts]
        return None if None in known else round(sum(known), 1)
