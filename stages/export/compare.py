"""`sdxl compare`: the same prompts and seeds rendered by several variants, in one labelled grid image.

A variant is a LoRA file (kohya or peft, applied to the base model), an export output folder (its LoRA, or its
model when it holds no LoRA), a diffusers folder, a single-file checkpoint, a model spec such as
builtin:tiny, or `base` (the base model itself). Rows are variants, columns prompt x seed; every image of a
column starts from the same seeded noise, so differences come from the weights alone.

Each variant is rendered with the sampler of its trained objective (shared/models/sampling.py), read from what
it records: our provenance (export metadata / export manifest: prediction, schedule, flow shift), else kohya's
`ss_v_parameterization` / `ss_zero_terminal_snr`, a single file's `v_pred` / `ztsnr` markers, or a diffusers
folder's scheduler config. So a v-prediction or flow LoRA is rendered as what it is, not with the base's ε.
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
from shared.models import render as R
from shared.models.render import HEADER_HEIGHT, LABEL_WIDTH, grid  # noqa: F401  (the grid's layout)
from shared.models import sampling
from shared.core.errors import InputError
from stages.export.formats import FORMATS, PEFT_FILE, PROVENANCE


@dataclass(frozen=True)
class Variant:
    label: str
    kind: str            # base | model | an export format's name (FORMATS)
    path: str            # the file, folder or model spec
    base: str | None     # the base model an export folder recorded
    objective: sampling.Objective | None = None   # what it was trained to predict (None: the base model's)


def _objective_of_file(keys: list[str], meta: dict) -> sampling.Objective | None:
    """The objective a .safetensors records: our provenance, else kohya's / ComfyUI's markers; None: unknown."""
    try:
        recorded = json.loads(meta.get(PROVENANCE, "{}")).get("objective")
    except ValueError:
        recorded = None
    if recorded:
        return sampling.Objective.from_config(recorded)
    v_pred = meta.get("ss_v_parameterization") == "True" or "v_pred" in keys
    ztsnr = meta.get("ss_zero_terminal_snr") == "True" or "ztsnr" in keys
    if v_pred or ztsnr:
        return sampling.Objective("v_prediction", "ztsnr" if ztsnr else "sdxl")
    return None


def _objective_of_folder(folder: Path) -> sampling.Objective | None:
    """A diffusers folder's objective: our provenance file, else its scheduler config."""
    ours = folder / f"{PROVENANCE}.json"
    if ours.is_file():
        recorded = json.loads(ours.read_text(encoding="utf-8")).get("objective")
        if recorded:
            return sampling.Objective.from_config(recorded)
    sched = folder / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        return None
    return sampling.Objective.from_scheduler(json.loads(sched.read_text(encoding="utf-8")))


