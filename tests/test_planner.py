"""Issue 12: the memory planner (`sdxl train --plan`): optimizer state against hand counts and against the real
optimizers, the live-bytes tracker, the plan's sum, the CLI, and the presets in pipeline.toml fitting their
cards on the full-size UNet."""
from pathlib import Path

import pytest
import torch

from shared.core.config import resolve
from shared.core.errors import ConfigError
from stages import train
from stages.cli import app
from stages.train import model as M, offload as OF, optim as O, planner, quant

ROOT = Path(__file__).resolve().parents[1]
GIB = 2 ** 30


def config(**values):
    return resolve(train.Config, "train", {}, {"model": "builtin:tiny", **values})


def groups_of(*shapes, dtype=torch.float32):
    return [{"name": "adapter", "params": [torch.nn.Parameter(torch.randn(s).to(dtype)) for s in shapes],
             "lr": 1e-3}]


def real_state_bytes(opt) -> int:
    def size(v):
        if torch.is_tensor(v):
            return v.numel() * v.element_size()
        return sum(size(x) for x in v.values()) if isinstance(v, dict) else 0
    return sum(size(v) for s in opt.state.values() for v in s.values())


def stepped(cfg, groups):
    opt = O.make_optimizer(cfg.optim, groups, 0)
    for g in groups:
        for p in g["params"]:
            p.grad = torch.randn(p.shape).to(p.dtype)
    opt.step()
    return opt


# Linear(3 -> 5): a weight (5, 3) and a bias (5,), float32; 20 parameters in all
HAND = {
    "adamw": 2 * 20 * 4 + 2 * 4,                    # exp_avg, exp_avg_sq + a float32 step tensor per parameter
    "adafactor": (5 + 3) * 4 + 4 + 5 * 4 + 4,       # weight: row (5) + column (3) factors; bias: full; RMS each
    "adamw8bit": 2 * 20 * 4,                        # under 4096 elements bitsandbytes keeps 32-bit states
    "paged_adamw8bit": 2 * 20 * 4,
    "lion": 20 * 4,                                 # one moment
    "prodigy": 4 * 20 * 4,                          # s, p0, exp_avg, exp_avg_sq
    "schedulefree_adamw": 2 * 20 * 4,               # z, exp_avg_sq
}


@pytest.mark.parametrize("name", list(HAND))
def test_optimizer_state_against_hand_counts_and_the_real_optimizer(name):
    cfg = config(optimizer=name, learning_rate=1.0 if name == "prodigy" else 1e-3)
    groups = groups_of((5, 3), (5,))
    assert planner.state_bytes(cfg.optim, groups) == HAND[name]
    assert real_state_bytes(stepped(cfg, groups)) == HAND[name]


def test_eight_bit_and_bf16_state_by_hand():
    big = groups_of((64, 64))   # 4096 elements: 8-bit, in blocks of 256 with a float32 absmax each
    assert planner.state_bytes(config(optimizer="adamw8bit").optim, big) == 2 * (4096 + 4 * 16 + 4 * 256)
    assert planner.state_bytes(config(optimizer="lion").optim, big) == 4096 + 4 * 16 + 4 * 256
    bf = groups_of((5, 3), (5,), dtype=torch.bfloat16)  # bf16 moments + a bf16 Kahan buffer
    cfg = config(kahan_summation=True)
    assert planner.state_bytes(cfg.optim, bf) == 3 * 20 * 2 == real_state_bytes(stepped(cfg, bf))


@pytest.mark.parametrize("name", list(HAND))
def test_optimizer_state_of_the_tiny_unet_is_counted_exactly(name):
    """Full fine-tune of builtin:tiny (every UNet weight): the planner's count is the real state's (Prodigy's
    p0 is one element for an all-zero parameter, such as a fresh norm's bias: the planner counts it in full)."""
    cfg = config(optimizer=name, method="full", learning_rate=1.0 if name == "prodigy" else 1e-3)
    unet = M.build_unet(cfg.unet, torch.device("cpu"))
    groups = O.param_groups(cfg.optim, M.trainable_groups(unet, "full"))
    real, counted = real_state_bytes(stepped(cfg, groups)), planner.state_bytes(cfg.optim, groups)
    if name == "prodigy":
        assert real <= counted <= 1.01 * real
    else:
        assert counted == real


