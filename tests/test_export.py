"""export: round trips of every format on builtin:tiny, kohya names and metadata, verification that can fail,
refusal of unfinished trainings, and the comparison grid. Train outputs are built here by `make_train_output`
(the train stage's output contract), each once per module."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from shared.core import artifacts
from shared.formats import checkpoints
from shared.formats import kohya
from shared.models import loading as models
from shared.core.artifacts import Manifest
from shared.core.errors import ConfigError, InputError
from shared.models.lora import LoraSpec, apply_lora, lora_state, target_modules
from stages import export

TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _te_lora(model, generator) -> dict:
    """A peft LoRA on a text encoder's attention, with random non-zero weights."""
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4.0, target_modules=TE_TARGETS), model, adapter_name="default")
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=generator) * 0.2
    return get_peft_model_state_dict(model, adapter_name="default")


def _lora_weights(spec: LoraSpec, seed: int, te: bool) -> dict:
    m = models.load_model("builtin:tiny", ("unet", "text_encoder", "text_encoder_2"))
    apply_lora(m.unet, spec)
    g = torch.Generator().manual_seed(seed)
    for name, p in m.unet.named_parameters():
        if "lora_B" in name:  # lora_B starts at zero: make the LoRA do something
            p.data = torch.randn(p.shape, generator=g) * 0.3
        elif "magnitude" in name:
            p.data = p.data * (1 + 0.2 * torch.randn(p.shape, generator=g))
    out = {"unet." + k: v for k, v in lora_state(m.unet).items()}
    if te:
        for name in ("text_encoder", "text_encoder_2"):
            out.update({f"{name}.{k}": v for k, v in _te_lora(getattr(m, name), g).items()})
    return out


def _full_weights(seed: int) -> dict:
    unet = models.load_model("builtin:tiny", ("unet",)).unet
    g = torch.Generator().manual_seed(seed)
    return {"unet." + k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in unet.state_dict().items()}


def _checkpoint(folder: Path, step: int, method: str, spec: LoraSpec | None, weights: dict, ema: dict | None) -> None:
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "weights.safetensors"))
    if ema is not None:
        save_file({k: v.contiguous() for k, v in ema.items()}, str(folder / "ema.safetensors"))
    record = checkpoints.CheckpointManifest(step=step, epoch=step // 100, method=method, lora=spec,
                                            model="builtin:tiny", weights_dtype="float32", fingerprint=f"fp-{step}",
                                            created="2025-01-01T00:00:00+00:00")
    checkpoints.write_manifest(folder, record)


def make_train_output(tmp: Path, method: str = "lora", preset: str = "attn", dora: bool = False,
                      ema: bool = False, te: bool = False, finished: bool = True, **config) -> Path:
    """A train output folder as `sdxl train` writes it (two checkpoints, step 100 and the final step 200)."""
    out = tmp / "train"
    spec = LoraSpec(preset, 4, 2.0, 0.0, dora) if method == "lora" else None
    for step in (100, 200):
        weights = _lora_weights(spec, step, te) if spec else _full_weights(step)
        average = {k: v * 0.5 for k, v in weights.items()} if ema else None
        _checkpoint(out / "checkpoints" / f"step-{step:06d}", step, method, spec, weights, average)
    config = {"model": "builtin:tiny", "method": method, "lora_preset": preset, "lora_rank": 4, "lora_alpha": 2.0,
              "lora_dropout": 0.0, "dora": dora, "max_steps": 200, "batch_size": 2, "learning_rate": 1e-4,
              "prediction": "epsilon", "schedule": "sdxl", "ema_decay": 0.99 if ema else 0.0, "seed": 0, **config}
    manifest = Manifest("train", 1, "0.1.0+test", config, {"encode": {"path": "x", "fingerprint": "enc-fp"},
                        "model": {"name": "builtin:tiny", "components": {}, "fingerprint": "model-fp"}},
                        "train-fp", {"in": 10, "out": 1}, "2025-01-02T00:00:00+00:00",
                        {"final_checkpoint": "checkpoints/step-000200", "steps": 200, "epochs": 2.0,
                         "tag_frequency": {"red circle": 5, "blue": 3}, "resolution": [256, 192],
                         "buckets": [[256, 192, 6], [192, 256, 4]], "comment": "test run"})
    if finished:
        (out / "manifest.json").write_text(manifest.to_json())
    else:
        os.rename(out, artifacts.staging_dir(out))
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's kernels are far smaller than a thread pool's hand-off cost on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lora_attn(tmp_path_factory) -> Path:
    return make_train_output(tmp_path_factory.mktemp("attn"))


