"""`sdxl train --plan`: the predicted peak device memory of the configured run, without a GPU.

The parts that are state are counted exactly from the parameters' shapes and dtypes: the weights (the UNet's
parameters and buffers, the LoRA's included), the gradients of the trained ones, the optimizer's state (each
optimizer's own layout, `state_bytes`; tested against the real optimizers' state) and the EMA. What the forward
and backward pass hold is measured: the UNet is built from its config on fake tensors (FakeTensorMode: shapes,
dtypes and devices, no data) and made trainable exactly as training does (model.prepare), the training loss
(step.loss) of the largest bucket and batch is run forward and backward, and a dispatch mode adds up the bytes of
every storage an operation makes until it is freed. The optimizer step's own temporaries are measured the same
way where the step runs on fake tensors (else estimated, and marked so). When the step runs the text encoders
(textenc.py) they are built the same way (meta device, then fake tensors, prepared by textenc.TextEncoders), their
bytes counted as the UNet's in rows of their own, and their forward over the batch's caption window runs before
the UNet's in the measured pass.

peak = weights + optimizer state + EMA + max(forward/backward peak (gradients included as they appear, or freed
at once with fused backward), gradients + step temporaries). The memory savers change the parts they move: a
quantized base counts each frozen layer's stored bytes (quant.layer_bytes); with block swap the swapped blocks'
weights, and their trained weights' gradients, optimizer state and EMA, are on the host, and the device holds two
of them at a time (the one running, the one arriving); with activation offload the saved tensors leave the device
as they are saved (measured: the pass runs with the offload's hooks, the saved tensors dropped and remade on use). Not counted: the CUDA context, cuDNN / cuBLAS
workspaces and the allocator's fragmentation (what `torch.cuda.max_memory_allocated` also leaves out, except
workspaces; the GPU suite compares the two).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import tomllib
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

from shared.core.errors import ConfigError, PipelineError
from shared.models import loading as models
from stages.train import model as M, objective, offload as OF, optim as O, quant, step as S, textenc

if TYPE_CHECKING:
    from stages.train.config import Config

GIB = 2 ** 30
TOKENS = 77                           # one caption window (the cross-attention's share of memory is small)


@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    how: str


@dataclass(frozen=True)
class Plan:
    title: str
    parts: list[Part]
    peak: int

    def table(self) -> str:
        rows = [f"{self.title}", f"  {'part':<24} {'GiB':>8}  how"]
        rows += [f"  {p.name:<24} {p.bytes / GIB:>8.2f}  {p.how}" for p in self.parts]
        rows.append(f"  {'predicted peak':<24} {self.peak / GIB:>8.2f}  (per process; CUDA context and workspaces not "
                    f"included)")
        return "\n".join(rows)


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def param_state_bytes(cfg: O.OptimizerConfig, shape: torch.Size, dtype: torch.dtype, rounding: bool) -> int:
    """The optimizer state one parameter of `shape` and `dtype` gets (its first step allocates it all): the
    optimizer's own count (its registry entry)."""
    return O.OPTIMIZERS[cfg.optimizer].state_bytes(cfg, shape, dtype, rounding)


def state_bytes(cfg: O.OptimizerConfig, groups: list[dict], within: list[dict] | None = None) -> int:
    """The optimizer state of `groups` (stepped by one optimizer with the groups `within`, default themselves)."""
    rounding = O.rounds_bf16(cfg, within if within is not None else groups)
    return sum(param_state_bytes(cfg, p.shape, p.dtype, rounding) for g in groups for p in g["params"])


class LiveBytes(TorchDispatchMode):
    """Adds up the bytes of every storage an operation makes (views share their base's) until it is freed; the
    peak of all of it, and the peak less the gradients kept so far (`keep_grad`)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.live = self.peak = self.peak_less_grads = self.grads = 0
        self.text = 0   # what the text encoders' forward left live (forward_backward)

    def known(self, tensors: list[torch.Tensor]) -> None:
        """Storages made before (weights, optimizer state): not counted."""
        for t in tensors:
            self.seen[t.untyped_storage()] = 0

    def keep_grad(self, grad: torch.Tensor) -> None:
        self.grads += grad.untyped_storage().nbytes()

    def _free(self, size: int) -> None:
        self.live -= size

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage() not in self.seen:
                storage = t.untyped_storage()
                size = storage.nbytes()
                self.seen[storage] = size
                weakref.finalize(storage, self._free, size)
                self.live += size
                self.peak = max(self.peak, self.live)
                self.peak_less_grads = max(self.peak_less_grads, self.live - self.grads)
        return out


def unet_config(model: str) -> dict:
    """The UNet's diffusers config of `model` (no weights are read)."""
    return part_config(model, "unet")


