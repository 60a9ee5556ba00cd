"""bf16 weights without fp32 master copies (as NovelAI trains): AdamW and Adafactor whose bf16 parameter update is
rounded stochastically, optionally with a Kahan-style compensation buffer.

bf16 keeps 8 significant bits, so under round-to-nearest an update below ~2⁻⁹·|w| is lost. Stochastic rounding
rounds up with probability equal to the remainder's fraction of the gap between the two neighbours, so
E[round(w + Δ)] = w + Δ (Gupta et al. 2015; Zamirai et al. 2020, "Revisiting BFloat16 Training"). A Kahan
buffer (Kahan 1965) keeps each update's rounding error, in the parameter's dtype, and adds it into the next.
The arithmetic is float32; only what is stored is bf16. Written here because none of the kept libraries
offers these updates for AdamW and Adafactor (torch's AdamW rounds to nearest; transformers' Adafactor too).

The random bits of a parameter's update come from a generator seeded by (seed, parameter index, step), so a
resumed run needs no generator state, and stepping each parameter alone (fused backward) draws what the ordinary
step draws.
"""
from __future__ import annotations

import hashlib
import math
from typing import Any

import torch

LOW_BITS = 1 << 16  # the float32 bits below bf16's mantissa


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 `x` rounded to bf16, away from zero with probability (x − trunc(x)) / ulp: adding uniform random
    16-bit integers to the low bits carries into the kept bits with exactly that probability."""
    bits = x.float().contiguous().view(torch.int32)
    noise = torch.randint(0, LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return noise.add_(bits).bitwise_and_(-LOW_BITS).view(torch.float32).to(torch.bfloat16)


def store(target: torch.Tensor, value: torch.Tensor, generator: torch.Generator | None) -> None:
    """Write float32 `value` into `target`: stochastically rounded when `target` is bf16 and a generator is given,
    else as `copy_` rounds (to nearest)."""
    if target.dtype == torch.bfloat16 and generator is not None:
        target.copy_(stochastic_round(value, generator))
    else:
        target.copy_(value)


def store_compensated(target: torch.Tensor, value: torch.Tensor, compensation: torch.Tensor,
                      generator: torch.Generator | None) -> None:
    """Kahan: write `value` + the carried error into `target` and keep the new rounding error in `compensation`
    (the difference of a float32 and its bf16 rounding is exact in float32; storing it in bf16 rounds it in
    turn, stochastically when a generator is given, so that what is left over is unbiased too)."""
    wanted = value + compensation.float()
    store(target, wanted, generator)
    store(compensation, wanted - target.float(), generator)


def adamw_update(w: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, step: int, lr: float,
                 betas: tuple[float, float], eps: float, weight_decay: float) -> None:
    """One AdamW step (Loshchilov & Hutter 2019) on float32 working copies, in place and in torch's order of
    operations (so on float32 weights it is torch's AdamW, bit for bit)."""
    beta1, beta2 = betas
    w.mul_(1 - lr * weight_decay)
    m.lerp_(g, 1 - beta1)
    v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    bc1, bc2 = 1 - beta1 ** step, 1 - beta2 ** step
    denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
    w.addcdiv_(m, denom, value=-lr / bc1)


def step_key(seed: int, index: int, step: int) -> int:
    digest = hashlib.sha256(f"bf16:{seed}:{index}:{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class RoundingOptimizer(torch.optim.Optimizer):
    """What both optimizers share: per-parameter steps in float32, the stored values rounded stochastically
    (`stochastic`) and/or compensated (`kahan`, a buffer per bf16 parameter). `first_index` is the index of this
    optimizer's first parameter among all trained ones (fused backward gives each parameter its own optimizer)."""

    def __init__(self, params: Any, defaults: dict, seed: int, stochastic: bool, kahan: bool,
                 first_index: int = 0):
        super().__init__(params, defaults)
        self.seed, self.stochastic, self.kahan, self.first_index = seed, stochastic, kahan, first_index
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, p: torch.Tensor, state: dict) -> torch.Generator | None:
        if not self.stochastic or p.dtype != torch.bfloat16:
            return None
        if p.device not in self._generators:
            self._generators[p.device] = torch.Generator(device=p.device)
        return self._generators[p.device].manual_seed(step_key(self.seed, state["index"], state["step"]))

    def write(self, p: torch.Tensor, value: torch.Tensor, state: dict, generator: torch.Generator | None) -> None:
        if "compensation" in state:
            store_compensated(p, value, state["compensation"], generator)
        else:
            store(p, value, generator)

    def init_state(self, p: torch.Tensor, index: int) -> dict:
        state = self.state[p]
        if not state:
            state["index"], state["step"] = self.first_index + index, 0
            if self.kahan and p.dtype == torch.bfloat16:
                state["compensation"] = torch.zeros_like(p)
        return state

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        loss = closure() if closure is not None else None
        index = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state = self.init_state(p, index)
                    state["step"] += 1
                    self.step_param(p, group, state)
                index += 1
        return loss

    def step_param(self, p: torch.Tensor, group: dict, state: dict) -> None:
        raise NotImplementedError


class RoundingAdamW(RoundingOptimizer):
    """AdamW for bf16 weights: moments kept in the parameter's dtype (stochastically rounded too), math in
    float32. State per parameter: index, step, exp_avg, exp_avg_sq (+ compensation with `kahan`)."""

    def __init__(self, params: Any, lr: float, betas: tuple[float, float], eps: float, weight_decay: float,
                 seed: int, stochastic: bool = True, kahan: bool = False, first_index: int = 0):
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay), seed,
                         stochastic, kahan, first_index)

    def step_param(self, p: torch.Tensor, group: dict, state: dict) -> None:
        if "exp_avg" not in state:
            state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
        g = self.generator(p, state)
        m, v = state["exp_avg"].float(), state["exp_avg_sq"].float()  # copies, or the float32 state itself
        w = p.float() if p.dtype != torch.float32 else p.detach().clone()
        adamw_update(w, p.grad.float(), m, v, state["step"], group["lr"], group["betas"], group["eps"],
                     group["weight_decay"])
        store(state["exp_avg"], m, g)
        store(state["exp_avg_sq"], v, g)
        self.write(p, w, state, g)


