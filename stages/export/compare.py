"""`sdxl compare`: the same prompts and seeds rendered by several variants, in one labelled grid image.

A variant is a LoRA file (kohya or peft, applied to the base model), an export output folder (its LoRA, or its
model when it holds no LoRA), a diffusers folder, a single-file checkpoint, a model spec such as
builtin:tiny, or `base` (the base model itself). Rows are variants, columns prompt x seed; every image of a
column starts from the same seeded noise, so differences come from the weights alone.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

import typer

from shared.core import artifacts, ranks
from shared.models import loading as models
from shared.core.errors import InputError
from stages.export.formats import PEFT_FILE

LABEL_WIDTH = 160   # the row-label column, pixels
HEADER_HEIGHT = 28  # the column-label row, pixels
EXPORT_PREFERENCE = ("kohya", "peft", "diffusers", "single-file")


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str            # base | kohya | peft | diffusers | single-file | model
    path: str            # the file, folder or model spec
    base: str | None     # the base model an export folder recorded


def _file_kind(path: Path) -> str:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error types for other files
        raise InputError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    if any(k.startswith(("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_")) for k in keys):
        return "kohya"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        return "peft"
    if models.UNET_CONV_IN in keys:
        return "single-file"
    raise InputError(f"{path}: neither a LoRA (kohya or peft) nor a single-file SDXL checkpoint")


def _from_export(folder: Path) -> Variant:
    manifest = artifacts.read_manifest(folder)
    assert manifest is not None
    written = manifest.extra.get("formats", {})
    for fmt in EXPORT_PREFERENCE:
        if fmt in written:
            return Variant(folder.name, fmt, str(folder / written[fmt]["file"]), manifest.extra.get("base_model"))
    raise InputError(f"{folder}: an export output holding no file; rerun sdxl export --out {folder}")


def resolve(entry: str) -> Variant:
    """What a command-line entry names."""
    if entry == "base":
        return Variant("base", "base", "", None)
    path = Path(entry).expanduser()
    label = f"{path.parent.name}/{path.name}" if path.name in ("diffusers", "peft") else path.name
    if path.is_dir():
        if (path / artifacts.MANIFEST).is_file() and getattr(artifacts.read_manifest(path), "stage", "") == "export":
            return _from_export(path)
        if (path / "model_index.json").is_file():
            return Variant(label, "diffusers", str(path), None)
        if (path / PEFT_FILE).is_file():
            return Variant(label, "peft", str(path / PEFT_FILE), None)
        raise InputError(f"{path}: not an export output, a diffusers folder or a folder with {PEFT_FILE}")
    if path.is_file():
        return Variant(path.name.removesuffix(".safetensors"), _file_kind(path), str(path), None)
    if entry.startswith("builtin:"):
        return Variant(entry, "model", entry, None)
    raise InputError(f"{entry}: not found; expected a LoRA file, an export folder, a diffusers folder, a "
                     f"single-file checkpoint, a builtin model or `base`")


def _pipeline(spec: str, device: str) -> Any:
    """A float32 StableDiffusionXLPipeline of a model spec, diffusers folder or single file."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    model = models.load_model(spec, models.COMPONENTS, dtype=torch.float32)
    pipe = StableDiffusionXLPipeline(**{p: getattr(model, p) for p in models.COMPONENTS}).to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _render(pipe: Any, prompts: list[str], seeds: list[int], steps: int, size: tuple[int, int] | None,
            guidance: float) -> list[Any]:
    import torch

    if size is None:  # the model's native resolution
        size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    images = []
    for prompt in prompts:
        for seed in seeds:
            g = torch.Generator("cpu").manual_seed(seed)  # the same noise on any device
            images.append(pipe(prompt=prompt, num_inference_steps=steps, width=size[0], height=size[1],
                               guidance_scale=guidance, generator=g).images[0])
    return images


def _fit(draw: Any, text: str, width: int) -> str:
    while text and draw.textlength(text) > width:
        text = text[:-2] + "…" if len(text) > 1 else ""
    return text