def part_config(model: str, part: str) -> dict:
    """The config of one part of `model` (unet, text_encoder, ...) as its config.json holds it (no weights are
    read)."""
    if model in ("builtin:tiny", "builtin:sdxl-random"):
        return (models.tiny_configs() if model == "builtin:tiny" else models.sdxl_configs())[part]
    path = Path(model).expanduser()
    folder = models.single_file_config(path) if path.is_file() else path
    config = folder / part / "config.json"
    if not config.is_file():
        raise PipelineError(f"--model {model}: no {part} config at {config} (a diffusers SDXL folder, a single-file "
                            f"SDXL checkpoint, builtin:tiny or builtin:sdxl-random)")
    return json.loads(config.read_text(encoding="utf-8"))


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def fake_unet(cfg: M.UnetConfig, mode: Any) -> Any:
    """The UNet of `cfg.model` on fake CPU tensors, in its training dtype, prepared as training prepares it: built
    on the meta device (peft moves modules with `.to`, which fake parameters refuse), then each parameter and
    buffer replaced by a fake tensor of the same shape, dtype and strides."""
    M.models.quiet_libraries()
    from diffusers import UNet2DConditionModel

    with torch.device("meta"), default_dtype(getattr(torch, cfg.weights_dtype)):
        unet = M.prepare(UNet2DConditionModel.from_config(unet_config(cfg.model)), cfg)
    return faked(unet, mode)


def faked(model: Any, mode: Any) -> Any:
    """`model` (on the meta device) with each parameter and buffer replaced by a fake CPU tensor of the same
    shape, dtype and strides."""
    with mode:
        for module in model.modules():
            for name, p in module._parameters.items():
                if p is not None:
                    fake = torch.empty_strided(p.shape, p.stride(), dtype=p.dtype)
                    module._parameters[name] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
            for name, b in module._buffers.items():
                if b is not None:
                    module._buffers[name] = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype)
    return model


def text_configs(model: str) -> dict[str, Any]:
    """Both text encoders' transformers configs of `model` (no weights are read)."""
    from transformers import CLIPTextConfig

    return {name: CLIPTextConfig(**part_config(model, name)) for name in textenc.COMPONENTS.values()}


def fake_text(cfg: textenc.TextConfig, mode: Any) -> textenc.TextEncoders:
    """Both text encoders of `cfg.model` on fake CPU tensors, in their dtype, the trained ones prepared as
    training prepares them (textenc.TextEncoders: a LoRA or every weight trainable; checkpointing)."""
    M.models.quiet_libraries()
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    configs = text_configs(cfg.model)
    meta = torch.device("meta")
    with meta, default_dtype(getattr(torch, cfg.weights_dtype)):
        encoders = {"text_encoder": CLIPTextModel(configs["text_encoder"]),
                    "text_encoder_2": CLIPTextModelWithProjection(configs["text_encoder_2"])}
        text = textenc.TextEncoders(cfg, meta, encoders)
    for encoder in text.encoders.values():
        faked(encoder, mode)
    return text


