"""A quantized frozen base under a LoRA (stages/train/quant.py), the attention backend and per-block compilation
(stages/train/model.py), on builtin:tiny's UNet on the CPU. bitsandbytes' nf4 / int8 layers run on the CPU with
the installed bitsandbytes (0.50), so they are tested here too."""
from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from shared.core.config import resolve
from shared.core.errors import ConfigError
from shared.models import lora
from stages import train
from stages.train import model as M, quant

OPTS = {"model": "builtin:tiny", "lora_rank": 4, "lora_alpha": 4.0}
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def config(**kw) -> train.Config:
    return resolve(train.Config, "train", {}, {**OPTS, **kw})


def unet(**kw):
    return M.build_unet(config(**kw).unet, torch.device("cpu"))


def inputs(u, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    c = u.config
    pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
    return {"sample": torch.randn(2, c.in_channels, 16, 16, generator=g), "timestep": torch.tensor([100, 700]),
            "encoder_hidden_states": torch.randn(2, 77, c.cross_attention_dim, generator=g),
            "added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, generator=g),
                                  "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * 2)}}


@pytest.mark.parametrize("conv", [False, True])
@pytest.mark.parametrize("autocast", [False, True])
def test_fp8_layer_stores_8_bits_and_its_backward_is_the_upcast_weights(conv, autocast):
    torch.manual_seed(0)
    layer = torch.nn.Conv2d(16, 24, 3, padding=1) if conv else torch.nn.Linear(64, 48)
    q = quant.Fp8Layer(layer)
    assert q.qweight.dtype == torch.float8_e4m3fn and q.qweight.shape == layer.weight.shape
    assert quant.layer_bytes(layer.weight.shape, "fp8") == q.qweight.nbytes + q.scale.nbytes
    w = layer.weight.detach()
    assert float((q.weight - w).abs().max() / w.abs().max()) < 0.07   # e4m3: 3 mantissa bits, per-channel scale
    x = torch.randn((2, 16, 8, 8) if conv else (5, 64), requires_grad=True)
    ref_x = x.detach().clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        y = q(x)
        wd, bd = q.weight.detach(), layer.bias.detach()
        ref = F.conv2d(ref_x, wd, bd, padding=1) if conv else F.linear(ref_x, wd, bd)
    assert y.dtype == ref.dtype and torch.equal(y, ref)
    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    assert torch.allclose(x.grad, ref_x.grad, rtol=1e-2 if autocast else 1e-5, atol=1e-3 if autocast else 1e-6)


KINDS = ["fp8"] + (["nf4", "int8"] if HAS_BNB else [])


@pytest.mark.parametrize("kind", KINDS)
def test_quantized_base_trains_a_lora_with_the_same_keys(kind):
    plain, q = unet(), unet(quantize_base=kind)
    a, b = lora.lora_state(plain), lora.lora_state(q)
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and b[k].dtype == torch.float32 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)     # the same initial LoRA: its init follows the seed alone
    stored = {quant.Fp8Layer: "fp8"} if kind == "fp8" else {}
    if kind != "fp8":
        import bitsandbytes as bnb
        stored = {bnb.nn.Linear4bit if kind == "nf4" else bnb.nn.Linear8bitLt: kind}
    replaced = [m for m in q.modules() if type(m) in stored]
    assert len(replaced) >= 40 and not any(type(m) is torch.nn.Linear and not m.weight.requires_grad
                                           for m in q.modules())
    x = inputs(q)
    with torch.no_grad():
        ref, out = plain(**x).sample, q(**x).sample
    assert 0 < float((out - ref).norm() / ref.norm()) < 0.3, kind
    params = M.trainable(q)
    opt = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for _ in range(4):
        loss = (q(**x).sample - x["sample"]).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] and all(p.grad is None and torch.isfinite(p).all() for p in params), losses


def test_dora_reads_the_upcast_fp8_weight():
    u = unet(quantize_base="fp8", dora=True)
    loss = u(**inputs(u)).sample.square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in u.named_parameters() if "lora_magnitude" in n)


def test_quantized_full_finetune_and_missing_xformers_are_one_line_errors():
    with pytest.raises(ConfigError, match="quantize_base nf4 .* method full"):
        config(method="full", quantize_base="nf4")
    with pytest.raises(ConfigError, match="blocks_to_swap .* quantize_base int8"):
        config(blocks_to_swap=2, quantize_base="int8")
    with pytest.raises(ConfigError, match="parallel fsdp .* use method lora|parallel fsdp shards"):
        config(parallel="fsdp")
    with pytest.raises(ConfigError, match="use ema_device device"):
        config(parallel="fsdp", method="full", ema_decay=0.9, ema_device="cpu")
    if importlib.util.find_spec("xformers") is None:
        with pytest.raises(ConfigError, match="xformers is not installed"):
            unet(attention="xformers")


def test_attention_backends_agree():
    x = inputs(unet())
    with torch.no_grad():
        outs = {b: unet(attention=b)(**x).sample for b in ("sdpa", "eager")}
    assert torch.allclose(outs["sdpa"], outs["eager"], atol=1e-5)
    from diffusers.models.attention_processor import AttnProcessor

    assert all(isinstance(p, AttnProcessor) for p in unet(attention="eager").attn_processors.values())


def test_compile_wraps_each_block_in_place():
    u = M.models.load_model("builtin:tiny", ("unet",)).unet
    keys = set(u.state_dict())
    assert M.compile_blocks(u, "off") == 0
    assert M.compile_blocks(u, "max-autotune") == 14
    assert all(m._compiled_call_impl is not None for _, m in M.blocks(u)) and set(u.state_dict()) == keys


@pytest.mark.gpu
def test_compiled_blocks_train_like_eager():
    """Compiling the tiny UNet's 14 blocks took 176 s for the first step on 2 shared CPU cores (1.3 s the second):
    run where a GPU is."""
    device = torch.device("cuda")
    eager = M.build_unet(config().unet, device)
    compiled = M.build_unet(config(compile="default").unet, device)
    x = {k: (v.to(device) if torch.is_tensor(v) else {a: b.to(device) for a, b in v.items()})
         for k, v in inputs(eager).items()}
    with torch.no_grad():
        assert torch.allclose(eager(**x).sample, compiled(**x).sample, atol=1e-3)
