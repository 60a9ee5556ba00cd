import json

import pytest
import torch

from shared.models import loading as models
from shared.core.errors import PipelineError


@pytest.fixture(scope="module")
def tiny():
    return models.load_model("builtin:tiny")


def unet_out(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    lat = torch.randn(1, 4, 16, 24, generator=g)
    ids = m.tokenizer("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    ids2 = m.tokenizer_2("a red circle", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        h1 = m.text_encoder(ids, output_hidden_states=True).hidden_states[-2]
        o2 = m.text_encoder_2(ids2, output_hidden_states=True)
        cond = torch.cat([h1, o2.hidden_states[-2]], -1)
        time_ids = torch.tensor([[128.0, 192.0, 0.0, 0.0, 128.0, 192.0]])
        return m.unet(lat, torch.tensor([500]), encoder_hidden_states=cond,
                      added_cond_kwargs={"text_embeds": o2.text_embeds, "time_ids": time_ids}).sample


def test_tiny_is_sdxl_shaped(tiny):
    assert tiny.unet.config.addition_embed_type == "text_time"
    assert tiny.unet.config.cross_attention_dim == tiny.text_encoder.config.hidden_size + \
        tiny.text_encoder_2.config.hidden_size
    assert tiny.vae.config.scaling_factor == pytest.approx(0.13025)
    x = torch.zeros(1, 3, 64, 96)
    with torch.no_grad():
        assert tiny.vae.encode(x).latent_dist.mean.shape == (1, 4, 8, 12)  # 8x down, like SDXL's VAE
    assert unet_out(tiny).shape == (1, 4, 16, 24)


def test_real_clip_tokenizer_offline(tiny):
    assert tiny.tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tiny.tokenizer.pad_token == "<|endoftext|>" and tiny.tokenizer_2.pad_token == "!"
    assert tiny.tokenizer_2.pad_token_id == 0 and len(tiny.tokenizer) == 49408


def test_builtin_weights_are_deterministic():
    a = models.build_components(models.tiny_configs())["unet"].state_dict()
    b = models.build_components(models.tiny_configs())["unet"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    only_vae = models.build_components(models.tiny_configs(), ("vae",))
    assert list(only_vae) == ["vae"]   # a subset builds only what is asked, with the same weights
    full_vae = models.build_components(models.tiny_configs())["vae"].state_dict()
    assert all(torch.equal(v, full_vae[k]) for k, v in only_vae["vae"].state_dict().items())


def test_saved_folder_loads_through_the_same_path(tiny, tmp_path):
    folder = models.save_folder({k: getattr(tiny, k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")},
                                tmp_path / "my-sdxl")
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == "StableDiffusionXLPipeline"
    assert not list(folder.rglob("*.bin"))  # safetensors only
    again = models.load_model(str(folder))
    assert torch.equal(unet_out(tiny), unet_out(again))


def test_missing_and_wrong_components_are_one_line_errors(tiny, tmp_path):
    folder = models.save_folder({k: getattr(tiny, k) for k in ("unet", "vae", "text_encoder", "text_encoder_2")},
                                tmp_path / "m")
    import shutil
    shutil.rmtree(folder / "vae")
    with pytest.raises(PipelineError, match=r"m/vae: missing; a diffusers SDXL folder needs"):
        models.load_model(str(folder))
    cfg = json.loads((folder / "unet" / "config.json").read_text())
    cfg["addition_embed_type"] = None
    (folder / "unet" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PipelineError, match="not an SDXL UNet"):
        models.load_model(str(folder), parts=("unet",))
    with pytest.raises(PipelineError, match="not found"):
        models.load_model(str(tmp_path / "nowhere"))


def test_full_size_unet_parameter_count():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**models.sdxl_configs()["unet"])
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_two_processes_materialising_the_builtin_at_once(tmp_path):
    import os
    import subprocess
    import sys

    code = "from shared.models.loading import builtin_folder; print(builtin_folder('tiny'))"
    env = {**os.environ, "SDXL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"builtin-tiny-v{models.BUILTIN_VERSION}"]


def save_single_file(m, path):
    from safetensors.torch import save_file

    from shared.models import sgm
    save_file(sgm.to_sgm(m.unet, m.vae, m.text_encoder, m.text_encoder_2), str(path))
    return path


def test_single_file_round_trip_through_diffusers_loader(tiny, tmp_path):
    """The tiny model saved in SDXL's original (SGM) layout loads back through diffusers' single-file loader
    (via load_model, offline) with every weight bitwise identical; the UNet output agrees to 1e-5 (seen:
    8e-7 — the loader's tensors have other memory layouts, so other summation orders)."""
    path = save_single_file(tiny, tmp_path / "tiny.safetensors")
    back = models.load_model(str(path))
    for part in models.MODEL_PARTS:
        want, got = getattr(tiny, part).state_dict(), getattr(back, part).state_dict()
        assert set(want) == set(got), part
        assert all(torch.equal(want[k], got[k]) for k in want), part
    torch.testing.assert_close(unet_out(back), unet_out(tiny), atol=1e-5, rtol=0)
    vae_only = models.load_model(str(path), parts=("vae",))
    assert vae_only.unet is None and vae_only.vae is not None
    ident = models.model_identity(str(path), ("vae", "unet"))
    assert ident["vae"] == ident["unet"] and ident["vae"].startswith("file:")


def test_single_file_that_is_not_sdxl_is_one_line_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3)}, str(tmp_path / "sd15.safetensors"))
    with pytest.raises(PipelineError, match="not a single-file SDXL checkpoint"):
        models.load_model(str(tmp_path / "sd15.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(PipelineError, match="not a readable .safetensors"):
        models.load_model(str(tmp_path / "junk.safetensors"))


def test_full_size_sgm_names_are_what_diffusers_converts(tmp_path):
    """On the meta device (no weights): the full SDXL UNet and VAE renamed to SGM, converted back by
    diffusers' own single-file converters, give exactly the diffusers parameter names and shapes."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    from shared.models import sgm

    configs = models.sdxl_configs()
    with init_empty_weights():
        unet = UNet2DConditionModel(**configs["unet"])
        vae = AutoencoderKL(**configs["vae"])
    unet_sgm = {"model.diffusion_model." + sgm.unet_key(k, unet.config): v for k, v in unet.state_dict().items()}
    back = convert_ldm_unet_checkpoint(unet_sgm, unet.config)
    assert {k: tuple(v.shape) for k, v in back.items()} == {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert "model.diffusion_model.output_blocks.8.0.skip_connection.weight" in unet_sgm  # SDXL's last block
    assert "model.diffusion_model.middle_block.1.transformer_blocks.9.attn2.to_k.weight" in unet_sgm
    vae_sgm = {"first_stage_model." + sgm.vae_key(k, 4): (v[:, :, None, None] if ".mid.attn_1." in sgm.vae_key(k, 4)
               and k.endswith("weight") and v.ndim == 2 else v) for k, v in vae.state_dict().items()}
    back = convert_ldm_vae_checkpoint(vae_sgm, vae.config)
    assert set(back) == set(vae.state_dict())


# ---------------------------------------------------------------- issue 17: one line naming the folder


def test_missing_vae_folder_names_the_vae(tmp_path):
    for call in (lambda: models.load_vae(tmp_path / "nonexistent"),
                 lambda: models.model_identity("builtin:tiny", ("vae",), str(tmp_path / "nonexistent"))):
        with pytest.raises(PipelineError) as e:
            call()
        assert str(e.value).startswith(f"--vae {tmp_path / 'nonexistent'}: no such folder; expected a diffusers "
                                       f"AutoencoderKL folder")
        assert "SDXL folder" not in str(e.value)


def test_vae_without_weights_is_one_line_naming_it(tiny, tmp_path, capfd):
    import shutil

    folder = models.save_folder({k: getattr(tiny, k) for k in models.MODEL_PARTS}, tmp_path / "m")
    for f in (folder / "vae").glob("*.safetensors"):
        f.unlink()
    shutil.copytree(folder / "vae", tmp_path / "my-vae")
    capfd.readouterr()
    with pytest.raises(PipelineError) as e:
        models.load_model(str(folder), parts=("vae",))
    assert str(e.value).startswith(f"{folder / 'vae'}: no .safetensors weights; expected the vae of a diffusers "
                                   f"SDXL folder")
    with pytest.raises(PipelineError, match=r"my-vae: no \.safetensors weights; expected a diffusers AutoencoderKL"):
        models.load_vae(tmp_path / "my-vae")
    out, err = capfd.readouterr()
    assert out == "" and err == ""   # diffusers said nothing of its own
    (tmp_path / "my-vae" / "config.json").unlink()
    with pytest.raises(PipelineError, match=r"my-vae: no config.json"):
        models.load_vae(tmp_path / "my-vae")


def test_sdxl_cache_that_is_a_file_or_under_one(tmp_path, monkeypatch):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "f"))
    with pytest.raises(PipelineError, match=r"SDXL_CACHE=.*/f: not a folder"):
        models.builtin_folder("tiny")
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "f" / "cache"))
    with pytest.raises(PipelineError) as e:
        models.builtin_folder("tiny")
    assert str(e.value).startswith(f"{tmp_path / 'f'}: Not a directory")
    assert (tmp_path / "f").read_text() == ""


def test_a_cold_cache_does_not_change_what_training_draws(tmp_path, monkeypatch):
    """Building a builtin (cold cache) must leave the global RNG alone, and a LoRA's initialisation must follow
    the training seed only: a cold and a warm SDXL_CACHE give bitwise-identical adapters."""
    from stages.train import model as M
    from stages.train.config import Config

    cfg = Config(model="builtin:tiny", lora_rank=4, lora_alpha=4.0, seed=7)
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "cold"))
    torch.manual_seed(123)
    before = torch.get_rng_state()
    models.load_model("builtin:tiny", ("unet",))  # materialises the builtin: builds it from its own seeds
    assert torch.equal(torch.get_rng_state(), before)
    monkeypatch.setenv("SDXL_CACHE", str(tmp_path / "cold2"))
    torch.manual_seed(1)
    cold = M.trainable(M.build_unet(cfg.unet, torch.device("cpu")))   # cold cache: builds the builtin first
    torch.manual_seed(2)
    warm = M.trainable(M.build_unet(cfg.unet, torch.device("cpu")))   # warm cache, other global RNG state
    assert len(cold) == len(warm) and all(torch.equal(a, b) for a, b in zip(cold, warm))
    assert any(a.abs().sum() > 0 for a in cold)
