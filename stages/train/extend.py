"""Extending a finished run: asked for more steps or epochs than a finished output holds (nothing else that
changes the training differs), train continues from that output's final checkpoint instead of starting over.

The data plan, the per-sample draws and the global generator are functions of the step, and the checkpoint holds
the whole loop state, so the extended run equals one asked for the longer length from the start whenever the
learning rate of the steps already trained does not depend on the length (constant, or its warmup; a schedule
that decays toward the end is stretched instead: what changes is printed, and training continues on the new one).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from shared.core import artifacts
from shared.core.log import say, warn

if TYPE_CHECKING:
    from stages.train.config import Config
    from stages.train.optim import OptimizerConfig

LENGTH = ("max_steps", "epochs")   # the config keys an extension may change


def only_length_differs(old: dict, new: dict) -> bool:
    keys = set(old) | set(new)
    return any(old.get(k) != new.get(k) for k in LENGTH) and all(old.get(k) == new.get(k) for k in keys - set(LENGTH))


def extendable(previous: Any, config: dict, inputs: dict, code_version: str) -> bool:
    """Whether the finished output `previous` (its manifest) can be continued to this config's length."""
    if previous is None or previous.stage != "train" or previous.code_version != code_version:
        return False
    same_inputs = {k: (previous.inputs.get(k) or {}).get("fingerprint") for k in inputs} == \
                  {k: v["fingerprint"] for k, v in inputs.items()}
    done = int(previous.extra.get("steps") or 0)
    longer = config.get("max_steps", 0) > done if config.get("max_steps") else \
        not previous.config.get("max_steps") and config.get("epochs", 1) > previous.config.get("epochs", 1)
    return same_inputs and longer and only_length_differs(
        {k: previous.config.get(k) for k in config}, config) and bool(previous.extra.get("final_checkpoint"))


def _link_tree(src: Path, dst: Path) -> None:
    """Checkpoints are hard-linked (they are written once, never in place), falling back to copies."""
    def link(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)
    shutil.copytree(src, dst, copy_function=link)


def prepare(out: Path, previous: Any, fingerprint: str, job: str) -> Path:
    """The staging folder of the extension: the finished output's checkpoints (linked), logs, samples, LoRA files
    and held-out record (copied); the run resumes from its final checkpoint."""
    staging = artifacts.staging_dir(out)
    staging.mkdir(parents=True)
    for child in out.iterdir():
        if child.name == artifacts.MANIFEST:
            continue
        if child.name == "checkpoints":
            _link_tree(child, staging / child.name)
        elif child.is_dir():
            shutil.copytree(child, staging / child.name)
        else:
            shutil.copy2(child, staging / child.name)
    artifacts.write_job(staging, "train", fingerprint, job)
    say(f"train: extending the finished run in {out} from step {previous.extra.get('steps')} (its "
        f"{previous.extra['final_checkpoint']})")
    return staging


def schedule_change(make_scheduler: Any, optim_cfg: OptimizerConfig, old_total: int, new_total: int, done: int) -> str | None:
    """How the learning rate of the `done` steps already trained differs between the two lengths (None: it does
    not, so the extension is exact), and where the new schedule continues."""
    def rates(total: int) -> list[float]:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        sched = make_scheduler(opt, optim_cfg, total)
        out = []
        for _ in range(done + 1):
            out.append(float(sched.get_last_lr()[0]))
            opt.step()
            sched.step()
        return out
    old, new = rates(old_total), rates(new_total)
    if all(abs(a - b) <= 1e-12 * max(abs(a), 1e-30) for a, b in zip(old[:done], new[:done])):
        return None
    return (f"the {optim_cfg.lr_schedule} learning-rate schedule depends on the length: its first {done} steps "
            f"were trained over {old_total} steps, not {new_total}; it continues at step {done} with "
            f"{new[done]:.3g} x the peak rate (the {old_total}-step schedule had reached {old[done]:.3g} x)")


def check_length(folder: Path, saved: Any, cfg: Config, schedule: Any, infos: list, world: int) -> None:
    """A checkpoint resumed by a run of another length: refused beyond the run's end; else what changes in the
    learning-rate schedule is printed."""
    from shared.core.errors import ConfigError
    from stages.train import data as D
    from stages.train.optim import make_scheduler

    if saved.step > schedule.total:
        raise ConfigError(f"{folder} is at step {saved.step}, beyond this run's {schedule.total} steps; ask for at "
                          f"least that many (--max-steps / --epochs), or --resume never to start over")
    if all(saved.config.get(k) == getattr(cfg, k) for k in LENGTH):
        return
    old = D.Schedule.make(infos, world, cfg.seed, cfg.batch_size, cfg.accumulate,
                          saved.config.get("epochs", cfg.epochs), saved.config.get("max_steps", 0), cfg.data.partial)
    message = schedule_change(make_scheduler, cfg.optim, old.total, schedule.total, saved.step)
    if message:
        warn(f"extending: {message}")