def test_live_bytes_counts_storages_once_until_freed():
    live = planner.LiveBytes()
    with live:
        a = torch.empty(1000)            # 4000 bytes
        view = a[:10]                    # shares a's storage
        b = torch.empty(500, dtype=torch.bfloat16)
        assert live.live == 5000
        del a, view, b
    assert live.live == 0 and live.peak == 5000


def test_plan_adds_up_and_fused_backward_holds_no_gradients():
    unet = M.build_unet(config(method="full").unet, torch.device("cpu"))
    every = sum(p.numel() * 4 for p in unet.parameters())
    plain = planner.plan(config(method="full", max_grad_norm=0.0), (64, 64), 1)
    parts = {p.name: p.bytes for p in plain.parts}
    assert parts["weights"] == every + sum(b.numel() * b.element_size() for b in unet.buffers())
    assert parts["gradients"] == every and parts["optimizer state"] == 2 * every + 4 * len(list(unet.parameters()))
    assert parts["activations (peak)"] > 0
    assert plain.peak >= parts["weights"] + parts["optimizer state"] + parts["gradients"]
    fused = planner.plan(config(method="full", max_grad_norm=0.0, fused_backward=True), (64, 64), 1)
    assert {p.name: p.bytes for p in fused.parts}["gradients"] == 0 and fused.peak < plain.peak
    ema = planner.plan(config(method="full", ema_decay=0.9), (64, 64), 1)
    assert {p.name: p.bytes for p in ema.parts}["EMA"] == every  # float32 weights: as many bytes
    on_cpu = planner.plan(config(method="full", ema_decay=0.9, ema_device="cpu"), (64, 64), 1)
    assert {p.name: p.bytes for p in on_cpu.parts}["EMA"] == 0 and on_cpu.peak == plain.peak


def test_plan_flag_prints_the_table_and_trains_nothing(runner, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["train", "--model", "builtin:tiny", "--plan", "--method", "full"])
    assert result.exit_code == 0, result.output
    for part in ("weights", "gradients", "optimizer state", "EMA", "activations (peak)", "predicted peak"):
        assert part in result.output
    assert "planned at 1024x1024" in result.output and "no GPU used" in result.output
    assert not (tmp_path / "work").exists()


def test_activations_of_the_full_size_unet_match_torchs_memtracker_figures():
    """The issue's figures, measured with torch's MemTracker on fake tensors (full-size UNet, 1024², batch 1,
    bf16 weights): weights 4.78 GiB, gradients 4.78, activations 6.44 GiB without checkpointing."""
    cfg = resolve(train.Config, "train", {}, {"model": "builtin:sdxl-random", "method": "full",
                                              "weights_dtype": "bfloat16", "batch_size": 1})
    parts = {p.name: p.bytes / GIB for p in planner.plan(cfg, (1024, 1024), 1).parts}
    assert parts["weights"] == pytest.approx(4.78, abs=0.01) and parts["gradients"] == pytest.approx(4.78, abs=0.01)
    assert parts["activations (peak)"] == pytest.approx(6.44, rel=0.05)


CARDS = {"12gb": 12, "16gb": 16, "24gb": 24, "48gb": 48, "80gb": 80}


def test_the_presets_fit_their_cards():
    """Every `# [preset.*]` block of pipeline.toml, LoRA and full fine-tune for each card, is a valid [train]
    table; those for the 12-24 GB cards (where a preset trades speed for memory) have a predicted peak on
    builtin:sdxl-random at 1024x1024 that leaves 10 % of the card free (for the CUDA context, workspaces and the
    planner's error). The 48 / 80 GB presets are planned in docs/memory.md's table (8 s each on the meta device)."""
    presets = planner.presets((ROOT / "pipeline.toml").read_text(encoding="utf-8"))
    assert sorted(presets) == sorted(f"{m}-{c}" for m in ("lora", "full") for c in CARDS)
    for name, values in presets.items():
        cfg = resolve(train.Config, "train", {"train": {"model": "builtin:sdxl-random", **values}})
        if CARDS[name.split("-")[1]] > 24:
            continue
        peak = planner.plan(cfg, (1024, 1024), cfg.batch_size).peak / GIB
        assert peak <= 0.9 * CARDS[name.split("-")[1]], (name, peak)


