"""One export: rebuild the trained model, write each asked format, verify it, record it for the manifest."""
from __future__ import annotations

import gc
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from shared.core import artifacts, ranks
from shared.core.faults import checkpoint
from shared.formats import kohya
from shared.models import loading as models
from shared.core.log import say
from shared.core.stage import BuildResult
from shared.models.sampling import Objective
from stages.export import formats, source, verify
from stages.export import vae as vae_export
from stages.export.formats import FORMATS, formats_for

if TYPE_CHECKING:
    from stages.export import Config


@dataclass
class Job:
    """What every format writer and verifier of one export needs."""
    cfg: Config
    ckpt: source.Checkpoint
    weights: dict
    model: models.SDXLModel | None   # dropped once references are taken and full-model files written
    unet_config: Any
    out: Path
    device: str
    info: dict
    provenance: dict
    expected: dict[str, set[str]] | None = None   # the LoRA-carrying modules per component (LoRA formats)

    def parts(self, names: tuple[str, ...]) -> dict[str, Any]:
        return {n: getattr(self.model, n) for n in names if getattr(self.model, n, None) is not None}


def _info(cfg: Config, ckpt: source.Checkpoint) -> dict:
    """What kohya metadata and the single file's modelspec record, from the checkpoint and the training."""
    train = ckpt.train.config if ckpt.train else {}
    extra = ckpt.train.extra if ckpt.train else {}
    comment = cfg.comment if cfg.comment is not None else extra.get("comment", train.get("comment"))
    return kohya.training_info(train, extra, step=ckpt.step, epoch=ckpt.meta.get("epoch"), spec=ckpt.spec,
                               base=ckpt.base, name=cfg.name, comment=comment,
                               finished=ckpt.train.created if ckpt.train else None)


def _provenance(ckpt: source.Checkpoint) -> dict:
    train = ckpt.train
    return kohya.provenance(version=artifacts.PACKAGE_VERSION, base=ckpt.base,
                            train_fingerprint=train.fingerprint if train else None,
                            inputs=train.inputs if train else {}, weights=ckpt.kind, step=ckpt.step,
                            checkpoint_fingerprint=ckpt.meta.get("fingerprint"),
                            objective=Objective.from_config(ckpt.record.config or (train.config if train else {}))
                            .to_dict())


