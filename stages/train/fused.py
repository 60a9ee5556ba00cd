"""Fused backward: the optimizer steps each parameter inside the backward pass, in the parameter's
post-accumulate-grad hook (`Tensor.register_post_accumulate_grad_hook`, called once its gradient is final), and
frees that gradient at once, so the gradients of the whole model never exist together (torch's tutorial "How to
save memory by fusing the optimizer step into the backward pass").

Each parameter gets its own optimizer (made by the same factory as the ordinary one, for a one-parameter group),
so every step is the ordinary step of that parameter: after N steps the weights equal those of the ordinary
loop (tested). The state_dict has the ordinary optimizer's layout (state by global parameter index, one param
group per named group), so a checkpoint resumes with fused backward on or off.

What cannot be honoured is refused where the config is made (optim.OptimizerConfig.problem): accumulation over
micro-batches (a weight would be stepped per micro-batch), global-norm clipping (the norm exists only after the
last gradient), fp16's gradient scaler, and optimizers whose step couples the parameters (prodigy's d).
A parameter whose gradient is not finite is not stepped, and the step counts as a bad one.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch

Factory = Callable[[list[dict], int], torch.optim.Optimizer]


class FusedBackward(torch.optim.Optimizer):
    """The per-parameter optimizers and their hooks. `param_groups` are the inner optimizers' own group dicts
    (one per parameter), so an LR scheduler sets the rate each of them steps with."""

    def __init__(self, groups: list[dict], make: Factory):
        self.inner: list[torch.optim.Optimizer] = []
        self.owner: list[int] = []       # the named group of each parameter
        params = []
        for number, group in enumerate(groups):
            for p in group["params"]:
                self.inner.append(make([{**group, "params": [p]}], len(params)))
                self.owner.append(number)
                params.append(p)
        super().__init__(params, {})
        self.param_groups = [o.param_groups[0] for o in self.inner]
        self.hooks = [p.register_post_accumulate_grad_hook(functools.partial(self._step, i))
                      for i, p in enumerate(params)]
        self.begin()

    def begin(self) -> None:
        """Before a backward pass: reset the squared gradient norm and the count of non-finite gradients."""
        self.norm_sq: torch.Tensor | float = 0.0
        self.nonfinite = 0

    def end(self) -> tuple[float, int]:
        """After the backward pass: (gradient norm over every parameter, parameters not stepped)."""
        return float(self.norm_sq) ** 0.5, self.nonfinite

    @torch.no_grad()
    def _step(self, index: int, p: torch.Tensor) -> None:
        sq = torch.linalg.vector_norm(p.grad, dtype=torch.float32).square()
        if bool(torch.isfinite(sq)):  # a sync per parameter: what it costs is measured in the GPU suite
            self.inner[index].step()
            self.norm_sq = self.norm_sq + sq
        else:
            self.nonfinite += 1
        p.grad = None

    def step(self, closure: Any = None) -> Any:
        """Nothing to do: every parameter was stepped in the backward pass."""
        return closure() if closure is not None else None

    def state_dict(self) -> dict:
        inner = [o.state_dict() for o in self.inner]
        state = {i: s["state"][0] for i, s in enumerate(inner) if 0 in s["state"]}
        groups = []
        for number in sorted(set(self.owner)):
            members = [i for i, o in enumerate(self.owner) if o == number]
            hyper = {k: v for k, v in inner[members[0]]["param_groups"][0].items() if k != "params"}
            groups.append({**hyper, "params": members})
        return {"state": state, "param_groups": groups}

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict["state"]
        for group in state_dict["param_groups"]:
            hyper = {k: v for k, v in group.items() if k != "params"}
            for i in group["params"]:
                own = {0: saved[i]} if i in saved else {}
                self.inner[i].load_state_dict({"state": own, "param_groups": [{**hyper, "params": [0]}]})
        self.param_groups = [o.param_groups[0] for o in self.inner]

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()