def test_memory_savers_counted_against_the_real_model_and_by_hand():
    """Quantized base, block swap and activation offload in the plan of builtin:tiny: the fp8 base's weights are
    the bytes the built model really holds; nf4 / int8 by hand; the swapped blocks' weights (all but the two
    largest), gradients and optimizer state leave the device; offloaded activations lower the activation peak."""
    def parts(**kw):
        return {p.name: p.bytes for p in planner.plan(config(**kw), (64, 64), 1).parts}

    def held(module):
        return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])

    base = parts()
    fp8 = M.build_unet(config(quantize_base="fp8").unet, torch.device("cpu"))
    assert parts(quantize_base="fp8")["weights"] == held(fp8) < base["weights"]
    unet = M.build_unet(config().unet, torch.device("cpu"))
    linear = [layer.weight.shape for _, _, layer in quant.frozen_layers(unet, "nf4")]
    nf4 = sum(4 * s.numel() - (s.numel() // 2 + 4 * -(-s.numel() // 64)) for s in linear)
    int8 = sum(4 * s.numel() - (s.numel() + 4 * s[0]) for s in linear)
    assert base["weights"] - parts(quantize_base="nf4")["weights"] == nf4
    assert base["weights"] - parts(quantize_base="int8")["weights"] == int8

    full = parts(method="full", max_grad_norm=0.0)
    whole = M.build_unet(config(method="full").unet, torch.device("cpu"))
    swapped = OF.chosen_units(whole, 9)
    sizes = sorted((held(m) for _, m in swapped), reverse=True)
    on_host = {id(p) for _, m in swapped for p in m.parameters()}
    device_params = [p for p in whole.parameters() if id(p) not in on_host]
    swap = parts(method="full", max_grad_norm=0.0, blocks_to_swap=9)
    assert swap["weights"] == full["weights"] - sum(sizes[2:])
    assert swap["optimizer state"] == sum(2 * 4 * p.numel() + 4 for p in device_params)
    assert swap["gradients"] == sum(4 * p.numel() for p in device_params) + 2 * sizes[0]
    assert parts(activation_offload=True)["activations (peak)"] < 0.5 * base["activations (peak)"]
    with pytest.raises(ConfigError, match="14 swappable blocks"):
        planner.plan(config(blocks_to_swap=20), (64, 64), 1)


def test_text_encoders_in_the_step_are_counted_against_the_real_encoders():
    """train_text_encoder on builtin:tiny: the plan's text-encoder parts are the bytes the real encoders
    (textenc.TextEncoders, as training builds them) hold: their weights with the LoRA, its gradients, AdamW's
    state stepped for real, a full fine-tune's float32 EMA; their forward adds to the activations (less with
    checkpointing), and the peak holds it all. Frozen encoders (tag shuffling) count their weights only."""
    from stages.train import textenc

    def plan(**kw):
        result = planner.plan(config(**kw), (64, 64), 2)
        return {p.name: p.bytes for p in result.parts}, result.peak

    def held(text):
        tensors = [t for m in text.encoders.values() for t in [*m.parameters(), *m.buffers()]]
        return sum(t.numel() * t.element_size() for t in tensors)

    base, base_peak = plan()
    assert "text encoders" not in base
    lora, lora_peak = plan(train_text_encoder="both")
    cfg = config(train_text_encoder="both")
    real = textenc.TextEncoders(cfg.text, torch.device("cpu"))
    groups = O.param_groups(cfg.optim, real.groups())
    trained = [p for g in groups for p in g["params"]]
    assert lora["text encoders"] == held(real)
    assert lora["TE gradients"] == sum(4 * p.numel() for p in trained) > 0
    assert lora["TE optimizer state"] == real_state_bytes(stepped(cfg, groups)) > 0
    assert lora["weights"] == base["weights"] and lora["gradients"] == base["gradients"]
    assert lora["activations (peak)"] > base["activations (peak)"]
    te = lora["text encoders"] + lora["TE gradients"] + lora["TE optimizer state"]
    assert lora_peak >= base_peak + te
    checkpointed, _ = plan(train_text_encoder="both", gradient_checkpointing=True)
    assert checkpointed["activations (peak)"] < lora["activations (peak)"]
    full, _ = plan(train_text_encoder="te2", method="full", ema_decay=0.9)
    encoder_2 = textenc.TextEncoders(config(train_text_encoder="te2", method="full").text, torch.device("cpu"))
    every = sum(4 * p.numel() for p in encoder_2.encoders["text_encoder_2"].parameters())
    assert full["TE gradients"] == full["TE EMA"] == every
    assert full["text encoders"] == held(encoder_2) < lora["text encoders"]   # no LoRA weights
    frozen, _ = plan(shuffle_tags=True)
    assert frozen["text encoders"] == held(encoder_2) and "TE gradients" not in frozen