def _record(job: Job, fmt: str, path: Path, check: tuple[float, float] | None) -> dict:
    """What the manifest says of one written format: file, sha256 (of a folder: of its files' hashes), size,
    and the verification (largest |Δ| after reload, and what rounding to the dtype changed)."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    if path.is_dir():
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(path)}:{artifacts.sha256_file(f)}\n".encode())
        digest = h.hexdigest()
    else:
        digest = artifacts.sha256_file(path)
    diff, rounding = check if check is not None else (None, None)
    shown = "not verified" if check is None else f"verified: max |Δ| {diff:.2e} after reload; rounding to " \
                                                  f"{job.cfg.dtype} moved outputs by {rounding:.2e}"
    say(f"export: {fmt}: {path.relative_to(job.out)} ({shown})")
    return {"file": str(path.relative_to(job.out)), "sha256": digest, "bytes": sum(f.stat().st_size for f in files),
            "verified": check is not None, "max_abs_diff": diff, "rounding_abs_diff": rounding,
            "tolerance": job.cfg.tolerance}


def _lora_components(job: Job) -> dict[str, set[str]]:
    """Per component of the trained model, the modules that carry a LoRA (empty components left out)."""
    found = {c: verify.lora_modules(m) for c, m in job.parts(source.COMPONENTS).items()}
    return {c: mods for c, mods in found.items() if mods}


@dataclass
class Reference:
    outputs: dict     # probe outputs of the trained model rounded to the export dtype ({} without --verify)
    rounding: float   # how far that rounding moved them from the float32 model's


def lora_reference(job: Job, inputs: dict) -> tuple[dict[str, set[str]], Reference]:
    """The LoRA-carrying modules per component, and the reference a LoRA file of the export dtype must meet."""
    expected = _lora_components(job)
    if not job.cfg.verify:
        return expected, Reference({}, 0.0)
    parts = job.parts(tuple(expected))
    exact = verify.outputs(parts, inputs, job.device)
    with verify.rounded(parts, formats.torch_dtype(job.cfg.dtype)):
        ref = verify.outputs(parts, inputs, job.device)
    return expected, Reference(ref, verify.difference(ref, exact)[0])


def export_loras(job: Job, chosen: list[str], inputs: dict, expected: dict[str, set[str]], ref: Reference) -> dict:
    """kohya and/or peft files from the LoRA weights; each loaded back into the base model and compared."""
    cfg = job.cfg
    pipe = verify.base_pipeline(job.ckpt.base) if cfg.verify else None
    job.expected = expected
    records = {}
    for fmt in chosen:
        entry = FORMATS[fmt]
        path = entry.path(job.out, cfg.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = entry.write(job, path)
        checkpoint("export.format")
        check = None
        if pipe is not None:
            check = (verify.verify_lora(pipe, path, entry.load, expected, inputs, ref.outputs, cfg.tolerance,
                                        job.device), ref.rounding)
        records[fmt] = {**_record(job, fmt, path, check), **extra}
    del pipe
    gc.collect()
    return records


def _merge(job: Job, parts: dict, inputs: dict) -> Reference:
    """Fold a LoRA into the base weights at merge_scale, checking the merge against the unmerged model; then
    round every weight to the export dtype, for good."""
    touched = list(_lora_components(job)) if job.ckpt.method == "lora" else []
    for component in touched:
        formats.scale_lora(parts[component], job.cfg.merge_scale)
    exact = verify.outputs(parts, inputs, job.device) if job.cfg.verify else {}
    for component in touched:
        formats.merge_lora(parts[component], 1.0)
    if job.cfg.verify and touched:
        verify.compare(f"the LoRA merged at scale {job.cfg.merge_scale:g}", verify.outputs(parts, inputs, job.device),
                       exact, job.cfg.tolerance)
    verify.round_weights(parts, formats.torch_dtype(job.cfg.dtype))
    if not job.cfg.verify:
        return Reference({}, 0.0)
    ref = verify.outputs(parts, inputs, job.device)
    for module in parts.values():
        module.to("cpu")
    return Reference(ref, verify.difference(ref, exact)[0])


def write_models(job: Job, chosen: list[str], inputs: dict) -> tuple[dict[str, Path], Reference]:
    """The diffusers folder and/or single file of the whole model (a LoRA folded in at merge_scale)."""
    ref = _merge(job, job.parts(("unet", "text_encoder", "text_encoder_2", "vae")), inputs)
    written = {}
    for fmt in chosen:
        path = written[fmt] = FORMATS[fmt].path(job.out, job.cfg.name)
        path.parent.mkdir(parents=True, exist_ok=True)
        FORMATS[fmt].write(job, path)
        checkpoint("export.format")
    return written, ref


def verify_models(job: Job, written: dict[str, Path], inputs: dict, ref: Reference) -> dict:
    """Each full-model file loaded back (one at a time) and compared with the rounded merged model."""
    records = {}
    for fmt, path in written.items():
        check = None
        if ref.outputs:
            check = (verify.verify_model(FORMATS[fmt].load, path, inputs, ref.outputs, job.cfg.tolerance,
                                         job.device), ref.rounding)
        records[fmt] = _record(job, fmt, path, check)
        gc.collect()
    return records


def build(cfg: Config, staging: Path, inputs: dict) -> BuildResult:
    """The stage's build. Only one full model is held at a time: references are taken and full-model files
    written from the trained model, which is then dropped before anything is loaded back."""
    ckpt = source.locate(cfg.input, cfg.weights, cfg.model)
    if ckpt.method == "vae":   # a VAE fine-tune (train --target vae): its own formats (vae.py)
        job = Job(cfg, ckpt, {}, None, None, staging, ranks.device(cfg.device), {}, _provenance(ckpt))
        return vae_export.build(job, lambda fmt, path, check: _record(job, fmt, path, check))
    chosen = formats_for(cfg, ckpt.method, ckpt.spec.kind if ckpt.spec else "lora")
    loras = [f for f in chosen if FORMATS[f].kind == "lora"]
    wholes = [f for f in chosen if FORMATS[f].kind == "model"]
    weights = source.load_weights(ckpt)
    model = source.trained_model(ckpt, weights, models.COMPONENTS if wholes else source.COMPONENTS)
    if ckpt.method == "full":
        weights = {}  # now inside the model; a second full UNet is not kept
    job = Job(cfg, ckpt, weights, model, model.unet.config, staging, ranks.device(cfg.device), _info(cfg, ckpt),
              _provenance(ckpt))
    inputs = verify.probe(model.unet.config)
    records = {}
    with verify.exact_math():
        expected, lora_ref = lora_reference(job, inputs) if loras else ({}, None)
        written, model_ref = write_models(job, wholes, inputs) if wholes else ({}, None)
        job.model = model = None
        gc.collect()
        if wholes:
            records.update(verify_models(job, written, inputs, model_ref))
        if loras:
            records.update(export_loras(job, loras, inputs, expected, lora_ref))
    extra = {"formats": {f: records[f] for f in chosen}, "method": ckpt.method, "base_model": ckpt.base,
             "weights": {"kind": ckpt.kind, "step": ckpt.step, "checkpoint": str(ckpt.folder),
                         "file": ckpt.file.name}, "dtype": cfg.dtype, "provenance": job.provenance}
    return BuildResult({"in": 1, "out": len(records), "dropped": {}}, extra)
