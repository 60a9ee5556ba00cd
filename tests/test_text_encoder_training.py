"""Training the text encoders (issue 14): states computed in the step from stored token ids equal encode's,
per-step tag shuffling / keep-first-N / tag dropout on the tokens, a LoRA on both encoders trained, resumed
bitwise after kill -9 and exported (kohya lora_te1_ / lora_te2_, peft) through diffusers' verification, and a
full fine-tune of an encoder landing in the diffusers and single-file exports."""
from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from shared.core.config import resolve
from shared.core.errors import ConfigError
from shared.models import loading as models
from shared.models.text import tokenize
from stages import export, train
from stages.train import step as S, textenc
from tests.conftest import caption, encode_folder, noise_image, save
from tests.test_train import cli_args, same_tensors, sdxl

BASE = {"model": "builtin:tiny", "batch_size": 2, "shuffle_buffer": 4, "max_steps": 4, "checkpoint_every": 2,
        "learning_rate": 3e-3, "eval_samples": 1, "lora_rank": 4, "lora_alpha": 4.0, "tensorboard": False}


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """4 captioned 128x128 images -> one bucket, 2 tar shards of 2, with token ids (the first caption long
    enough for two 77-token windows)."""
    root = tmp_path_factory.mktemp("te")
    for i in range(4):
        p = save(noise_image(128, 128, seed=200 + i), root / "src" / f"img_{i:02d}.png")
        extra = ", ".join(f"word{j}" for j in range(22)) if i == 0 else "plain"
        caption(p, f"colour {i % 4}, shape {i % 3}, common, {extra}")
    return encode_folder(root, max_area=128 * 128, max_side=128, shard_samples=2, format="wds", token_ids=True,
                         storage_dtype="float32")


def samples(data) -> list:
    from stages.train import feed

    return feed.first_samples(data, 8, set())


def text_config(**kw) -> textenc.TextConfig:
    return textenc.TextConfig(**{"model": "builtin:tiny", "method": "lora", "adapter": None,
                                 "train_text_encoder": "none", "weights_dtype": "float32",
                                 "gradient_checkpointing": False, "seed": 0, "shuffle_tags": False, "keep_tags": 1,
                                 "tag_dropout": 0.0, **kw})


