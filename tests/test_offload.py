"""Activation offload and block swap (stages/train/offload.py) on builtin:tiny's UNet on the CPU: the blocks really
move (where their weights live, in which order the hooks fire, how many are resident at once) and a few training
steps give bitwise the losses and weights of the same steps without offload (LoRA and full fine-tune, with
gradient checkpointing and accumulated micro-batches)."""
from __future__ import annotations

import pytest
import torch

from shared.core.config import resolve
from shared.core.errors import ConfigError
from shared.models import loading as models
from stages import train
from stages.train import model as M, offload as OF

OPTS = {"model": "builtin:tiny", "lora_rank": 4, "lora_alpha": 4.0}


def config(**kw) -> train.Config:
    return resolve(train.Config, "train", {}, {**OPTS, **kw})


def unet_for(cfg: train.Config):
    return M.prepare(models.load_model("builtin:tiny", ("unet",)).unet, cfg.unet)


def inputs(unet, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = unet.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"sample": torch.randn(2, c.in_channels, 16, 16, generator=g),
            "timestep": torch.tensor([100, 700]),
            "encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                  "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}}


def steps(cfg: train.Config, n: int = 2, accumulate: int = 2, device: str = "cpu"
          ) -> tuple[list[float], dict, OF.Offload]:
    """`n` AdamW steps of `accumulate` micro-batches each; (losses, final state_dict, the Offload)."""
    unet = unet_for(cfg).to(device)
    off = OF.install(cfg.offload, unet, torch.device(device), 1)
    params = M.trainable(unet)
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for step in range(n):
        for micro in range(accumulate):
            x = on(inputs(unet, 10 * step + micro), device)
            with off.forward():
                loss = (unet(**x).sample - x["sample"]).pow(2).mean()
            with off.backward():
                (loss / accumulate).backward()
            losses.append(float(loss.detach()))
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        losses.append(float(unet(**on(inputs(unet, 99), device)).sample.square().mean()))   # an evaluation pass
    return losses, {k: v.to("cpu", copy=True) for k, v in unet.state_dict().items()}, off


def on(x: dict, device: str) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else on(v, device) for k, v in x.items()}


@pytest.mark.parametrize("method,checkpointing", [("lora", False), ("full", True)])
def test_offload_and_block_swap_train_exactly_as_without(method, checkpointing):
    base = dict(method=method, gradient_checkpointing=checkpointing)
    ref_losses, ref_state, _ = steps(config(**base))
    losses, state, off = steps(config(**base, blocks_to_swap=9, activation_offload=True))
    assert losses == ref_losses
    assert state.keys() == ref_state.keys() and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert ref_state[next(k for k in state if "lora_B" in k or method == "full")].abs().max() > 0
    # the mechanics ran: 9 blocks live on the host between steps, every saved activation went there and back
    assert len(off.swap.blocks) == 9 and all(b.on_host() and not b.resident for b in off.swap.blocks)
    acts = off.activations
    assert acts.packed > 0 and acts.bytes > 0 and (acts.unpacked == acts.packed or checkpointing)


def test_blocks_move_in_forward_order_and_back_in_reverse():
    cfg = config(blocks_to_swap=13)
    unet = unet_for(cfg)
    units = OF.swap_units(unet)
    assert len(units) == 14   # 8 ResNet blocks, 4 transformer blocks, 1 downsampler, 1 upsampler
    off = OF.install(cfg.offload, unet, torch.device("cpu"), 1)
    swap = off.swap
    resident_seen = []
    for b in swap.blocks:   # while a block runs, it is the only swapped block on the device
        b.module.register_forward_pre_hook(lambda m, a: resident_seen.append(sum(x.resident for x in swap.blocks)))
    x = inputs(unet, 0)
    with off.forward():
        loss = unet(**x).sample.square().mean()
    forward = list(swap.trace)
    names = [b.name for b in swap.order]
    assert sorted(names) == sorted(b.name for b in swap.blocks) and len(names) == 13
    assert forward == [(what, n) for n in names for what in ("load", "evict")]
    assert resident_seen == [1] * 13 and all(b.on_host() for b in swap.blocks)
    swap.trace.clear()
    with off.backward():
        loss.backward()
    loads = [n for what, n in swap.trace if what == "load"]
    # the LoRA (attn preset) leaves the first blocks without a trained weight before them: their backward is not
    # needed and they stay on the host; the others come back in reverse order
    assert loads and loads == names[::-1][:len(loads)]
    assert all(b.on_host() for b in swap.blocks)
    trained = [p for b in swap.blocks for p in b.module.parameters() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.device.type == "cpu" for p in trained)


def test_impossible_combinations_are_one_line_errors():
    unet = unet_for(config())
    with pytest.raises(ConfigError, match="has 14 swappable blocks.*at most 13"):
        OF.install(config(blocks_to_swap=14).offload, unet, torch.device("cpu"), 1)
    with pytest.raises(ConfigError, match="DistributedDataParallel"):
        OF.install(config(blocks_to_swap=2).offload, unet, torch.device("cpu"), 2)
    with pytest.raises(ConfigError, match="fused_backward"):
        config(blocks_to_swap=2, fused_backward=True, optimizer="adamw", max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="blocks_to_swap"):
        config(blocks_to_swap=-1)


@pytest.mark.gpu
def test_on_cuda_offload_is_exact_and_block_swap_spares_device_memory():
    """On CUDA: activation offload (pinned host copies) leaves losses and weights bitwise; block swap (side-stream
    prefetch, weights stepped by AdamW on the host) trains to the same losses up to the CPU / CUDA AdamW kernels'
    rounding, with less device memory held by weights between steps."""
    ref_losses, ref_state, _ = steps(config(method="full"), device="cuda")
    losses, state, off = steps(config(method="full", activation_offload=True), device="cuda")
    assert losses == ref_losses and all(torch.equal(state[k], ref_state[k]) for k in state)
    assert off.activations.packed > 0
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    losses, state, off = steps(config(method="full", blocks_to_swap=13), device="cuda")
    assert all(b.on_host() and b.host[0].is_pinned() for b in off.swap.blocks)
    assert losses == pytest.approx(ref_losses, rel=1e-4)
    assert all(torch.allclose(state[k], ref_state[k], atol=1e-5) for k in state)
    assert torch.cuda.memory_allocated() <= before