def fake_batch(unet: Any, width: int, height: int, batch: int) -> S.Batch:
    c = unet.config
    latent = (batch, c.in_channels, height // 8, width // 8)
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return S.Batch(latents=torch.zeros(latent), noise=torch.zeros(latent),
                   u=torch.full((batch,), 0.5, dtype=torch.float64),
                   te=torch.zeros(batch, TOKENS, c.cross_attention_dim), pooled=torch.zeros(batch, pooled),
                   time_ids=torch.zeros(batch, 6), tag_weight=torch.ones(batch))


def _on_grad(live: LiveBytes, fused: bool) -> Any:
    def hook(p: torch.Tensor) -> None:
        if fused:
            p.grad = None      # what fused backward does once the parameter is stepped
        else:
            live.keep_grad(p.grad)
    return hook


class OffloadedBytes(torch.autograd.graph.saved_tensors_hooks):
    """What activation offload leaves on the device: each saved tensor (not a parameter) is dropped when saved
    (its storage freed, unless something else holds it) and remade when the backward pass uses it."""

    def __init__(self) -> None:
        self.bytes = 0

        def pack(t: torch.Tensor) -> Any:
            if isinstance(t, torch.nn.Parameter):
                return t
            self.bytes += nbytes(t)
            return t.shape, t.stride(), t.dtype

        def unpack(packed: Any) -> torch.Tensor:
            if isinstance(packed, torch.Tensor):
                return packed
            shape, stride, dtype = packed
            return torch.empty_strided(shape, stride, dtype=dtype)

        super().__init__(pack, unpack)


def forward_backward(cfg: Config, unet: Any, groups: list[dict], mode: Any, size: tuple[int, int], batch: int,
                     text: textenc.TextEncoders | None = None) -> LiveBytes:
    """The live bytes of one training forward + backward pass on fake tensors; with `text` the batch's one
    caption window runs through the text encoders first (as the step's `condition`), and `live.text` holds
    what their forward left live."""
    live = LiveBytes()
    encoders = list(text.encoders.values()) if text is not None else []
    live.known([t for m in [unet, *encoders] for t in [*m.parameters(), *m.buffers()]])
    hooks = [p.register_post_accumulate_grad_hook(_on_grad(live, cfg.optim.fused_backward))
             for g in groups for p in g["params"]]
    sigmas = objective.schedule(cfg.schedule).float()
    precision = S.Precision.make(cfg.weights_dtype, cfg.mixed_precision, "cpu")
    offloaded = OffloadedBytes() if cfg.activation_offload else contextlib.nullcontext()
    try:
        with mode, live:
            with offloaded:
                inputs = fake_batch(unet, *size, batch)
                if text is not None:
                    inputs = dataclasses.replace(inputs, ids=torch.zeros(batch, 2, TOKENS, dtype=torch.long))
                    before = live.live
                    with precision.autocast:
                        inputs = S.condition(inputs, text)
                    live.text = live.live - before
                loss = S.loss(unet, inputs, cfg.objective, sigmas, precision)[0]
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return live


def step_temporaries(cfg: Config, groups: list[dict], mode: Any) -> tuple[int, str]:
    """The bytes an optimizer step allocates besides its state: measured on the largest parameter (on all of
    them for schedule-free, whose step is one foreach over every parameter)."""
    entry, params = O.OPTIMIZERS[cfg.optim.optimizer], [p for g in groups for p in g["params"]]
    reason = entry.in_place(cfg.optim, groups)
    if reason:
        return 0, reason
    chosen = params if entry.plan_all_params else [max(params, key=lambda p: p.numel())]
    try:
        with mode:
            fakes = [torch.nn.Parameter(torch.zeros(p.shape, dtype=p.dtype)) for p in chosen]
            for f in fakes:
                f.grad = torch.zeros_like(f)
            opt = O.make_optimizer(cfg.optim, [{"name": "planned", "params": fakes, "lr": 1e-6}], cfg.seed)
            opt.step()  # the first step allocates the state
            live = LiveBytes()
            live.known(fakes + [f.grad for f in fakes] + [t for s in opt.state.values() for t in s.values()
                                                          if isinstance(t, torch.Tensor)])
            with live:
                opt.step()
        what = "all parameters'" if len(chosen) > 1 else "the largest parameter's"
        return live.peak, f"measured: {what} step"
    except Exception:  # noqa: BLE001 - a step that reads values (prodigy's .item()) cannot run on fake tensors
        return 3 * 4 * chosen[0].numel(), "estimated: 3 float32 copies of the largest parameter"


def plan(cfg: Config, size: tuple[int, int], batch: int) -> Plan:
    """The memory plan of `cfg` (a train Config) at `size` (width, height) and `batch` samples per micro-batch."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    unet = fake_unet(cfg.unet, mode)
    text = fake_text(cfg.text, mode) if cfg.text.in_step else None
    text_named = text.groups() if text is not None else {}
    every = O.param_groups(cfg.optim, {**M.trainable_groups(unet, cfg.method), **text_named})
    groups = [g for g in every if g["name"] not in text_named]   # the UNet's
    trained = [p for g in groups for p in g["params"]]
    weights = sum(nbytes(t) for t in [*unet.parameters(), *unet.buffers()]) - quantized_savings(unet, cfg.quantize_base)
    swapped = swapped_blocks(unet, cfg)
    on_host = {id(p) for _, m in swapped for p in m.parameters()}
    device_trained = [p for p in trained if id(p) not in on_host]
    weights -= swap_savings(swapped)
    # a swapped block's gradients exist on the device while it and the one arriving are there
    swap_grads = 2 * max((sum(nbytes(p) for p in m.parameters() if p.requires_grad) for _, m in swapped), default=0)
    grads = sum(nbytes(p) for p in device_trained) + swap_grads
    state = state_bytes(cfg.optim, [{**g, "params": [p for p in g["params"] if id(p) not in on_host]} for g in groups],
                        every)
    ema = 4 * sum(p.numel() for p in device_trained) if cfg.ema_decay and cfg.ema_device == "device" else 0
    te = text_parts(cfg, text, [g for g in every if g["name"] in text_named], every)
    live = forward_backward(cfg, unet, every, mode, size, batch, text)
    temporaries, temp_how = step_temporaries(cfg, every, mode)
    all_grads = grads + te.grads   # the passes hold the text encoders' gradients too
    fused = cfg.optim.fused_backward
    if fused:
        passes = live.peak + temporaries
    elif swapped:   # the gradients of the swapped blocks leave with them: count the device's share only
        passes = max(live.peak_less_grads + all_grads, all_grads + temporaries)
    else:
        passes = max(live.peak, all_grads + temporaries,
                     all_grads + live.peak_less_grads if cfg.accumulate > 1 else 0)
    parts = _parts(cfg, unet, trained, weights, grads, state, ema, live.peak_less_grads, (temporaries, temp_how),
                   size, batch, live.text)
    held = weights + te.weights + state + te.state + ema + te.ema
    return Plan(_title(cfg, size, batch), parts + te.parts, held + passes)


@dataclass(frozen=True)
class TextBytes:
    """The text encoders' share of the plan (their activations are measured in the pass with the UNet's)."""
    weights: int = 0
    grads: int = 0
    state: int = 0
    ema: int = 0
    parts: list = dataclasses.field(default_factory=list)


def text_parts(cfg: Config, text: textenc.TextEncoders | None, groups: list[dict], every: list[dict]) -> TextBytes:
    """Both encoders' weights (in the step whenever it encodes the captions), and the trained ones' gradients,
    optimizer state and EMA, counted as the UNet's are."""
    if text is None:
        return TextBytes()
    trained = [p for g in groups for p in g["params"]]
    weights = sum(nbytes(t) for m in text.encoders.values() for t in [*m.parameters(), *m.buffers()])
    grads = sum(nbytes(p) for p in trained)
    state = state_bytes(cfg.optim, groups, every) if groups else 0
    ema = 4 * sum(p.numel() for p in trained) if cfg.ema_decay and cfg.ema_device == "device" else 0
    total = sum(p.numel() for m in text.encoders.values() for p in m.parameters())
    what = (f"{cfg.train_text_encoder} trained ({'LoRA float32' if cfg.method == 'lora' else 'all weights'})"
            if groups else "frozen (tag shuffling / dropout)")
    parts = [Part("text encoders", weights, f"{total:,} parameters ({cfg.weights_dtype}), {what}")]
    if groups:
        parts += [Part("TE gradients", grads, f"{sum(p.numel() for p in trained):,} trained parameters"),
                  Part("TE optimizer state", state, cfg.optimizer),
                  Part("TE EMA", ema, "float32 copy of their trained weights" if ema else
                       "off" if not cfg.ema_decay else "on the CPU")]
    return TextBytes(weights, grads, state, ema, parts)