class RoundingAdafactor(RoundingOptimizer):
    """transformers' Adafactor (Shazeer & Stern 2018), its math reused step for step (its static helpers), with
    the bf16 weight written by `write`. Factored second moments of matrices are float32, as transformers keeps
    them. Group keys are transformers': lr, eps (pair), clip_threshold, decay_rate, beta1, weight_decay,
    scale_parameter, relative_step, warmup_init."""

    def __init__(self, params: Any, lr: float, relative_step: bool, scale_parameter: bool, warmup_init: bool,
                 weight_decay: float, seed: int, stochastic: bool = True, kahan: bool = False,
                 first_index: int = 0):
        defaults = dict(lr=lr, eps=(1e-30, 1e-3), clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                        weight_decay=weight_decay, scale_parameter=scale_parameter, relative_step=relative_step,
                        warmup_init=warmup_init)
        super().__init__(params, defaults, seed, stochastic, kahan, first_index)

    def step_param(self, p: torch.Tensor, group: dict, state: dict) -> None:
        from transformers.optimization import Adafactor as A

        grad = p.grad.float()
        factored, first_moment = A._get_options(group, grad.shape)
        if "RMS" not in state:
            _adafactor_init(state, grad, factored, first_moment)
        w = p.float()
        state["RMS"] = A._rms(w)
        lr = A._get_lr(group, state)
        beta2t = 1.0 - math.pow(state["step"], group["decay_rate"])
        update = _second_moment_update(state, grad, factored, beta2t, group["eps"][0])
        update.div_((A._rms(update) / group["clip_threshold"]).clamp_(min=1.0))
        update.mul_(lr)
        if first_moment:
            state["exp_avg"].mul_(group["beta1"]).add_(update, alpha=1 - group["beta1"])
            update = state["exp_avg"]
        if group["weight_decay"] != 0:
            w.add_(w, alpha=-group["weight_decay"] * lr)
        w.sub_(update)  # = add_(-update), without its temporary
        del grad, update  # the rounding's temporaries come next
        self.write(p, w, state, self.generator(p, state))


def _adafactor_init(state: dict, grad: torch.Tensor, factored: bool, first_moment: bool) -> None:
    if first_moment:
        state["exp_avg"] = torch.zeros_like(grad)
    if factored:
        state["exp_avg_sq_row"] = torch.zeros(grad.shape[:-1]).to(grad)
        state["exp_avg_sq_col"] = torch.zeros(grad.shape[:-2] + grad.shape[-1:]).to(grad)
    else:
        state["exp_avg_sq"] = torch.zeros_like(grad)


def _second_moment_update(state: dict, grad: torch.Tensor, factored: bool, beta2t: float, eps: float
                          ) -> torch.Tensor:
    """Adafactor's preconditioned gradient, its second-moment estimates updated in place (transformers' order of
    operations)."""
    from transformers.optimization import Adafactor as A

    update = grad.square().add_(eps)
    if factored:
        row, col = state["exp_avg_sq_row"], state["exp_avg_sq_col"]
        row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
        col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
        del update
        return A._approx_sq_grad(row, col).mul_(grad)
    state["exp_avg_sq"].mul_(beta2t).add_(update, alpha=1.0 - beta2t)
    return state["exp_avg_sq"].rsqrt().mul_(grad)
