"""`sdxl generate`: DreamBooth class images rendered by the base model -> <out>/images/NNNNNN.png + .txt.

Prior preservation trains on the subject's images together with images the base model itself makes of the
subject's class ("a photo of a dog"), so the class keeps its look. This stage renders `count` such images with
the objective's sampler (shared/models/sampling.py), each from noise seeded by `seed + index`, so an image does
not depend on the batch size or on which images were already there; each gets the class prompt as its caption.
Give the folder to ingest as a source with `role = "class"`. The output is fingerprinted like every stage's
(model weights, prompt, size, steps, seed...), so rerunning it is a no-op, and an interrupted run resumes
where it stopped.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from shared.core import artifacts, outputs, ranks
from shared.core.artifacts import Manifest
from shared.core.config import SEED_RANGE, opt
from shared.core.errors import ConfigError, InputError
from shared.core.faults import checkpoint
from shared.core.log import progress, say
from shared.core.stage import BuildResult, Stage, execute
from shared.models import loading as models
from shared.models import render as R
from shared.models import sampling

VERSION = 1
IMAGES = "images"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


@dataclass(frozen=True)
class Config:
    prompt: str = opt("", "The class prompt, e.g. 'a photo of a dog': what every image shows, and its caption.",
                      nonempty=True)
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/classes].", flag="--out", fingerprint=False)
    model: str | None = opt(None, "The base model: builtin:tiny, builtin:sdxl-random, a diffusers SDXL folder or "
                                  "a single-file checkpoint.", pipeline=True, fingerprint=False)
    count: int = opt(100, "Images to render (the seeds use 100-200 per class).", ge=1, le=1_000_000)
    negative_prompt: str = opt("", "Negative prompt (classifier-free guidance's unconditional side).")
    width: int = opt(1024, "Image width in pixels.", ge=64, le=8192, multiple_of=64)
    height: int = opt(1024, "Image height in pixels.", ge=64, le=8192, multiple_of=64)
    steps: int = opt(30, "Sampler steps per image.", ge=1, le=1000)
    cfg_scale: float = opt(5.0, "Classifier-free guidance scale (1 = no guidance).", ge=1, le=100)
    seed: int = opt(0, "Image i starts from noise seeded by seed + i.", **SEED_RANGE)
    batch_size: int = opt(1, "Images rendered together (memory vs speed; the images do not depend on it "
                             "beyond float rounding).", ge=1, le=1024, fingerprint=False)
    precision: str = opt("float32", "The UNet's and VAE's dtype while rendering.", choices=tuple(DTYPES))
    device: str = opt("auto", "Where to render: auto (a GPU when present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ConfigError("prompt: none given; pass --prompt, the class prompt (e.g. 'a photo of a dog')")
        object.__setattr__(self, "output", self.output or self.workdir / "classes")


def objective_of(spec: str) -> sampling.Objective:
    """The base model's objective: its scheduler config's prediction type (a diffusers folder), else SDXL's ε."""
    sched = Path(spec).expanduser() / "scheduler" / "scheduler_config.json"
    if not spec.startswith("builtin:") and sched.is_file():
        try:
            config = json.loads(sched.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise InputError(f"{sched}: unreadable scheduler config ({e})") from None
        return sampling.Objective.from_scheduler(config)
    return sampling.Objective()


def _inputs(cfg: Config) -> dict:
    if not cfg.model:
        raise InputError("generate needs --model (or `model` in [pipeline]): the base model that renders")
    identity = models.model_identity(cfg.model, PARTS)
    return {"model": {"name": cfg.model, "components": identity, "fingerprint": artifacts.hash_json(identity),
                      "what": f"weights of {cfg.model}"}}


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    return outputs.local_paths({"model": cfg.model})


def image_path(staging: Path, index: int) -> Path:
    return staging / IMAGES / f"{index:06d}.png"


def _done(staging: Path, index: int) -> bool:
    """An image written by an earlier, interrupted run (both files are written before the next image)."""
    return image_path(staging, index).is_file() and image_path(staging, index).with_suffix(".txt").is_file()


def _build(cfg: Config, staging: Path, inputs: dict) -> BuildResult:
    (staging / IMAGES).mkdir(parents=True, exist_ok=True)
    todo = [i for i in range(cfg.count) if not _done(staging, i)]
    if len(todo) < cfg.count:
        say(f"generate: {cfg.count - len(todo)} of {cfg.count} images already rendered; rendering the rest")
    device = ranks.device(cfg.device)
    dtype = DTYPES[cfg.precision]
    objective = objective_of(cfg.model)
    sampler = sampling.choose(objective)
    with torch.random.fork_rng(devices=[]):  # a model builder may draw from the global generator
        model = models.load_model(cfg.model, PARTS, dtype=torch.float32)
    cond = R.encode(model, [R.Prompt(cfg.prompt, cfg.negative_prompt)])[0]
    unet = model.unet.to(device, dtype).eval()
    vae = model.vae.to(device, dtype).eval()
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    for batch in progress(batches, len(batches), "generate", unit="batch"):
        images = render_batch(unet, vae, cond, cfg, batch, objective, sampler)
        for index, image in zip(batch, images):
            _write(staging, index, image, cfg.prompt)
            checkpoint("generate.image")
    say(f"generate: {cfg.count} images of '{cfg.prompt}' ({objective.prediction}, {sampler.method} on "
        f"{sampler.ladder} sigmas, {cfg.steps} steps, cfg {cfg.cfg_scale:g}) in {cfg.output / IMAGES}; "
        f"ingest them as a source with role = \"class\"")
    return BuildResult({"in": cfg.count, "out": cfg.count, "dropped": {}},
                       {"objective": objective.to_dict(), "sampler": vars(sampler)})


@torch.no_grad()
def render_batch(unet: Any, vae: Any, cond: R.Conditioning, cfg: Config, indices: list[int],
                 objective: sampling.Objective, sampler: sampling.Sampler) -> list[Any]:
    """The images of `indices`, rendered together; image i from noise seeded by cfg.seed + i."""
    param = next(unet.parameters())
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    prompts = [R.Prompt(cfg.prompt, cfg.negative_prompt, cfg.seed + i, cfg.width, cfg.height, cfg.steps,
                        cfg.cfg_scale) for i in indices]
    noise = torch.cat([R.starting_noise(p, unet.config.in_channels, factor) for p in prompts])
    n = len(indices)
    batched = R.Conditioning(*(t.expand(n, *t.shape[1:]) for t in vars(cond).values()))
    model = R.unet_model(unet, batched.to(param.device, param.dtype), (cfg.height, cfg.width), cfg.cfg_scale,
                         sampler.guidance_rescale, param.dtype)
    latents = sampling.sample(model, noise, objective, sampler, cfg.steps)
    return [R.decode(vae, latents[k:k + 1]) for k in range(n)]


def _write(staging: Path, index: int, image: Any, caption: str) -> None:
    """The image, then its caption, each written whole (a kill leaves no half file that looks done)."""
    path = image_path(staging, index)
    tmp = path.with_suffix(".png.tmp")
    image.save(tmp, format="PNG")
    os.replace(tmp, path)
    artifacts.write_atomic(path.with_suffix(".txt"), caption + "\n")


def _kept(staging: Path) -> str:
    done = len(list((staging / IMAGES).glob("*.txt"))) if (staging / IMAGES).is_dir() else 0
    return f"{done} rendered images are kept in {staging}"


STAGE = Stage(name="generate", version=VERSION, module=__name__, out_dir=lambda cfg: cfg.output,
              inputs=_inputs, build=_build, resumable=True, protected=_protected, kept=_kept)


def run(cfg: Config, force: bool = False) -> Manifest:
    """Render `count` class images of `prompt` with the base model into `<out>/images/`."""
    return execute(STAGE, cfg, force)