def quantized_savings(unet: Any, kind: str) -> int:
    """Bytes the quantized base saves: each frozen layer's weight at its dtype less its quantized form."""
    if kind == "no":
        return 0
    return sum(nbytes(layer.weight) - quant.layer_bytes(layer.weight.shape, kind)
               for _, _, layer in quant.frozen_layers(unet, kind))


def swapped_blocks(unet: Any, cfg: Config) -> list[tuple[str, Any]]:
    """The blocks block swap keeps on the host (a ConfigError when there are not that many)."""
    why = OF.problem(cfg.offload, len(OF.swap_units(unet)), 1)
    if why:
        raise ConfigError(why)
    return OF.chosen_units(unet, cfg.blocks_to_swap) if cfg.blocks_to_swap else []


def swap_savings(swapped: list[tuple[str, Any]]) -> int:
    """The swapped blocks' bytes, less the two a device holds at a time (the one running, the one arriving)."""
    sizes = sorted((OF.unit_bytes(m) for _, m in swapped), reverse=True)
    return sum(sizes) - sum(sizes[:2])


def _parts(cfg: Config, unet: Any, trained: list, weights: int, grads: int, state: int, ema: int, activations: int,
           temporaries: tuple[int, str], size: tuple[int, int], batch: int, text: int = 0) -> list[Part]:
    total = sum(p.numel() for p in unet.parameters())
    largest = max(nbytes(p) for p in trained)
    fused = cfg.optim.fused_backward
    ema_how = ("off" if not cfg.ema_decay else "float32 copy of the trained weights" if cfg.ema_device == "device"
               else f"on the CPU ({4 * sum(p.numel() for p in trained) / GIB:.2f} GiB of host memory)")
    te_share = f"; the text encoders' forward {text / 2 ** 20:.1f} MiB of it" if cfg.text.in_step else ""
    savers = "".join([f", base {cfg.quantize_base}" if cfg.quantize_base != "no" else "",
                      f", {cfg.blocks_to_swap} blocks swapped (2 on the device at a time)" if cfg.blocks_to_swap else ""])
    return [
        Part("weights", weights, f"{total:,} parameters ({cfg.weights_dtype}{', LoRA float32' if cfg.method == 'lora' else ''})"
                                 f" + buffers{savers}"),
        Part("gradients", 0 if fused else grads,
             f"fused backward: each freed once stepped (largest {largest / 2 ** 20:.0f} MiB)" if fused else
             f"{sum(p.numel() for p in trained):,} trained parameters"),
        Part("optimizer state", state, f"{cfg.optimizer}" + (" (bf16 rounding" + (" + Kahan buffer)" if
             cfg.kahan_summation else ")") if O.rounds_bf16(cfg.optim, [{"params": trained}]) else "")),
        Part("EMA", ema, ema_how),
        Part("activations (peak)", activations, f"measured: forward + backward at {size[0]}x{size[1]} x batch {batch}, "
                                                f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
                                                f"{', saved tensors offloaded to the host' if cfg.activation_offload else ''}"
                                                f"{te_share}"),
        Part("step temporaries", temporaries[0], temporaries[1]),
    ]