@pytest.fixture(scope="module")
def lora_dora(tmp_path_factory) -> Path:
    return make_train_output(tmp_path_factory.mktemp("dora"), preset="attn+conv", dora=True, ema=True, te=True)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    return make_train_output(tmp_path_factory.mktemp("full"), method="full")


def _export(train: Path, out: Path, **kw) -> Manifest:
    return export.run(export.Config(input=train, output=out, device="cpu", **kw))


ALL = ("kohya", "peft", "diffusers", "single-file")


def test_lora_attn_round_trip_every_format_float32(lora_attn, tmp_path):
    m = _export(lora_attn, tmp_path / "e", format=ALL, dtype="float32")
    assert set(m.extra["formats"]) == set(ALL)
    for fmt, rec in m.extra["formats"].items():
        assert rec["verified"] and rec["max_abs_diff"] <= 1e-4, (fmt, rec)
        assert (tmp_path / "e" / rec["file"]).exists()
    assert m.extra["formats"]["kohya"]["names"]["modules"] == 32


def test_dora_conv_text_encoder_ema_round_trip_float16(lora_dora, tmp_path):
    m = _export(lora_dora, tmp_path / "e", format=ALL, weights="ema")
    for fmt, rec in m.extra["formats"].items():
        assert rec["verified"] and rec["max_abs_diff"] <= 1e-4, (fmt, rec)
    tensors = load_file(str(tmp_path / "e" / m.extra["formats"]["kohya"]["file"]))
    assert any(k.endswith(".dora_scale") for k in tensors) and any(k.startswith("lora_te2_") for k in tensors)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.dora_scale"].shape == (32, 1, 1, 1)
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight"].dtype == torch.float16
    assert tensors["lora_unet_input_blocks_1_0_in_layers_2.alpha"].dtype == torch.float32


def test_full_fine_tune_round_trip_and_lora_formats_refused(full, tmp_path):
    m = _export(full, tmp_path / "e", format=("diffusers", "single-file"), dtype="bfloat16")
    for rec in m.extra["formats"].values():
        assert rec["verified"] and rec["max_abs_diff"] <= 1e-4 and rec["rounding_abs_diff"] > 1e-4
    with pytest.raises(ConfigError, match="full fine-tune; use --format diffusers or single-file"):
        _export(full, tmp_path / "k", format=("kohya",))


def test_merge_scale_and_v_prediction_markers(tmp_path):
    train = make_train_output(tmp_path, prediction="v_prediction", schedule="ztsnr")
    m = _export(train, tmp_path / "e", format=("diffusers", "single-file"), merge_scale=0.5)
    assert all(rec["verified"] for rec in m.extra["formats"].values())  # against the model at LoRA scale 0.5
    with safe_open(str(tmp_path / "e" / "sdxl.sdxl.safetensors"), framework="pt") as f:
        assert {"v_pred", "ztsnr"} <= set(f.keys()) and f.metadata()["modelspec.prediction_type"] == "v"
    scheduler = json.loads((tmp_path / "e" / "diffusers" / "scheduler" / "scheduler_config.json").read_text())
    assert scheduler["prediction_type"] == "v_prediction" and scheduler["rescale_betas_zero_snr"] is True


def test_kohya_file_loads_in_diffusers_with_no_missing_or_unexpected_keys(lora_attn, tmp_path):
    """Independent of export's own check: diffusers converts every key, and puts a LoRA on exactly the
    trained modules."""
    from diffusers import StableDiffusionXLPipeline

    from stages.export.verify import base_pipeline, loader_warnings, lora_modules

    m = _export(lora_attn, tmp_path / "e", format=("kohya",))
    path = tmp_path / "e" / m.extra["formats"]["kohya"]["file"]
    unet_config = models.load_model("builtin:tiny", ("unet",)).unet.config
    state, alphas = StableDiffusionXLPipeline.lora_state_dict(str(path), unet_config=unet_config)
    assert len(state) == 64 and len(alphas) == 32  # every down/up pair and alpha converted, nothing left over
    pipe = base_pipeline("builtin:tiny")
    with loader_warnings() as warned:
        pipe.load_lora_weights(str(path))
    assert not [w for w in warned if not w.startswith("No LoRA keys associated")]
    assert lora_modules(pipe.unet) == set(target_modules(models.load_model("builtin:tiny", ("unet",)).unet, "attn"))