def test_states_from_ids_in_the_step_equal_encodes(encoded):
    """Frozen encoders running in the step from the stored ids give encode's stored states and pooled
    embeddings (two windows included, padded with the empty caption's window), and windowing the ids again
    without augmentation gives them back exactly."""
    text = textenc.TextEncoders(text_config(), torch.device("cpu"))
    from stages.train import feed
    data = feed.open_data(train.Config(model="builtin:tiny", workdir=encoded).data)
    got = samples(data)
    assert max(s.windows[0] for s in got) == 2 and min(s.windows[0] for s in got) == 1
    g = torch.Generator().manual_seed(0)
    for s in got:
        n = s.windows[0] * 77
        assert np.array_equal(textenc.step_ids(s.ids[0], s.windows[0], text.tokens, text.cfg, g), s.ids[0][:, :n])
    objective = train.Config(model="builtin:tiny", workdir=encoded, flip_rate=0.0).objective
    batch = S.assemble(got[:4], 0, 0, data.empty, objective, text=text)
    assert batch.ids.shape == (4, 2, 2 * 77)
    done = S.condition(batch, text)
    reference = S.assemble(got[:4], 0, 0, data.empty, objective)
    assert done.te.shape == reference.te.shape
    torch.testing.assert_close(done.te, reference.te, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(done.pooled, reference.pooled, atol=1e-4, rtol=1e-4)
    # tags shuffled per step from the sample's own generator: the same step draws the same, another step not
    from types import SimpleNamespace
    shuffling = SimpleNamespace(tokens=text.tokens, cfg=text_config(shuffle_tags=True, keep_tags=1))
    at = lambda step: S.assemble(got[:4], step, 0, data.empty, objective, text=shuffling).ids   # noqa: E731
    assert torch.equal(at(5), at(5)) and not torch.equal(at(5), at(6))
    assert torch.equal(at(5)[:, :, :3], batch.ids[:, :, :3])   # BOS and the kept first tag ("colour N")


def test_tags_shuffled_and_dropped_on_tokens_keep_the_first():
    tok = models.load_model("builtin:tiny", ("tokenizer",)).tokenizer
    tokens = textenc.Tokens.of(tok)
    ids = np.array(tokenize(tok, "alpha, beta gamma, delta, epsilon")[0])
    own = textenc.caption_tokens(ids, 1, tokens)
    assert own == tok("alpha, beta gamma, delta, epsilon", add_special_tokens=False).input_ids
    groups = textenc.split_tags(own, tokens.comma)
    assert len(groups) == 4
    out = textenc.augment(own, tokens.comma, 1, torch.tensor([2, 0, 1]), None)
    assert out == tok("alpha, epsilon, beta gamma, delta", add_special_tokens=False).input_ids
    out = textenc.augment(own, tokens.comma, 1, None, torch.tensor([False, True, False]))
    assert out == tok("alpha, delta", add_special_tokens=False).input_ids
    cfg = text_config(shuffle_tags=True, keep_tags=1)
    both = np.stack([ids, ids])
    seen = {tuple(textenc.step_ids(both, 1, (tokens, tokens), cfg, torch.Generator().manual_seed(k))[0])
            for k in range(12)}
    assert len(seen) > 2 and all(s[:2] == tuple(ids[:2]) for s in seen)   # BOS and the kept first tag


@pytest.fixture(scope="module")
def lora_run(encoded, tmp_path_factory):
    """A short run with a LoRA on the UNet and both text encoders (own LR), tags shuffled and dropped, caption
    and LoRA dropout: uninterrupted, and killed (-9) after step 3 then resumed from its step-2 checkpoint. Only
    the killed run is a subprocess; all run on one thread, so their float sums agree."""
    tmp = tmp_path_factory.mktemp("lora")
    opts = {**BASE, "train_text_encoder": "both", "text_encoder_lr": 1e-2, "shuffle_tags": True, "tag_dropout": 0.2,
            "caption_dropout": 0.2, "lora_dropout": 0.1}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        in_process(encoded, tmp / "a", opts)
        killed = sdxl(cli_args(encoded, tmp / "b", **opts), env={"SDXL_FAULT": "train.step:3"})
        assert killed.returncode == -9, killed.stderr[-2000:]
        assert [p.name for p in (tmp / "b.staging" / "checkpoints").iterdir()] == ["step-000002"]
        said = io.StringIO()
        with contextlib.redirect_stdout(said):
            in_process(encoded, tmp / "b", opts)
        assert "resuming from" in said.getvalue() and "step 2 of 4" in said.getvalue()
    finally:
        torch.set_num_threads(threads)
    return tmp


def in_process(work: Path, out: Path, opts: dict) -> None:
    train.run(resolve(train.Config, "train", {}, {"workdir": work, "output": out, **opts}))


def test_kill_9_then_resume_with_trained_text_encoders_is_bitwise(lora_run):
    a, b = lora_run / "a" / "checkpoints" / "step-000004", lora_run / "b" / "checkpoints" / "step-000004"
    for name in ("weights", "optimizer", "rng-rank0"):
        assert same_tensors(a / f"{name}.safetensors", b / f"{name}.safetensors"), name
    for name in ("optimizer", "scheduler", "progress"):
        assert json.loads((a / f"{name}.json").read_text()) == json.loads((b / f"{name}.json").read_text()), name
    with safe_open(str(a / "weights.safetensors"), "pt") as f:
        keys = list(f.keys())
        for prefix in ("unet.", "text_encoder.", "text_encoder_2."):
            mine = [k for k in keys if k.startswith(prefix)]
            assert mine and any("lora_B" in k and f.get_tensor(k).abs().sum() > 0 for k in mine), prefix
        assert any(".mlp.fc1.lora_A" in k for k in keys if k.startswith("text_encoder_2."))
    groups = json.loads((a / "optimizer.json").read_text())["param_groups"]
    assert [(g["name"], g["lr"]) for g in groups] == [("adapter", 3e-3), ("te1_adapter", 1e-2), ("te2_adapter", 1e-2)]


def test_text_encoder_lora_exports_kohya_and_peft_verified(lora_run, tmp_path):
    out = tmp_path / "export"
    export.run(export.Config(input=lora_run / "a", output=out, device="cpu", format=("kohya", "peft")))
    kohya_file = next(out.rglob("*.kohya.safetensors"))
    keys = _keys(kohya_file)
    for prefix in ("lora_unet_", "lora_te1_", "lora_te2_"):
        assert any(k.startswith(prefix) for k in keys), prefix
    assert any(k.startswith("lora_te1_text_model_encoder_layers_0_mlp_fc2.") for k in keys)
    with safe_open(str(kohya_file), "pt") as f:
        meta = f.metadata()
    assert meta["ss_text_encoder_lr"] == "0.01" and meta["ss_network_train_unet_only"] == "False"
    peft_keys = _keys(next(out.rglob("pytorch_lora_weights.safetensors")))
    for prefix in ("unet.", "text_encoder.", "text_encoder_2."):   # verified: each loaded by diffusers
        assert any(k.startswith(prefix) for k in peft_keys), prefix


def _keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


def test_full_text_encoder_fine_tune_lands_in_diffusers_and_single_file(encoded, tmp_path):
    out = tmp_path / "t"
    prompts = tmp_path / "prompts.toml"   # sample images re-encode their prompt with the training encoder
    prompts.write_text('[[prompt]]\nprompt = "colour 1, shape 2"\nseed = 3\nwidth = 32\nheight = 32\nsteps = 1\n'
                       'cfg = 1.0\n')
    train.run(resolve(train.Config, "train", {}, {"workdir": encoded, "output": out, "sample_prompts": prompts,
                                                  **{**BASE, "max_steps": 1, "method": "full", "eval_samples": 0,
                                                     "train_text_encoder": "te1", "learning_rate": 1e-3,
                                                     "text_encoder_lr": 1e-2}}))
    with safe_open(str(out / "checkpoints" / "step-000001" / "weights.safetensors"), "pt") as f:
        trained = {k[len("text_encoder."):]: f.get_tensor(k) for k in f.keys() if k.startswith("text_encoder.")}
        assert not any(k.startswith("text_encoder_2.") for k in f.keys())
    assert (out / "samples" / "step-000001" / "00.png").is_file()
    base = models.load_model("builtin:tiny", ("text_encoder",)).text_encoder.state_dict()
    name = "encoder.layers.0.self_attn.q_proj.weight"   # transformers 5: no text_model. in CLIPTextModel
    assert not torch.equal(trained[name], base[name])
    export.run(export.Config(input=out, output=tmp_path / "x", device="cpu", format=("diffusers", "single-file")))
    folder = next(p.parent for p in (tmp_path / "x").rglob("model_index.json"))
    exported = models.load_model(str(folder), ("text_encoder",), dtype=torch.float32).text_encoder.state_dict()
    torch.testing.assert_close(exported[name], trained[name].float(), atol=1e-3, rtol=1e-3)


def test_text_encoder_training_refuses_shards_without_ids_and_clashes():
    from types import SimpleNamespace as NS

    from stages.train import targets

    cfg = train.Config(model="builtin:tiny", train_text_encoder="both")
    at = NS(cfg=cfg, data=NS(index=NS(layout=NS(token_ids=False))), rank=NS(world=1))
    with pytest.raises(ConfigError, match="sdxl encode --token-ids"):
        targets._text_encoders(at)
    lrs = train.Config(model="builtin:tiny", train_text_encoder="both", text_encoder_lr=1e-5,
                       text_encoder_2_lr=2e-6).optim
    assert [lrs.group_lr(n) for n in ("adapter", "te1_adapter", "te2_adapter", "te1", "te2")] == \
        [1e-4, 1e-5, 2e-6, 1e-5, 2e-6]
    assert train.Config(model="builtin:tiny").optim.group_lr("te2") == 1e-4
    with pytest.raises(ConfigError, match="fused_backward"):
        train.Config(model="builtin:tiny", train_text_encoder="both", fused_backward=True, max_grad_norm=0.0)
    with pytest.raises(ConfigError, match="fsdp"):
        train.Config(model="builtin:tiny", train_text_encoder="te2", parallel="fsdp", method="full")