def _title(cfg: Config, size: tuple[int, int], batch: int) -> str:
    what = (f"LoRA rank {cfg.lora_rank} ({cfg.lora_preset})" if cfg.method == "lora" else "full fine-tune")
    fused = " with fused backward" if cfg.fused_backward else ""
    return (f"memory plan: {cfg.model}, {what}, {cfg.optimizer}{fused}, {cfg.weights_dtype} weights, mixed precision "
            f"{cfg.mixed_precision}, {size[0]}x{size[1]} x batch {batch}")


def largest_bucket(cfg: Config) -> tuple[tuple[int, int], str]:
    """The largest bucket of the encode output the run reads, or 1024x1024 when there is none yet."""
    from stages.train import feed

    try:
        buckets = [b.bucket for b in feed.open_data(cfg.data).index.buckets]
    except PipelineError:
        return (1024, 1024), f"no encode output at {cfg.input} yet, so planned at 1024x1024"
    w, h = max(buckets, key=lambda b: b[0] * b[1])
    return (int(w), int(h)), f"the largest of {len(buckets)} buckets in {cfg.input}"


def print_plan(cfg: Config) -> Plan:
    from shared.core.log import say

    size, where = largest_bucket(cfg)
    result = plan(cfg, size, cfg.batch_size)
    say(result.table())
    say(f"  (size: {where}; activations measured on fake tensors, no GPU used)")
    return result


PRESET = re.compile(r"^# \[preset\.([\w-]+)\][^\n]*\n((?:#(?! \[preset\.)[^\n]*\n)+)", re.M)


def presets(text: str) -> dict[str, dict]:
    """The memory presets commented into pipeline.toml's [train] table: `# [preset.NAME]` followed by commented
    `# key = value` lines (TOML once the `# ` is taken off; lines after a second `#` are notes)."""
    out = {}
    for name, body in PRESET.findall(text):
        lines = [line[2:] for line in body.splitlines() if line.startswith("# ") and "=" in line]
        out[name] = tomllib.loads("\n".join(lines))
    return out
