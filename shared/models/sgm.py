"""SDXL's original (SGM / "single-file") checkpoint layout, from diffusers components.

Stability's checkpoints, and what ComfyUI, A1111 and Forge load, name the UNet `model.diffusion_model.*`
(input/middle/output blocks), the VAE `first_stage_model.*`, CLIP-L `conditioner.embedders.0.transformer.*`
(Hugging Face names) and OpenCLIP bigG `conditioner.embedders.1.model.*` (fused q/k/v, transposed
projection). Block indices follow from the UNet config (layers per block), so the tiny builtin converts too.
Loading goes the other way through diffusers' own single-file loader (shared/models/loading.py), which is therefore
an independent check of this mapping.
"""
from __future__ import annotations

from typing import Any

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
          "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}


def unet_key(key: str, config: Any) -> str:
    """A diffusers UNet2DConditionModel parameter name as its SGM name (without the model prefix)."""
    per = config["layers_per_block"]
    per = per if isinstance(per, int) else per[0]
    parts = key.split(".")
    for old, new in UNET_TOP.items():
        if key.startswith(old + "."):
            return new + key[len(old):]

    def resnet(rest: list[str]) -> str:
        return ".".join([RESNET.get(rest[0], rest[0])] + rest[1:])

    if parts[0] == "down_blocks":
        i, kind = int(parts[1]), parts[2]
        if kind == "downsamplers":
            return f"input_blocks.{(per + 1) * (i + 1)}.0.op." + ".".join(parts[5:])
        j = int(parts[3])
        block = f"input_blocks.{(per + 1) * i + j + 1}"
        return f"{block}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{block}.1." + ".".join(parts[4:])
    if parts[0] == "mid_block":
        j = int(parts[2])
        return f"middle_block.{2 * j}.{resnet(parts[3:])}" if parts[1] == "resnets" else \
            "middle_block.1." + ".".join(parts[3:])
    if parts[0] == "up_blocks":
        i, kind = int(parts[1]), parts[2]
        has_attention = "CrossAttn" in config["up_block_types"][i]
        if kind == "upsamplers":
            return f"output_blocks.{(per + 1) * i + per}.{2 if has_attention else 1}.conv." + ".".join(parts[5:])
        j = int(parts[3])
        block = f"output_blocks.{(per + 1) * i + j}"
        return f"{block}.0.{resnet(parts[4:])}" if kind == "resnets" else f"{block}.1." + ".".join(parts[4:])
    raise KeyError(f"no SGM name for UNet parameter {key}")


VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_key(key: str, blocks: int) -> str:
    """A diffusers AutoencoderKL parameter name as its SGM name (without the first_stage_model prefix)."""
    parts = key.split(".")
    side = parts[0]
    if side in ("quant_conv", "post_quant_conv"):
        return key
    rest = parts[1:]
    if rest[0] == "conv_norm_out":
        return ".".join([side, "norm_out"] + rest[1:])
    if rest[0] in ("conv_in", "conv_out"):
        return key
    if rest[0] == "mid_block":
        if rest[1] == "resnets":
            tail = [("nin_shortcut" if rest[3] == "conv_shortcut" else rest[3])] + rest[4:]
            return ".".join([side, "mid", f"block_{int(rest[2]) + 1}"] + tail)
        inner = ".".join(rest[3:])
        for old, new in VAE_ATTENTION.items():
            if inner.startswith(old + "."):
                return f"{side}.mid.attn_1.{new}{inner[len(old):]}"
    if rest[0] in ("down_blocks", "up_blocks"):
        i = int(rest[1]) if rest[0] == "down_blocks" else blocks - 1 - int(rest[1])
        level = "down" if rest[0] == "down_blocks" else "up"
        if rest[2] == "resnets":
            tail = [("nin_shortcut" if rest[4] == "conv_shortcut" else rest[4])] + rest[5:]
            return ".".join([side, level, str(i), "block", rest[3]] + tail)
        sampler = "downsample" if level == "down" else "upsample"
        return ".".join([side, level, str(i), sampler] + rest[4:])
    raise KeyError(f"no SGM name for VAE parameter {key}")


def vae_state(vae: Any) -> dict:
    """A diffusers AutoencoderKL's state dict in SGM names without the model prefix (`encoder.*`, `decoder.*`,
    `quant_conv.*`, `post_quant_conv.*`): the layout of the standalone SDXL VAE files (sdxl_vae.safetensors)."""
    blocks = len(vae.config.block_out_channels)
    out = {}
    for key, value in vae.state_dict().items():
        name = vae_key(key, blocks)
        if ".mid.attn_1." in name and name.endswith("weight") and value.ndim == 2:
            value = value[:, :, None, None]  # SGM's VAE attention projections are 1x1 convolutions
        out[name] = value
    return out


def hf_clip_state(model: Any) -> dict:
    """A transformers CLIP text model's state dict with `text_model.` names (transformers 5 drops the
    prefix for CLIPTextModel; checkpoints keep it)."""
    return {(k if k.startswith(("text_model.", "text_projection")) else "text_model." + k): v
            for k, v in model.state_dict().items()}


def open_clip_state(state: dict, layers: int) -> dict:
    """A transformers CLIPTextModelWithProjection state dict as OpenCLIP names (q/k/v fused)."""
    import torch

    out = {"token_embedding.weight": state["text_model.embeddings.token_embedding.weight"],
           "positional_embedding": state["text_model.embeddings.position_embedding.weight"],
           "ln_final.weight": state["text_model.final_layer_norm.weight"],
           "ln_final.bias": state["text_model.final_layer_norm.bias"],
           "text_projection": state["text_projection.weight"].t().contiguous()}
    names = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(layers):
        src, dst = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat([state[f"{src}self_attn.{p}_proj.{kind}"]
                                                           for p in ("q", "k", "v")])
            for old, new in names.items():
                out[f"{dst}{new}.{kind}"] = state[f"{src}{old}.{kind}"]
    return out


def to_sgm(unet: Any, vae: Any, text_encoder: Any, text_encoder_2: Any, dtype: Any = None) -> dict:
    """One SGM-layout state dict of an SDXL model's four parts (tensors contiguous, optionally cast)."""
    out = {}
    for key, value in unet.state_dict().items():
        out["model.diffusion_model." + unet_key(key, unet.config)] = value
    for name, value in vae_state(vae).items():
        out["first_stage_model." + name] = value
    for key, value in hf_clip_state(text_encoder).items():
        if not key.endswith("position_ids"):
            out["conditioner.embedders.0.transformer." + key] = value
    te2 = open_clip_state(hf_clip_state(text_encoder_2), text_encoder_2.config.num_hidden_layers)
    for key, value in te2.items():
        out["conditioner.embedders.1.model." + key] = value
    return {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous()
            for k, v in out.items()}
