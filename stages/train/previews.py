"""Sample images during training: the prompts of a TOML file rendered with the UNet as it is training (LoRA
active; the EMA weights when EMA is on), every N steps and at the end, through the sampler of the trained
objective (shared/models/sampling.py). Saved under `<out>/samples/` (not part of the fingerprinted result) as
`step-NNNNNN/NN.png` and one labelled grid, `grid.png` (rows: steps, columns: prompts), and as TensorBoard
images (and WandB images, with --wandb: logs.py).

Rendering never touches the training's random state: the starting noise comes from each prompt's own seed, the
UNet runs in eval mode (no LoRA dropout), and the VAE and text encoders are loaded with the global generator's
state saved and put back. So a run renders the same images and trains the same weights with or without
samples, and a resumed run re-renders the steps after its checkpoint exactly. (With schedule-free optimizers the
samples show the weights being stepped, not the averaged ones a checkpoint holds: switching modes for a sample
would change the run.)

A step's set is whole or absent: it is rendered into `.step-NNNNNN.partial/` and renamed into place when every
image is written, and the grid (replaced atomically) shows complete sets only. A run stopped mid-render (Ctrl-C,
kill -9) leaves nothing that names a missing image; the resumed run drops partial and incomplete sets and those
after its checkpoint (`forget_after`), and renders the set of the step it resumes at when that is due and was
not finished (the loop asks the target at that step; `due` is false for a set already on disk).
"""
from __future__ import annotations

import contextlib
import math
import os
import shutil
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from shared.core.errors import ConfigError
from shared.models import loading as models
from shared.models import render as R
from shared.models import sampling
from shared.core.config import opt
from shared.core.faults import checkpoint