def _file_kind(path: Path) -> tuple[str, sampling.Objective | None]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys, meta = list(f.keys()), dict(f.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for other files
        raise InputError(f"{path}: not a readable .safetensors file ({str(e).splitlines()[0][:120]})") from None
    objective = _objective_of_file(keys, meta)
    for entry in FORMATS.entries():
        if entry.recognise is not None and entry.recognise(keys):
            return entry.name, objective
    raise InputError(f"{path}: neither a LoRA (kohya or peft) nor a single-file SDXL checkpoint")


def _from_export(folder: Path) -> Variant:
    manifest = artifacts.read_manifest(folder)
    assert manifest is not None
    written = manifest.extra.get("formats", {})
    recorded = (manifest.extra.get("provenance") or {}).get("objective")
    for fmt in FORMATS:   # the first format in the registry's order (LoRA files before whole models)
        if fmt in written:
            return Variant(folder.name, fmt, str(folder / written[fmt]["file"]), manifest.extra.get("base_model"),
                           sampling.Objective.from_config(recorded) if recorded else None)
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
            return Variant(label, "diffusers", str(path), None, _objective_of_folder(path))
        if (path / PEFT_FILE).is_file():
            return Variant(label, "peft", str(path / PEFT_FILE), None, _file_kind(path / PEFT_FILE)[1])
        raise InputError(f"{path}: not an export output, a diffusers folder or a folder with {PEFT_FILE}")
    if path.is_file():
        kind, objective = _file_kind(path)
        return Variant(path.name.removesuffix(".safetensors"), kind, str(path), None, objective)
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


@dataclass(frozen=True)
class Rendering:
    """What every row renders: prompts x seeds at one size, steps and guidance, and the sampler choice (`auto`
    parts follow each variant's objective)."""
    prompts: list[str]
    seeds: list[int]
    steps: int
    size: tuple[int, int] | None
    guidance: float
    sampler: str = "auto"
    sigmas: str = "auto"
    guidance_rescale: float | None = None

    def sampler_for(self, objective: sampling.Objective) -> sampling.Sampler:
        try:
            return sampling.choose(objective, self.sampler, self.sigmas, self.guidance_rescale)
        except ValueError as e:
            raise InputError(f"--sampler {self.sampler} --sigmas {self.sigmas}: {e}") from None


def _base_objective(pipe: Any) -> sampling.Objective:
    config = getattr(pipe.scheduler, "config", {}) if pipe.scheduler is not None else {}
    v_pred = config.get("prediction_type") == "v_prediction"
    ztsnr = bool(config.get("rescale_betas_zero_snr")) and v_pred
    return sampling.Objective("v_prediction" if v_pred else "epsilon", "ztsnr" if ztsnr else "sdxl")


def _render(pipe: Any, job: Rendering, objective: sampling.Objective | None) -> tuple[list[Any], dict]:
    """The row's images, and the objective and sampler they were rendered with."""
    objective = objective or _base_objective(pipe)
    sampler = job.sampler_for(objective)
    w, h = job.size or (pipe.unet.config.sample_size * pipe.vae_scale_factor,) * 2  # the model's native size
    prompts = [R.Prompt(p, "", seed, w, h, job.steps, job.guidance) for p in job.prompts for seed in job.seeds]
    conds = R.encode(pipe, prompts)
    images = [R.render(pipe.unet, pipe.vae, c, p, objective, sampler) for c, p in zip(conds, prompts)]
    return images, {"objective": objective.to_dict(), "sampler": vars(sampler)}


def _base_of(variants: list[Variant], base: str | None) -> str | None:
    return base or next((v.base for v in variants if v.base), None)


def _rows(variants: list[Variant], base: str | None, job: Rendering, device: str) -> tuple[list, list[dict]]:
    """(label, images) per variant, and how each was rendered."""
    rows, how, base_pipe = [], [], None
    for v in variants:
        lora = v.kind in FORMATS and FORMATS[v.kind].kind == "lora"
        if v.kind == "base" or lora:
            if base is None:
                raise InputError(f"{v.label}: needs a base model; give it with --model")
            base_pipe = base_pipe or _pipeline(base, device)
            if lora:
                FORMATS[v.kind].load(base_pipe, Path(v.path))
            images, used = _render(base_pipe, job, v.objective)
            if v.kind != "base":
                base_pipe.unload_lora_weights()
        else:
            images, used = _render(_pipeline(v.path, device), job, v.objective)
        rows.append((v.label, images))
        how.append(used)
    return rows, how


def compare(entries: list[str], prompts: list[str], seeds: list[int], out: Path, base: str | None = None,
            steps: int = 20, size: tuple[int, int] | None = None, guidance: float = 5.0, include_base: bool = True,
            device: str = "auto", sampler: str = "auto", sigmas: str = "auto",
            guidance_rescale: float | None = None) -> Path:
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
    job = Rendering(list(prompts), list(seeds), steps, size, guidance, sampler, sigmas, guidance_rescale)
    rows, how = _rows(variants, base, job, device)
    columns = [f"{p}\nseed {s}" for p in prompts for s in seeds]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    size = rows[0][1][0].size
    grid(rows, columns, size).save(out)
    (out.with_suffix(".json")).write_text(json.dumps({"rows": [_row_record(v, used) for v, used in zip(variants, how)],
                                                      "columns": columns,
                                                      "steps": steps, "size": list(size), "guidance": guidance,
                                                      "base": base}, indent=2) + "\n")
    return out


def _row_record(v: Variant, used: dict) -> dict:
    return {"label": v.label, "kind": v.kind, "path": v.path, "base": v.base, **used}


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
        sampler: str = typer.Option("auto", help="auto (by each variant's trained objective: DPM++ 2M for "
                                                 "epsilon, Euler for zero-terminal-SNR v-prediction and flow), "
                                                 "euler or dpmpp_2m."),
        sigmas: str = typer.Option("auto", help="auto (Karras for epsilon, trailing for zero-terminal-SNR "
                                                "v-prediction, the trained shift for flow), karras, trailing, or "
                                                "novelai (NovelAI's 10-step ladder from σ 20000; v-prediction)."),
        guidance_rescale: Optional[float] = typer.Option(None, min=0.0, max=1.0, help="Guidance rescale φ "
                                                         "[default: 0.7 for zero terminal SNR, else 0]."),
        base_row: bool = typer.Option(True, "--base/--no-base", help="Also render the base model as a row."),
        out: Path = typer.Option(Path("compare.png"), "--out", help="The grid image (a .json beside it says "
                                                                    "what each row and column is)."),
        device: str = typer.Option("auto", help="auto (cuda when present), cpu or cuda.")) -> None:
    """Render the same prompts and seeds with several LoRAs or checkpoints (and the base model) into one
    labelled grid image, so variants can be judged side by side."""
    from shared.core.command import user_errors

    with user_errors():
        size = (width or height, height or width) if (width or height) else None
        if sampler not in sampling.SAMPLERS or sigmas not in sampling.LADDERS:
            raise InputError(f"--sampler {sampler} --sigmas {sigmas}: expected one of {', '.join(sampling.SAMPLERS)} "
                             f"and one of {', '.join(sampling.LADDERS)}")
        path = compare(variants, prompt, seed, out, model, steps, size, guidance, base_row, device, sampler, sigmas,
                       guidance_rescale)
    typer.echo(f"compare: {len(variants)} variants x {len(prompt) * len(seed)} images -> {path}")
