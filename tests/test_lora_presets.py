"""The LoRA presets: which UNet modules each targets, and that every preset's kohya names on full-size SDXL are
the names kohya's own tools write and map back through diffusers."""
from __future__ import annotations

import pytest
import torch

from shared.core.errors import ConfigError
from shared.models import loading as models
from shared.models.lora import PRESETS, target_modules
from stages.export import kohya


@pytest.fixture(scope="module")
def unet():
    return models.load_model("builtin:tiny", ("unet",)).unet


def test_presets_nest_and_cover_what_they_say(unet):
    sets = {p: set(target_modules(unet, p)) for p in PRESETS}
    assert sets["self-attn"] < sets["attn"] < sets["kohya"] < sets["kohya+conv"]
    assert sets["attn"] < sets["attn+conv"] < sets["kohya+conv"]
    assert sets["kohya+conv"] - sets["kohya"] == sets["attn+conv"] - sets["attn"]  # the same convolutions
    assert all(".attn1." in n for n in sets["self-attn"])
    assert {n for n in sets["attn"] if ".attn1." in n} == sets["self-attn"]
    linears = {n for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear) and ".attentions." in n}
    assert sets["kohya"] == linears  # every Linear of the transformer models, nothing outside them
    assert any(n.endswith(".proj_in") for n in linears) and any(n.endswith(".ff.net.2") for n in linears)
    with pytest.raises(ConfigError, match="expected one of attn, self-attn, kohya"):
        target_modules(unet, "all")


@pytest.mark.parametrize("preset", ["self-attn", "kohya", "kohya+conv"])
def test_full_size_names_map_back_through_diffusers(preset):
    names = kohya.full_size_names(preset)
    assert kohya.full_size_problems(preset) == []
    if preset.startswith("kohya"):
        for real in ("lora_unet_input_blocks_4_1_proj_in", "lora_unet_output_blocks_0_1_proj_out",
                     "lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_0_proj",
                     "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2",
                     "lora_unet_input_blocks_4_1_transformer_blocks_1_attn2_to_v"):
            assert real in names
        # kohya's networks.lora on SDXL: 722 modules (10 transformer blocks per model at the inner levels)
        assert (len(names) == 722) == (preset == "kohya")
    else:
        assert all("_attn1_" in n for n in names) and len(names) == 70 * 4