TEXT_PARTS = ("vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
PROMPT_KEYS = {f.name for f in fields(R.Prompt)}


@dataclass(frozen=True, kw_only=True)
class PreviewConfig:
    """Sample images: options of `sdxl train` (config.py composes them)."""
    sample_prompts: Path | None = opt(None, "TOML file of prompts rendered during training ([[prompt]] tables: "
                                            "prompt, negative, seed, width, height, steps, cfg), with the model "
                                            "as it is training (EMA weights when EMA is on), at the start, every "
                                            "sample_every steps and at the end, into <out>/samples (grid.png) and "
                                            "TensorBoard.", fingerprint=False)
    sample_every: int = opt(0, "Render the sample prompts every N optimizer steps; 0 = only at the start and the "
                               "end.", fingerprint=False, ge=0)
    sample_sampler: str = opt("auto", "Sampler of the sample images: auto (by objective: DPM++ 2M for epsilon, "
                                      "Euler for zero-terminal-SNR v-prediction and flow), euler, dpmpp_2m.",
                              choices=("auto", "euler", "dpmpp_2m"), fingerprint=False)
    sample_sigmas: str = opt("auto", "Noise levels of the sample images: auto (Karras for epsilon, trailing "
                                     "timesteps for zero terminal SNR, the trained shift for flow), karras, "
                                     "trailing, novelai (NovelAI's 10-step ladder from σ 20000; v-prediction).",
                             choices=("auto", "karras", "trailing", "novelai"), fingerprint=False)
    sample_guidance_rescale: float | None = opt(None, "Guidance rescale φ of the sample images [default: 0.7 "
                                                      "with zero terminal SNR, else 0].", fingerprint=False,
                                                ge=0, le=1)


def load_prompts(path: Path) -> list[R.Prompt]:
    """`[[prompt]]` tables of a TOML file: prompt (required), negative, seed, width, height, steps, cfg."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--sample-prompts {path}: not a readable TOML file ({e})") from None
    tables = data.get("prompt")
    if not isinstance(tables, list) or not tables or set(data) != {"prompt"}:
        raise ConfigError(f"--sample-prompts {path}: expected one or more [[prompt]] tables and nothing else")
    return [_prompt(path, i, t) for i, t in enumerate(tables)]


def _prompt(path: Path, i: int, table: dict) -> R.Prompt:
    where = f"--sample-prompts {path}: prompt {i + 1}"
    unknown = sorted(set(table) - PROMPT_KEYS)
    if unknown or not isinstance(table.get("prompt"), str):
        raise ConfigError(f"{where}: needs `prompt` (text) and only the keys {', '.join(sorted(PROMPT_KEYS))}"
                          + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    p = R.Prompt(**table)
    ints = {"seed": p.seed, "width": p.width, "height": p.height, "steps": p.steps}
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in ints.values()) or p.seed < 0 \
            or p.steps < 1 or p.width < 8 or p.height < 8 or p.width % 8 or p.height % 8:
        raise ConfigError(f"{where}: seed >= 0, steps >= 1, width and height multiples of 8 (got {ints})")
    if not isinstance(p.cfg, (int, float)) or not math.isfinite(p.cfg) or p.cfg < 0:
        raise ConfigError(f"{where}: cfg must be a finite number >= 0 (got {p.cfg!r})")
    if not isinstance(p.negative, str):
        raise ConfigError(f"{where}: negative must be text")
    return p


class Previews:
    """The prompts' conditioning and the VAE, made once at setup; `render` draws one row of the grid."""

    def __init__(self, cfg: PreviewConfig, model_spec: str, objective: sampling.Objective, folder: Path,
                 device: torch.device):
        self.cfg, self.objective, self.folder = cfg, objective, folder
        self.prompts = load_prompts(cfg.sample_prompts)
        try:
            self.sampler = sampling.choose(objective, cfg.sample_sampler, cfg.sample_sigmas,
                                           cfg.sample_guidance_rescale)
        except ValueError as e:
            raise ConfigError(f"--sample-sampler / --sample-sigmas: {e}") from None
        with torch.random.fork_rng(devices=[]):  # a model builder may draw from the global generator
            parts = models.load_model(model_spec, TEXT_PARTS, dtype=torch.float32)
        self.conds = R.encode(parts, self.prompts)
        self.tokenizers = (parts.tokenizer, parts.tokenizer_2)   # to encode again with trained text encoders
        self.vae = parts.vae.to(device).eval()

    def due(self, step: int, total: int) -> bool:
        """Whether a set is wanted at `step` (at the start, every sample_every steps, at the end) and is not on
        disk already (a run resumed at a step whose set was finished)."""
        every = self.cfg.sample_every
        return (step == 0 or step == total or bool(every and step % every == 0)) and not self.rendered(step)

    def rendered(self, step: int) -> bool:
        """Whether the images of `step` are on disk, every prompt's."""
        return step in self.sets()

    def sets(self) -> dict[int, Path]:
        """The complete sets on disk, {step: folder}: a step-NNNNNN folder holding an image of every prompt."""
        found = {}
        for folder in self.folder.glob("step-*"):
            step = _step_of(folder.name)
            if step is not None and folder.is_dir() and all((folder / f"{i:02d}.png").is_file()
                                                            for i in range(len(self.prompts))):
                found[step] = folder
        return dict(sorted(found.items()))

    def forget_after(self, step: int) -> None:
        """A resumed run drops the renders of steps after its checkpoint (they are rendered again), what a render
        that was stopped left (a partial set) and any set that is not complete (rendered again when its step is
        the one resumed at); the grid then shows what remains."""
        if not self.folder.is_dir():
            return
        complete = self.sets()
        for old in self.folder.iterdir():
            at = _step_of(old.name)
            if old.name.startswith(".step-") or old.name == GRID_TMP or \
                    (at is not None and (at > step or at not in complete)):
                _remove(old)
        self.write_grid()   # also when nothing was dropped: a run stopped before it rewrote the grid left it behind

    def render(self, unet: Any, step: int, ema: Any, autocast: Any, tensorboard: Any, text: Any = None) -> Path:
        """Every prompt at `step` into step-NNNNNN/, the grid rewritten; returns the grid's path. With `text`
        (textenc.TextEncoders being trained) the prompts are encoded again by the encoders as they are now.

        A set is made whole or not at all: its images go into `.step-NNNNNN.partial/`, which is renamed into
        place once every image is written; the grid (written atomically) lists complete sets only. So a run
        stopped mid-render (Ctrl-C, kill -9) leaves no folder or grid that names a missing image."""
        where = self.folder / f"step-{step:06d}"
        partial = self.folder / f".step-{step:06d}.partial"
        _remove(partial)
        partial.mkdir(parents=True)
        with (ema.swapped() if ema is not None else contextlib.nullcontext()):
            conds = self.conds
            if text is not None:
                with text.evaluating():
                    conds = R.encode(SimpleNamespace(**text.encoders, tokenizer=self.tokenizers[0],
                                                     tokenizer_2=self.tokenizers[1]), self.prompts)
            images = []
            with autocast:
                for c, p in zip(conds, self.prompts):
                    checkpoint("samples.render")
                    images.append(R.render(unet, self.vae, c, p, self.objective, self.sampler))
        (partial / "weights.txt").write_text("ema\n" if ema is not None else "live\n")
        for i, image in enumerate(images):
            checkpoint("samples.image")
            image.save(partial / f"{i:02d}.png")
        checkpoint("samples.written")
        _remove(where)   # a set of this step rendered before (a step rendered again)
        os.replace(partial, where)
        checkpoint("samples.renamed")
        if tensorboard is not None:
            for i, image in enumerate(images):
                tensorboard.add_image(f"samples/{i:02d}", np.asarray(image), step, dataformats="HWC")
            tensorboard.flush()
        return self.write_grid()

    def labelled(self, step: int) -> dict[str, tuple[Path, str]]:
        """The images of `step` and the grid, by name, each with a caption (for WandB): only files that exist."""
        where = self.folder / f"step-{step:06d}"
        out = {f"samples/{i:02d}": (where / f"{i:02d}.png", f"{p.prompt} (seed {p.seed}, step {step})")
               for i, p in enumerate(self.prompts)}
        out["samples/grid"] = (self.folder / GRID, f"rows: steps up to {step}; columns: prompts")
        return {name: (path, caption) for name, (path, caption) in out.items() if path.is_file()}

    def write_grid(self) -> Path:
        """grid.png of the complete sets (rows: steps, columns: prompts), replaced atomically; none without a set."""
        from PIL import Image

        out = self.folder / GRID
        rows = []
        for step, folder in self.sets().items():
            which = (folder / "weights.txt").read_text().strip() if (folder / "weights.txt").exists() else "live"
            label = f"step {step}" + (" (EMA)" if which == "ema" else "")
            rows.append((label, [Image.open(folder / f"{i:02d}.png") for i in range(len(self.prompts))]))
        if not rows:
            out.unlink(missing_ok=True)
            return out
        size = (max(p.width for p in self.prompts), max(p.height for p in self.prompts))
        columns = [f"{p.prompt}\nseed {p.seed}, cfg {p.cfg:g}, {p.steps} steps" for p in self.prompts]
        tmp = self.folder / GRID_TMP
        R.grid(rows, columns, size).save(tmp, format="PNG")
        checkpoint("samples.grid")
        os.replace(tmp, out)
        return out


GRID, GRID_TMP = "grid.png", ".grid.png.partial"


def _step_of(name: str) -> int | None:
    """The step of a set folder's name, step-NNNNNN; None for any other name."""
    digits = name[5:]
    return int(digits) if name.startswith("step-") and len(digits) == 6 and digits.isdigit() else None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()