def test_verification_fails_on_a_corrupted_file(lora_attn, tmp_path, monkeypatch):
    real = kohya.to_kohya

    def flipped(*args, **kw):
        tensors = real(*args, **kw)
        key = sorted(k for k in tensors if k.endswith("lora_up.weight"))[0]
        tensors[key] = -tensors[key]
        return tensors

    monkeypatch.setattr(kohya, "to_kohya", flipped)
    with pytest.raises(export.VerificationError, match=r"unet output differs from the trained model's by \d"):
        _export(lora_attn, tmp_path / "e", format=("kohya",))
    assert not (tmp_path / "e").exists()  # nothing that looks finished


def test_unfinished_training_is_refused_but_its_checkpoint_exports(tmp_path):
    train = make_train_output(tmp_path, finished=False)
    with pytest.raises(InputError, match=r"did not finish there.*--in .*train\.staging/checkpoints/step-000200"):
        _export(train, tmp_path / "e")
    ckpt = artifacts.staging_dir(train) / "checkpoints" / "step-000100"
    m = _export(ckpt, tmp_path / "e", format=("peft",))
    assert m.extra["weights"]["step"] == 100 and m.extra["formats"]["peft"]["verified"]
    with pytest.raises(ConfigError, match="is one checkpoint already"):
        _export(ckpt, tmp_path / "e2", weights="step-200")


def test_weights_choice_and_missing_step(lora_attn, tmp_path):
    m = _export(lora_attn, tmp_path / "e", format=("kohya",), weights="step-100", verify=False)
    tensors = load_file(str(tmp_path / "e" / m.extra["formats"]["kohya"]["file"]))
    source = load_file(str(lora_attn / "checkpoints" / "step-000100" / "weights.safetensors"))
    key = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    assert torch.equal(tensors["lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q.lora_up.weight"],
                       source["unet." + key].half())
    with pytest.raises(InputError, match="kept: step-000100, step-000200"):
        _export(lora_attn, tmp_path / "x", weights="step-300")
    with pytest.raises(InputError, match="kept no EMA"):
        _export(lora_attn, tmp_path / "y", weights="ema")


def test_ss_metadata_and_hashes(lora_dora, tmp_path):
    m = _export(lora_dora, tmp_path / "e", format=("kohya",), verify=False, name="shapes", comment="hello")
    path = tmp_path / "e" / "shapes.kohya.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["ss_network_dim"] == "4"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["ss_resolution"] == "(256, 192)" and meta["ss_steps"] == "200" and meta["ss_epoch"] == "2"
    assert json.loads(meta["ss_tag_frequency"]) == {"dataset": {"red circle": 5, "blue": 3}}
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora", "dora_wd": "True", "wd_on_out": "True",
                                                   "conv_dim": "4", "conv_alpha": "2.0"}
    assert meta["ss_training_comment"] == "hello" and meta["ss_output_name"] == "shapes"
    assert json.loads(meta["sdxl_stages"])["train_fingerprint"] == "train-fp"
    blob = path.read_bytes()
    data = blob[8 + int.from_bytes(blob[:8], "little"):]
    assert meta["sshs_model_hash"] == hashlib.sha256(data).hexdigest()  # header-independent, as kohya's
    assert m.extra["formats"]["kohya"]["sha256"] == hashlib.sha256(blob).hexdigest()


def test_full_size_sdxl_names():
    """The presets on full-size SDXL: names real kohya SDXL LoRAs carry, each mapped back by diffusers; the
    tiny builtin's block indices are not SDXL's (why export checks the preset on the full-size layout)."""
    names = kohya.full_size_names("attn+conv")
    for real in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_3_0_op",
                 "lora_unet_middle_block_1_transformer_blocks_9_attn2_to_k", "lora_unet_output_blocks_2_2_conv",
                 "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_output_blocks_8_0_out_layers_3",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_attn1_to_out_0"):
        assert real in names
    assert kohya.full_size_problems("attn+conv") == []
    assert "lora_unet_input_blocks_3_1_transformer_blocks_0_attn1_to_q" not in names  # a tiny-layout name
    assert "lora_te1_text_model_encoder_layers_11_self_attn_q_proj" in kohya.full_size_te_names()


