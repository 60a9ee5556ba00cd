"""Device memory given back to the host during a step: activation offload and block swap.

Activation offload: the tensors the forward pass saves for the backward pass (activations, and the bf16 copies of
weights that autocast makes) are copied to CPU memory (pinned on CUDA, so the copies run asynchronously) as they
are saved and copied back when the backward pass needs them (`torch.autograd.graph.saved_tensors_hooks`, as
`torch.autograd.graph.save_on_cpu` does, but leaving the parameters where they are: they are resident already).

Block swap: of the UNet's blocks (each ResnetBlock2D, BasicTransformerBlock, Downsample2D and Upsample2D), the
`blocks_to_swap` largest live in (pinned) CPU memory and are streamed to the device just before they run: a
block's forward pre-hook makes it resident (waiting for its prefetch) and starts copying the next swapped block of
the forward order on a side CUDA stream, so the copy overlaps this block's compute; its forward hook sends it
back (its parameters point at their host copies again; the device copy is freed once the compute stream is past
it) and, when the pass records a graph, puts a hook on its output whose gradient arrives just before the block's
own backward: there it comes back (prefetching the block before it), and the blocks after it, whose backward is
done, go back with their gradients. On the CPU the same moves are synchronous copies, so the mechanics and the
results are tested there (tests/test_offload.py).

The host copy is the weight: a trained parameter whose block is swapped is stepped on the CPU by the optimizer
(its gradient is moved to the host with it, as ZeRO-offload does), so between steps every swapped parameter
lives on the host, where the optimizer, the EMA and checkpoints read it. The latest moves are recorded in `trace`
(the tests read where the weights live and in which order the hooks fired).
"""
from __future__ import annotations

from shared.core.config import opt

import collections
import contextlib
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch.utils._pytree import tree_flatten

#: the blocks that can be swapped, by class name (diffusers' UNet2DConditionModel)
UNITS = ("ResnetBlock2D", "BasicTransformerBlock", "Downsample2D", "Upsample2D")


@dataclass(frozen=True, kw_only=True)
class OffloadConfig:
    """What leaves the device during a step: options of `sdxl train` (config.py composes them)."""
    activation_offload: bool = opt(False, "Keep the activations saved for the backward pass in CPU memory (pinned "
                                          "on CUDA) instead of on the device (less device memory, a copy each way "
                                          "per step; results unchanged).", fingerprint=False)
    blocks_to_swap: int = opt(0, "Keep the UNet's N largest blocks (ResNet, transformer, up/downsampler) in CPU "
                                 "memory and stream each to the device just before it runs, on a side CUDA stream "
                                 "overlapping compute; their weights are stepped on the CPU (results unchanged; "
                                 "one process; 0 = off).", ge=0, fingerprint=False)


class ActivationOffload(torch.autograd.graph.saved_tensors_hooks):
    """Saved tensors (not parameters) copied to the host when saved and back to their device when used."""

    def __init__(self) -> None:
        self.packed = self.unpacked = self.bytes = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if isinstance(t, torch.nn.Parameter):
            return t
        # the copy keeps the strides (a chunk of a wider tensor stays strided): a backward kernel handed other
        # strides may take another code path (vectorised or not) and round differently; a broadcast dimension
        # (stride 0) is stored once and expanded again
        base = t
        for dim, (size, stride) in enumerate(zip(t.shape, t.stride())):
            if stride == 0 and size > 1:
                base = base.narrow(dim, 0, 1)
        pin = t.device.type == "cuda"
        host = torch.empty_strided(base.size(), base.stride(), dtype=t.dtype, pin_memory=pin)
        try:
            host.copy_(base, non_blocking=pin)
        except RuntimeError:   # elements that overlap otherwise (an unfold view): left where it is
            return t
        self.packed += 1
        self.bytes += base.numel() * base.element_size()
        return t.device, host, t.shape

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        self.unpacked += 1
        device, host, shape = packed
        back = torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=device)
        back.copy_(host, non_blocking=host.is_pinned())
        return back.expand(shape)


