"""Export of a VAE training (`train --target vae`; checkpoint method `vae`): the fine-tuned AutoencoderKL as a
diffusers folder (`<out>/vae/`, what `sdxl encode --vae` and `AutoencoderKL.from_pretrained` load) and as one
`.safetensors` in the original layout of the standalone SDXL VAE files (`encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`; shared/models/sgm.py), what ComfyUI / A1111 / Forge load as a VAE.

--verify loads each back through diffusers (`from_pretrained`, `from_single_file` given the VAE's config, offline)
and compares the decoder's image of a fixed latent and the encoder's mean of a fixed image with the trained VAE
rounded to --dtype (verify.py's rule and tolerance).
"""
from __future__ import annotations

from typing import Any

from shared.core.errors import InputError
from shared.core.stage import BuildResult
from shared.models import loading as models
from stages.export import formats, source, verify
from stages.export.formats import FORMATS, formats_for

CONFIG = "vae-config"   # the VAE's config beside the single file (what from_single_file is given)


def trained_vae(ckpt: source.Checkpoint) -> Any:
    """The base model's AutoencoderKL (float32) with the checkpoint's `vae.*` weights (all of them)."""
    import torch
    from safetensors.torch import load_file

    state = load_file(str(ckpt.file))
    bad = [k for k in state if not k.startswith("vae.")]
    if bad:
        raise InputError(f"{ckpt.file}: unexpected weight {bad[0]!r} in a VAE checkpoint (expected vae.*)")
    vae = models.load_model(ckpt.base, ("vae",), dtype=torch.float32).vae
    result = vae.load_state_dict({k[4:]: v.float() for k, v in state.items()}, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise InputError(f"{ckpt.file}: the VAE weights do not fit {ckpt.base} "
                         f"({(result.missing_keys or result.unexpected_keys)[0]}); give its base with --model")
    return vae.eval()


def probe(vae: Any, seed: int = 0) -> dict:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {"latent": torch.randn(1, vae.config.latent_channels, 8, 8, generator=g),
            "image": torch.rand(1, vae.config.in_channels, 64, 64, generator=g) * 2 - 1}


def outputs(vae: Any, inputs: dict, device: str) -> dict:
    """The decoder's image of the probe latent and the encoder's mean of the probe image (CPU, float32)."""
    import torch

    vae = vae.to(device, torch.float32)
    with torch.no_grad():
        decoded = vae.decode(inputs["latent"].to(device)).sample
        mean = vae.encode(inputs["image"].to(device)).latent_dist.mean
    vae.to("cpu")
    return {"vae.decode": decoded.float().cpu(), "vae.encode": mean.float().cpu()}


def build(job: Any, record: Any) -> BuildResult:
    """Write and verify the asked formats of a VAE checkpoint (`job`: build.Job without a model).
    `record(fmt, path, check)` is build.py's manifest entry of one written format."""
    import torch

    cfg, ckpt, staging, device, provenance = job.cfg, job.ckpt, job.out, job.device, job.provenance
    chosen = formats_for(cfg, "vae")
    vae = trained_vae(ckpt)
    inputs = probe(vae)
    with verify.exact_math():
        exact = outputs(vae, inputs, device) if cfg.verify else {}
        vae.to(formats.torch_dtype(cfg.dtype)).to(torch.float32)   # the reference holds the file's rounding
        ref = outputs(vae, inputs, device) if cfg.verify else {}
        rounding = verify.difference(ref, exact)[0] if cfg.verify else 0.0
        kinds = {fmt: FORMATS[fmt].vae for fmt in chosen}
        where = {fmt: kind.path(staging, cfg.name) for fmt, kind in kinds.items()}
        config = staging / CONFIG
        vae.save_config(str(config))
        for fmt, kind in kinds.items():
            kind.write(vae, where[fmt], cfg.dtype, provenance)
        records = {}
        for fmt, kind in kinds.items():
            check = None
            if cfg.verify:
                got = outputs(kind.load(where[fmt], config).float().eval(), inputs, device)
                check = (verify.compare(where[fmt].name, got, ref, cfg.tolerance), rounding)
            records[fmt] = record(fmt, where[fmt], check)
    extra = {"formats": records, "method": "vae", "base_model": ckpt.base,
             "weights": {"kind": ckpt.kind, "step": ckpt.step, "checkpoint": str(ckpt.folder),
                         "file": ckpt.file.name}, "dtype": cfg.dtype, "provenance": provenance}
    return BuildResult({"in": 1, "out": len(records), "dropped": {}}, extra)