def grid(rows: list[tuple[str, list[Any]]], columns: list[str], size: tuple[int, int]) -> Any:
    """One image: a header row of column labels (two lines each), then per row its label and its images."""
    from PIL import Image, ImageDraw

    w, h = size
    canvas = Image.new("RGB", (LABEL_WIDTH + w * len(columns), HEADER_HEIGHT + h * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, text in enumerate(columns):
        for k, line in enumerate(text.split("\n")[:2]):
            draw.text((LABEL_WIDTH + j * w + 4, 3 + 12 * k), _fit(draw, line, w - 8), fill="black")
    for i, (label, images) in enumerate(rows):
        draw.text((4, HEADER_HEIGHT + i * h + h // 2 - 6), _fit(draw, label, LABEL_WIDTH - 8), fill="black")
        for j, image in enumerate(images):
            canvas.paste(image.convert("RGB").resize((w, h)), (LABEL_WIDTH + j * w, HEADER_HEIGHT + i * h))
    return canvas


def _base_of(variants: list[Variant], base: str | None) -> str | None:
    return base or next((v.base for v in variants if v.base), None)


def _rows(variants: list[Variant], base: str | None, render: Any, device: str) -> list[tuple[str, list[Any]]]:
    from stages.export.verify import load_kohya

    rows, base_pipe = [], None
    for v in variants:
        if v.kind in ("base", "kohya", "peft"):
            if base is None:
                raise InputError(f"{v.label}: needs a base model; give it with --model")
            base_pipe = base_pipe or _pipeline(base, device)
            if v.kind == "kohya":
                load_kohya(base_pipe, Path(v.path))
            elif v.kind == "peft":
                base_pipe.load_lora_weights(str(Path(v.path).parent), weight_name=Path(v.path).name)
            rows.append((v.label, render(base_pipe)))
            if v.kind != "base":
                base_pipe.unload_lora_weights()
        else:
            rows.append((v.label, render(_pipeline(v.path, device))))
    return rows


def compare(entries: list[str], prompts: list[str], seeds: list[int], out: Path, base: str | None = None,
            steps: int = 20, size: tuple[int, int] | None = None, guidance: float = 5.0, include_base: bool = True,
            device: str = "auto") -> Path:
    """Render every prompt x seed with every variant into one labelled grid PNG at `out`; returns `out`."""
    if not entries or not prompts or not seeds:
        raise InputError("compare needs at least one variant, one --prompt and one --seed")
    if not math.isfinite(guidance):
        raise InputError(f"--guidance {guidance}: not a finite number")
    if size is not None and (size[0] % 8 or size[1] % 8):
        raise InputError(f"--width/--height {size[0]}x{size[1]}: each must be a multiple of 8 (the VAE's factor)")
    device = ranks.device(device)
    variants = [resolve(e) for e in entries]
    base = _base_of(variants, base)
    if include_base and base is not None and all(v.kind != "base" for v in variants):
        variants.insert(0, Variant("base", "base", "", None))
    rows = _rows(variants, base, lambda pipe: _render(pipe, prompts, seeds, steps, size, guidance), device)
    columns = [f"{p}\nseed {s}" for p in prompts for s in seeds]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = rows[0][1][0].size
    grid(rows, columns, size).save(out)
    (out.with_suffix(".json")).write_text(json.dumps({"rows": [v.__dict__ for v in variants], "columns": columns,
                                                      "steps": steps, "size": list(size), "guidance": guidance,
                                                      "base": base}, indent=2) + "\n")
    return out


def compare_command(
        variants: List[str] = typer.Argument(..., help="LoRA files (kohya or peft), export output folders, "
                                                       "diffusers folders, single-file checkpoints, builtin "
                                                       "models, or `base`."),
        prompt: List[str] = typer.Option(["a photo of a cat"], "--prompt", help="A prompt (repeatable)."),
        seed: List[int] = typer.Option([0], "--seed", min=0, max=2 ** 63 - 1, help="A seed (repeatable)."),
        model: Optional[str] = typer.Option(None, "--model", help="Base model for LoRA files [default: the one "
                                                                  "an export folder recorded]."),
        steps: int = typer.Option(20, min=1, help="Sampling steps."),
        width: Optional[int] = typer.Option(None, min=8, help="Image width, a multiple of 8 [default: the "
                                                               "model's native size]."),
        height: Optional[int] = typer.Option(None, min=8, help="Image height, a multiple of 8 [default: the "
                                                                "model's native size]."),
        guidance: float = typer.Option(5.0, min=0.0, help="Classifier-free guidance scale (finite)."),
        base_row: bool = typer.Option(True, "--base/--no-base", help="Also render the base model as a row."),
        out: Path = typer.Option(Path("compare.png"), "--out", help="The grid image (a .json beside it says "
                                                                    "what each row and column is)."),
        device: str = typer.Option("auto", help="auto (cuda when present), cpu or cuda.")) -> None:
    """Render the same prompts and seeds with several LoRAs or checkpoints (and the base model) into one
    labelled grid image, so variants can be judged side by side."""
    from shared.core.command import user_errors

    with user_errors():
        size = (width or height, height or width) if (width or height) else None
        path = compare(variants, prompt, seed, out, model, steps, size, guidance, base_row, device)
    typer.echo(f"compare: {len(variants)} variants x {len(prompt) * len(seed)} images -> {path}")