def test_rerun_is_skipped_and_config_errors(lora_attn, tmp_path, capsys):
    first = _export(lora_attn, tmp_path / "e", format=("peft",), verify=False)
    again = _export(lora_attn, tmp_path / "e", format=("peft",), verify=False)
    assert again.created == first.created and "unchanged, skipped" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="format 'ckpt'"):
        export.Config(format=("ckpt",))
    with pytest.raises(ConfigError, match="weights 'last'"):
        export.Config(weights="last")


def test_cli_flags_split_formats(lora_attn, tmp_path):
    import typer
    from typer.testing import CliRunner

    from shared.core.command import stage_command

    app = typer.Typer()
    app.command("export")(stage_command(export.Config, "export", export.run, export.__doc__, {"export": export.Config}))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["export", "--in", str(lora_attn), "--out", str(tmp_path / "e"),
                                      "--format", "kohya,peft", "--no-verify", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert set(artifacts.read_manifest(tmp_path / "e").extra["formats"]) == {"kohya", "peft"}
    result = CliRunner().invoke(app, ["export", "--in", str(tmp_path / "nothing")])
    assert result.exit_code == 2 and "no `train` output found" in result.output


def test_compare_writes_a_labelled_grid(lora_attn, lora_dora, tmp_path):
    from PIL import Image

    from stages.export.compare import HEADER_HEIGHT, LABEL_WIDTH

    a = _export(lora_attn, tmp_path / "a", format=("kohya",), verify=False)
    b = _export(lora_dora, tmp_path / "b", format=("peft",), verify=False)
    assert a and b
    out = export.compare([str(tmp_path / "a"), str(tmp_path / "b" / "peft")], ["red circle", "blue square"], [0],
                         tmp_path / "grid.png", steps=2, size=(64, 64))
    image = Image.open(out)
    assert image.size == (LABEL_WIDTH + 2 * 64, HEADER_HEIGHT + 3 * 64)  # base + two variants, two prompts
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["kind"] for r in rows] == ["base", "kohya", "peft"]


def test_compare_renders_each_variant_with_its_trained_objectives_sampler(tmp_path):
    """A zero-terminal-SNR v-prediction LoRA is sampled with trailing timesteps and guidance rescale, a kohya
    file that only says ss_v_parameterization with DPM++ 2M on Karras σ, the base with its own ε sampler."""
    train = make_train_output(tmp_path / "t", prediction="v_prediction", schedule="ztsnr")
    m = _export(train, tmp_path / "v", format=("kohya",), verify=False)
    assert m.extra["provenance"]["objective"] == {"prediction": "v_prediction", "schedule": "ztsnr",
                                                  "flow_shift": 1.0, "resolution_base": 0}
    kohya_file = tmp_path / "v" / m.extra["formats"]["kohya"]["file"]
    with safe_open(str(kohya_file), framework="pt") as f:
        meta = dict(f.metadata())
        assert json.loads(meta["sdxl_stages"])["objective"]["prediction"] == "v_prediction"
    plain = {k: v for k, v in meta.items() if k != "sdxl_stages"}
    plain["ss_zero_terminal_snr"] = "False"
    save_file(load_file(str(kohya_file)), str(tmp_path / "foreign.safetensors"), metadata=plain)
    out = export.compare([str(tmp_path / "v"), str(tmp_path / "foreign.safetensors")], ["red circle"], [0],
                         tmp_path / "grid.png", steps=2, size=(64, 64), device="cpu")
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [(r["kind"], r["objective"]["prediction"], r["objective"]["schedule"]) for r in rows] == [
        ("base", "epsilon", "sdxl"), ("kohya", "v_prediction", "ztsnr"), ("kohya", "v_prediction", "sdxl")]
    assert [(r["sampler"]["method"], r["sampler"]["ladder"], r["sampler"]["guidance_rescale"]) for r in rows] == [
        ("dpmpp_2m", "karras", 0.0), ("euler", "trailing", 0.7), ("dpmpp_2m", "karras", 0.0)]
    with pytest.raises(InputError, match="v-prediction"):
        export.compare(["base"], ["x"], [0], tmp_path / "g2.png", steps=1, size=(64, 64), base="builtin:tiny",
                       device="cpu", sigmas="novelai")
