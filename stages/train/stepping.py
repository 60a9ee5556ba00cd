"""One optimizer step's mechanics, for the loop (loop.py): DDP's gradient sync on the last micro-batch, the
backward pass (scaled for fp16; with fused backward it steps every parameter), clipping, the step, and the guard
that skips a step with a non-finite loss or gradient and stops a run that keeps making them."""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, ContextManager

import torch

from shared.core.errors import DataError
from shared.core.log import warn
from stages.train import fused

if TYPE_CHECKING:
    from stages.train.loop import Run


def sync(run: Run, last: bool) -> ContextManager:
    """DDP all-reduces gradients only on the last micro-batch of a step."""
    if run.model is run.target.module or last:
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
        run.target.after_backward(run.rank.world)   # what DDP does not average (the text encoders' gradients)
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
