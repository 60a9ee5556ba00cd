"""`sdxl export`: the trained weights as files other tools load -> kohya / peft LoRA, diffusers folder, single file.

Reads a finished training (<workdir>/train), or one checkpoint folder given as --in (…/checkpoints/step-N, also
from an unfinished training's .staging folder; its base model comes from its manifest). Formats (--format,
repeat or comma-separate; default kohya + peft for a LoRA, single-file for a full fine-tune): kohya (SGM
`lora_unet_…`/`lora_te1_…` names, lora_down/lora_up/alpha, dora_scale, `ss_*` metadata: ComfyUI, A1111,
Forge), peft (diffusers' pytorch_lora_weights.safetensors), diffusers (a pipeline folder) and single-file (SGM
layout). The last two fold a LoRA in at --merge-scale; LoRA formats from a full fine-tune are refused.

--verify (default) loads every file back through diffusers (load_lora_weights, from_pretrained,
from_single_file) and compares the outputs of the UNet (and of touched text encoders; for full models also the
VAE) on fixed inputs, in float32, with the trained model whose weights are rounded to --dtype (what the file
should hold); the largest |Δ| may be --tolerance (1e-3) of the output's scale. How far the rounding moved the
outputs is recorded beside it. Kohya names must be exactly the trained modules' and modules of real SDXL: a
full-size SDXL file is checked directly; the tiny builtin's block indices differ from SDXL's, so there the
same preset is applied to SDXL's full-size UNet on the meta device and diffusers must map every name back.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shared.core import artifacts, graph, outputs
from shared.formats.checkpoints import CHECKPOINTS
from shared.models import loading as models
from shared.core.artifacts import Manifest
from shared.core.config import opt
from shared.core.errors import ConfigError
from shared.core.log import warn
from shared.core.stage import Stage, execute
from stages.export import source
from stages.export.build import build
from stages.export.compare import compare, compare_command  # noqa: F401  (the `sdxl compare` command)
from stages.export.formats import FORMATS, formats_for
from stages.export.verify import TOLERANCE, VerificationError  # noqa: F401

VERSION = 1
DTYPES = ("float16", "bfloat16", "float32")


def _split(values: list[str]) -> tuple[str, ...]:
    return tuple(v.strip() for value in values for v in value.split(",") if v.strip())


@dataclass(frozen=True)
class Config:
    workdir: Path = opt(Path("work"), "Pipeline work folder; default parent of every stage's output.",
                        pipeline=True, fingerprint=False)
    input: Path | None = opt(None, "Train output folder, or one checkpoint folder (…/checkpoints/step-N, also "
                                   "of an unfinished training) [default: <workdir>/train].", flag="--in",
                             fingerprint=False)
    output: Path | None = opt(None, "Output folder [default: <workdir>/export].", flag="--out", fingerprint=False)
    format: tuple[str, ...] = opt((), "Formats to write, repeated or comma-separated [default: kohya,peft for a "
                                      "LoRA; single-file for a full fine-tune; diffusers,single-file for a VAE].",
                                  from_cli=_split, choices=FORMATS)
    weights: str = opt("final", "Which weights: final, ema (the final checkpoint's EMA) or step-N (a kept "
                                "checkpoint).")
    dtype: str = opt("float16", "dtype of the written weights (LoRA alphas stay float32).", choices=DTYPES)
    merge_scale: float = opt(1.0, "LoRA strength folded into the base weights for diffusers and single-file "
                                  "(as diffusers' fuse_lora lora_scale; negative subtracts the LoRA).")
    verify: bool = opt(True, "Load every written file back through diffusers and compare its outputs with the "
                             "trained model's.")
    tolerance: float = opt(TOLERANCE, "Largest allowed |Δ| of a verified output after reload, relative to "
                                      "max(1, its largest |value|); the reference holds the same rounding.", gt=0)
    name: str = opt("sdxl", "File stem: <name>.kohya.safetensors, <name>.sdxl.safetensors; also the LoRA's "
                            "ss_output_name.")
    comment: str | None = opt(None, "Training comment written as ss_training_comment [default: the training's].")
    model: str | None = opt(None, "Base model the weights apply to [default: the one the training recorded].",
                            fingerprint=False, nonempty=True)
    device: str = opt("auto", "Where verification runs: auto (cuda when present), cpu or cuda.",
                      choices=("auto", "cpu", "cuda"), fingerprint=False)

    def __post_init__(self) -> None:
        unknown = [f for f in self.format if f not in FORMATS]
        if unknown:
            raise ConfigError(f"format: {FORMATS.unknown(unknown[0])}")
        object.__setattr__(self, "format", tuple(dict.fromkeys(self.format)))
        if not self.name or "/" in self.name or "\\" in self.name or self.name.startswith("."):
            raise ConfigError(f"name {self.name!r}: must be a plain file stem (no slashes, not hidden)")
        if not source.WEIGHTS.match(self.weights):
            raise ConfigError(f"weights {self.weights!r}: expected final, ema or step-N (e.g. step-500)")
        object.__setattr__(self, "input", self.input or graph.default_input(self.workdir, "export"))
        object.__setattr__(self, "output", self.output or self.workdir / "export")


def _inputs(cfg: Config) -> dict:
    ckpt = source.locate(cfg.input, cfg.weights, cfg.model)
    part = "vae" if ckpt.method == "vae" else "unet"
    formats_for(cfg, ckpt.method, ckpt.spec.kind if ckpt.spec else "lora")
    identity = models.model_identity(ckpt.base, ("vae",) if part == "vae" else models.MODEL_PARTS)
    trained_on = ((ckpt.train.inputs.get("model") or {}).get("components") or {}).get(part) if ckpt.train else None
    if trained_on and trained_on != identity[part]:
        warn(f"the base model {ckpt.base} has another {part.upper()} than the one {cfg.input} was trained on; the "
             f"export applies the weights to it as asked")
    return {"train": {"path": str(cfg.input), "fingerprint": ckpt.fingerprint(),
                      "what": f"{ckpt.kind} weights of {cfg.input}"},
            "model": {"name": ckpt.base, "components": identity, "fingerprint": artifacts.hash_json(identity),
                      "what": f"weights of {ckpt.base}"}}


STAGE = Stage(name="export", version=VERSION,
              module=__name__, reads=(CHECKPOINTS,),
              protected=lambda cfg: [("input folder", cfg.input)] + outputs.local_paths({"model": cfg.model}),
              out_dir=lambda cfg: cfg.output, inputs=_inputs, build=build)


def run(cfg: Config, force: bool = False) -> Manifest | None:
    """Export the chosen weights of `cfg.input` in the asked formats into `<out>`, each verified."""
    return execute(STAGE, cfg, force)
