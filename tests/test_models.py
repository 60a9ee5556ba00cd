import json

import pytest
import torch

from shared import models
from shared.errors import PipelineError


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

    code = "from shared.models import builtin_folder; print(builtin_folder('tiny'))"
    env = {**os.environ, "SDXL_CACHE": str(tmp_path)}
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0] and outs[0] == outs[1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"builtin-tiny-v{models.BUILTIN_VERSION}"]
