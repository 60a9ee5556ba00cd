"""FSDP2 (`torch.distributed.fsdp.fully_shard`, torch >= 2.6) for a full fine-tune across processes: each UNet
block (model.blocks) and then the whole UNet are sharded, so every process holds 1/N of the weights, gradients
and AdamW state and gathers one block's weights at a time.

Checkpoints are those of a DDP run (full tensors, the optimizer's state by parameter index): every process
gathers each part's state together (`snapshots`, a collective) and rank 0 writes it; on resume every process
reads the full tensors and keeps its own shard (`load_full`, `shard_optimizer_state`). So a run resumes across
DDP and FSDP, and kill -9 resume is bitwise as with DDP (tests/test_launchers.py).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from shared.core import ranks

try:   # torch >= 2.5 (public DTensor); the loop imports this module only when sharding
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch < 2.5 is not supported (pyproject asks for 2.6)
    DTensor = distribute_tensor = None

PARALLEL = ("ddp", "fsdp")


def problem(parallel: str, method: str, optimizer: str, shardable: bool, weights_dtype: str, mixed_precision: str,
            ema_on_cpu: bool = False) -> str | None:
    """Why FSDP cannot train this config (None: it can, or DDP is asked); `shardable`: whether the optimizer
    steps sharded parameters (its registry entry)."""
    if parallel != "fsdp":
        return None
    if method != "full":
        return "parallel fsdp shards a full fine-tune's weights; a LoRA is small enough for ddp: use parallel ddp"
    if not shardable:
        return f"parallel fsdp steps sharded weights with torch's adamw, not {optimizer}: use optimizer adamw"
    if weights_dtype != "float32":
        return ("parallel fsdp keeps float32 weights (the bf16 rounding optimizers do not take sharded tensors): "
                "use weights_dtype float32 with mixed_precision bf16")
    if mixed_precision == "fp16":
        return "parallel fsdp has no gradient scaler for fp16 here: use mixed_precision bf16"
    if ema_on_cpu:   # a sharded tensor's copy on the host would belong to no process group's device mesh
        return "parallel fsdp keeps each process's EMA shard beside its weights: use ema_device device"
    return None


def shard(unet: torch.nn.Module, blocks: list[torch.nn.Module]) -> None:
    """Shard each block, then the rest of the UNet, over every process (in place)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(unet)


def is_sharded(module: torch.nn.Module) -> bool:
    return DTensor is not None and any(isinstance(p, DTensor) for p in module.parameters())


def full(state: Any) -> Any:
    """`state` with every sharded tensor gathered whole (a collective: every process calls it, in one order)."""
    if DTensor is not None and isinstance(state, DTensor):
        return state.full_tensor()
    if isinstance(state, dict):
        return {k: full(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(full(v) for v in state)
    return state


class Snapshot:
    """A part's state, gathered once on every process; what rank 0 writes."""

    def __init__(self, state: Any):
        self.state = state

    def state_dict(self) -> Any:
        return self.state

    def load_state_dict(self, state: Any) -> None:  # pragma: no cover - snapshots are only written
        raise TypeError("a snapshot is written, not loaded")


def snapshots(parts: dict[str, Any]) -> dict[str, Snapshot]:
    return {name: Snapshot(full(part.state_dict())) for name, part in parts.items()}


@torch.no_grad()
def load_full(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> list[str]:
    """Copy full tensors into a sharded module's parameters and buffers (each process keeps its shard); the
    names of `module`'s state that `state` lacks."""
    missing = []
    for name, t in module.state_dict().items():
        if name not in state:
            missing.append(name)
            continue
        value = state[name].to(t.device, t.dtype)
        if isinstance(t, DTensor):
            value = distribute_tensor(value, t.device_mesh, t.placements)
        t.copy_(value)
    return missing


def shard_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """After loading a full optimizer state: each state tensor shaped like its sharded parameter sharded as it."""
    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            state = opt.state.get(p, {})
            for key, value in state.items():
                if torch.is_tensor(value) and not isinstance(value, DTensor) and value.shape == p.shape:
                    state[key] = distribute_tensor(value.to(p.device), p.device_mesh, p.placements)


def barrier(rank: ranks.Rank) -> Callable[[], None]:
    """A wait for every rank (nothing to wait for in one process)."""
    return torch.distributed.barrier if rank.world > 1 else lambda: None


def init_distributed(rank: ranks.Rank, device: torch.device) -> bool:
    if rank.world == 1 or torch.distributed.is_initialized():
        return False
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True
