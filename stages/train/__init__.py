"""`sdxl train`: stream encode's shards and train the UNet (LoRA or full), with exact resume.

Reads `<in>` (encode's output: index.json, empty/, tar shards or zarr; or the tar shards from --shards URLs),
refuses shards encoded with another VAE / text encoders than the model's, and writes into `<out>.staging/`:
`checkpoints/step-NNNNNN/` (the whole loop state: weights, EMA, optimizer, LR schedule, gradient scaler,
progress = loader position, each rank's RNG; newest K kept; format: shared/formats/checkpoints.py) and `logs/`
(metrics.jsonl, TensorBoard). When the last step is done the folder becomes `<out>` with its manifest. A
rerun of an unfinished run continues from its newest checkpoint (--resume auto). Under `torchrun` /
`accelerate launch` every process runs this command; rank 0 logs and saves. `--plan` prints the run's predicted
peak device memory (planner.py) and exits without training.
"""
from __future__ import annotations

import json
from pathlib import Path

from shared.core import artifacts, outputs, ranks
from shared.models import loading as models
from shared.core.artifacts import Manifest
from shared.core.errors import ConfigError, InputError
from shared.core.log import say, warn
from shared.core.stage import Stage, claimed, decide, execute
from shared.formats import location, samples
from shared.formats.checkpoints import CHECKPOINTS
from typing import Any

from shared.core.config import fingerprinted
from stages.train import checkpoint as ckpt
from stages.train import extend, loop
from stages.train.config import Config

__all__ = ["Config", "run", "STAGE"]
VERSION = 1


def _inputs(cfg: Config) -> dict:
    manifest = samples.require_encode(cfg.input)
    encoded = manifest.inputs.get("model", {})
    ours = models.model_identity(cfg.model, samples.ENCODER_PARTS)
    theirs = encoded.get("components", {})
    differ = [p for p in samples.ENCODER_PARTS if theirs.get(p) != ours.get(p)]
    if differ and not cfg.allow_encoder_mismatch and cfg.target == "unet":  # the VAE target reads pixels only
        raise InputError(f"{cfg.input}: the shards were encoded with {encoded.get('name')} (vae "
                         f"{theirs.get('vae')}, text encoders {theirs.get('text_encoder')}), but the model being "
                         f"trained is {cfg.model} (vae {ours['vae']}, text encoders {ours['text_encoder']}); "
                         f"differs in: {', '.join(differ)}. Re-encode with --model {cfg.model}, or pass "
                         f"--allow-encoder-mismatch")
    trained = "vae" if cfg.target == "vae" else "unet"
    unet = models.model_identity(cfg.model, (trained,))
    world = ranks.current().world
    start = _perceptual_input(cfg)
    if cfg.init_lora is not None:
        if not Path(cfg.init_lora).is_file():
            raise InputError(f"--init-lora {cfg.init_lora}: no such file")
        start["init_lora"] = {"path": str(cfg.init_lora), "fingerprint": artifacts.sha256_file(Path(cfg.init_lora)),
                               "what": f"the LoRA file {cfg.init_lora} changed"}
    return {**start, "encode": {"path": str(cfg.input), "fingerprint": manifest.fingerprint, "what": "encode output changed"},
            "model": {"name": cfg.model, "components": unet, "fingerprint": artifacts.hash_json(unet),
                      "what": f"{trained.upper()} weights of {cfg.model}"},
            "world": {"fingerprint": f"{world} processes", "what": f"now {world} processes"}}


def _perceptual_input(cfg: Config) -> dict:
    """Target vae with a perceptual loss: the perceptual network's weights file, by content."""
    path = cfg.perceptual_weights
    if cfg.target != "vae" or path is None or not cfg.perceptual_weight:
        return {}
    if not Path(path).is_file():
        raise InputError(f"--perceptual-weights {path}: no such file (a torchvision VGG16 or LPIPS weights file)")
    return {"perceptual": {"path": str(path), "fingerprint": artifacts.sha256_file(Path(path)),
                           "what": f"the perceptual weights {path} changed"}}


def _kept(staging: Path) -> str:
    found = ckpt.complete(staging / "checkpoints")
    return f"checkpoint {found[-1]} is kept" if found else f"no checkpoint was written yet in {staging}"


def _protected(cfg: Config) -> list[tuple[str, Path]]:
    local = [] if location.is_url(cfg.input) else [("input folder", cfg.input)]
    return local + outputs.local_paths({"model": cfg.model})


STAGE = Stage(name="train", version=VERSION,
              module=__name__, reads=(samples.SAMPLES,), writes=(CHECKPOINTS,),
              out_dir=lambda cfg: cfg.output, inputs=_inputs, build=loop.build, resumable=True,
              protected=_protected, trees=("checkpoints",), skip=("logs", "samples", "loras"), kept=_kept)


def _adopt_unfinished(cfg: Config, fingerprint: str, record: dict) -> None:
    """An unfinished run started with another fingerprint: keep its checkpoints and continue (when nothing
    that changes the training differs, or --force-resume), or set it aside (--resume never / PATH); never
    delete it silently."""
    staging = artifacts.staging_dir(cfg.output)
    try:
        started = json.loads((staging / artifacts.JOB).read_text(encoding="utf-8")).get("fingerprint")
    except (OSError, ValueError):
        started = None
    found = ckpt.complete(staging / "checkpoints")
    if started == fingerprint or not found:
        return
    if cfg.resume != "auto":
        aside = staging.with_name(f"{cfg.output.name}.unfinished-{artifacts.now().replace(':', '')}")
        staging.rename(aside)
        say(f"train: set the unfinished run aside (--resume {cfg.resume}): {aside}")
        return
    diff = ckpt.differences(ckpt.read_manifest(found[-1]), record["config"], record["inputs"], extend.LENGTH,
                            ckpt.config_defaults(Config))
    if diff and not cfg.force_resume:
        raise ConfigError(f"{staging} holds an unfinished run (newest checkpoint {found[-1].name}) whose config "
                          f"differs: {'; '.join(diff)}. Pass --force-resume to continue it with the new settings, "
                          f"or --resume never to set it aside and start over")
    if diff:
        warn(f"continuing {found[-1]} with changed settings: {'; '.join(diff)}")
    artifacts.write_job(staging, "train", fingerprint, outputs.job_id(ranks.current().world))


def run(cfg: Config, force: bool = False) -> Manifest | None:
    """Train; rank 0 returns the manifest (the output is skipped when up to date). With `plan`, print the
    predicted peak device memory instead and return None (nothing is read but the encode index, nothing written)."""
    if cfg.plan:
        from stages.train import planner

        planner.print_plan(cfg)
        return None
    with claimed(STAGE, cfg):
        decision = decide(STAGE, cfg)
        if ranks.current().main and (decision.reasons or force):
            _adopt_unfinished(cfg, decision.fingerprint, ckpt.record(cfg, decision.inputs))
            _extend_finished(cfg, decision)
        return execute(STAGE, cfg, force, decision)


def _extend_finished(cfg: Config, decision: Any) -> None:
    """A finished output asked for a longer run (nothing else changed) continues from its final checkpoint."""
    if artifacts.staging_dir(cfg.output).exists() or cfg.checkpointing.resume != "auto":
        return
    config = fingerprinted(cfg)
    if extend.extendable(decision.previous, config, decision.inputs, decision.code_version):
        extend.prepare(cfg.output, decision.previous, decision.fingerprint, outputs.job_id(ranks.current().world))