def swap_units(unet: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The swappable blocks of the UNet, in module order (outer ones only: a block inside another is its part)."""
    found: list[tuple[str, torch.nn.Module]] = []
    for name, module in unet.named_modules():
        if type(module).__name__ in UNITS and not any(name.startswith(f + ".") for f, _ in found):
            found.append((name, module))
    return found


def unit_bytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def chosen_units(unet: torch.nn.Module, count: int) -> list[tuple[str, torch.nn.Module]]:
    """The `count` largest blocks (the earlier of equal ones), in module order: those block swap keeps on the host."""
    units = swap_units(unet)
    ranked = sorted(range(len(units)), key=lambda i: (-unit_bytes(units[i][1]), i))
    return [units[i] for i in sorted(ranked[:count])]


class Block:
    """One swapped block: its tensors' host copies (pinned on CUDA), and where its tensors point now."""

    def __init__(self, name: str, module: torch.nn.Module, device: torch.device):
        self.name, self.module, self.device = name, module, device
        self.tensors = [*module.parameters(), *module.buffers()]
        pin = device.type == "cuda"
        self.host = [t.detach().to("cpu", copy=True) for t in self.tensors]
        if pin:
            self.host = [h.pin_memory() for h in self.host]
        self.pending: list[torch.Tensor] | None = None   # device copies being made (prefetch)
        self.event: Any = None
        self.resident = True
        self.evict(grads=False)

    def copies(self, stream: Any) -> None:
        """Start the host → device copies (on `stream` when on CUDA)."""
        if self.resident or self.pending is not None:
            return
        if stream is None:
            self.pending = [h.to(self.device, copy=True) for h in self.host]
            return
        with torch.cuda.stream(stream):
            self.pending = [h.to(self.device, non_blocking=True) for h in self.host]
            self.event = stream.record_event()

    @torch.no_grad()
    def load(self, stream: Any, grads: bool) -> None:
        if self.resident:
            return
        self.copies(stream)
        if self.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(self.event)
            for d in self.pending:
                d.record_stream(compute)   # freed only after the compute stream is done with it
        for t, d in zip(self.tensors, self.pending):
            _point(t, d, grads)
        self.pending, self.event, self.resident = None, None, True

    @torch.no_grad()
    def evict(self, grads: bool) -> None:
        if not self.resident:
            return
        for t, h in zip(self.tensors, self.host):
            _point(t, h, grads)
        self.resident = False

    def on_host(self) -> bool:
        """Whether every tensor of the block points at its host copy."""
        return all(t.data_ptr() == h.data_ptr() for t, h in zip(self.tensors, self.host))


def _point(t: torch.Tensor, data: torch.Tensor, grads: bool) -> None:
    """`t` made to hold `data` (its gradient, if any and asked, moved along to the same device)."""
    grad = t.grad if grads and isinstance(t, torch.nn.Parameter) else None
    if grad is not None:
        t.grad = None
    t.data = data
    if grad is not None:
        t.grad = grad.to(data.device)


class BlockSwap:
    """The swapped blocks of a UNet and the hooks that move them (see the module's doc)."""

    def __init__(self, unet: torch.nn.Module, count: int, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.blocks = [Block(name, module, device) for name, module in chosen_units(unet, count)]
        self.order: list[Block] = []        # the forward order, as first seen
        self.backward = False
        # the latest moves (one step's worth and more; bounded, so a long run does not grow it)
        self.trace: collections.deque = collections.deque(maxlen=8 * len(self.blocks) + 8)
        self.hooks = []
        for b in self.blocks:
            self.hooks.append(b.module.register_forward_pre_hook(lambda m, a, b=b: self._before(b)))
            self.hooks.append(b.module.register_forward_hook(lambda m, a, out, b=b: self._after(b, out)))

    def _next(self, block: Block, step: int) -> Block | None:
        if block not in self.order:
            return None
        i = self.order.index(block) + step
        return self.order[i] if 0 <= i < len(self.order) else None

    def _before(self, block: Block) -> None:
        if block not in self.order and not self.backward:
            self.order.append(block)
        self.trace.append(("load", block.name))
        block.load(self.stream, grads=self.backward)
        if not self.backward:
            after = self._next(block, 1)
            if after is not None:
                after.copies(self.stream)

    def _after(self, block: Block, out: Any) -> None:
        if self.backward:
            return   # a checkpointed block recomputed in the backward pass: its backward comes next
        self.trace.append(("evict", block.name))
        block.evict(grads=False)
        tensors = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor) and t.requires_grad]
        if torch.is_grad_enabled() and tensors:
            tensors[0].register_hook(lambda g, b=block: self._backward_reaches(b))

    def _backward_reaches(self, block: Block) -> None:
        """The gradient of the block's output exists: its backward is next; the blocks after it are done."""
        position = self.order.index(block)
        for later in self.order[position + 1:]:
            if later.resident:
                self.trace.append(("evict", later.name))
                later.evict(grads=True)
        self.trace.append(("load", block.name))
        block.load(self.stream, grads=True)
        before = self._next(block, -1)
        if before is not None:
            before.copies(self.stream)

    @contextlib.contextmanager
    def backward_pass(self) -> Iterator[None]:
        """Around `loss.backward()`: every swapped block ends on the host, with its gradients."""
        self.backward = True
        try:
            yield
        finally:
            self.backward = False
            for b in self.blocks:
                if b.resident or b.pending is not None:
                    self.trace.append(("evict", b.name))
                b.pending, b.event = None, None
                b.evict(grads=True)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


class Offload:
    """The step's memory savers as two contexts for the loop: around the forward pass and the backward pass."""

    def __init__(self, cfg: OffloadConfig, unet: torch.nn.Module, device: torch.device):
        self.activations = ActivationOffload() if cfg.activation_offload else None
        self.swap = BlockSwap(unet, cfg.blocks_to_swap, device) if cfg.blocks_to_swap else None

    @contextlib.contextmanager
    def forward(self) -> Iterator[None]:
        with self.activations if self.activations is not None else contextlib.nullcontext():
            yield

    def backward(self) -> contextlib.AbstractContextManager:
        return self.swap.backward_pass() if self.swap is not None else contextlib.nullcontext()


def problem(cfg: OffloadConfig, units: int, world: int) -> str | None:
    """Why block swap cannot run on this UNet / launch (None: it can)."""
    if cfg.blocks_to_swap >= units:
        return (f"blocks_to_swap {cfg.blocks_to_swap}: the UNet has {units} swappable blocks (ResNet, transformer, "
                f"up/downsampler); swap at most {units - 1} so that one stays resident")
    if cfg.blocks_to_swap and world > 1:
        return (f"blocks_to_swap keeps weights on the host, which DistributedDataParallel cannot average across "
                f"the {world} processes: train on one process, or set blocks_to_swap 0")
    return None


def install(cfg: OffloadConfig, unet: torch.nn.Module, device: torch.device, world: int) -> Offload:
    """The run's Offload (its hooks installed, the swapped blocks sent to the host), or a ConfigError."""
    from shared.core.errors import ConfigError

    why = problem(cfg, len(swap_units(unet)), world)
    if why:
        raise ConfigError(why)
    return Offload(cfg, unet, device)
