"""Running a stage under the artifact contract, and deciding whether it needs to run at all.

A stage is described by a `Stage`: its config class, where it writes, what its inputs are (each with a
fingerprint) and a `build` function that fills a staging folder. `execute` computes the fingerprint of
config + inputs + code, skips the stage when a finished output has the same one (saying so), and otherwise
builds into staging and commits atomically, printing why it ran.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shared import artifacts, ranks
from shared.artifacts import Manifest
from shared.config import fingerprinted, to_plain
from shared.log import say


@dataclass
class BuildResult:
    counts: dict
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    code_modules: tuple[str, ...]
    out_dir: Callable[[Any], Path]
    inputs: Callable[[Any], dict]
    build: Callable[[Any, Path], BuildResult | None]
    resumable: bool = False  # keeps its staging folder across crashes (build resumes from what is there)


@dataclass
class Decision:
    fingerprint: str
    code_version: str
    inputs: dict
    reasons: list[str]
    previous: Manifest | None


def decide(stage: Stage, cfg: Any) -> Decision:
    """Whether `stage` must run for `cfg`, and why (empty reasons: its output is up to date)."""
    inputs = stage.inputs(cfg)
    code = artifacts.code_version(stage.code_modules)
    config = fingerprinted(cfg)
    fp = artifacts.hash_json({"stage": stage.name, "version": stage.version, "code": code, "config": config,
                              "inputs": {k: v["fingerprint"] for k, v in inputs.items()}})
    out = stage.out_dir(cfg)
    prev = artifacts.read_manifest(out)
    if prev is None:
        unfinished = artifacts.staging_dir(out).exists()
        why = "previous run did not finish" if unfinished else "no previous output"
        return Decision(fp, code, inputs, [why], None)
    if prev.fingerprint == fp:
        return Decision(fp, code, inputs, [], prev)
    return Decision(fp, code, inputs, _differences(stage, prev, config, inputs, code), prev)


def _differences(stage: Stage, prev: Manifest, config: dict, inputs: dict, code: str) -> list[str]:
    if prev.stage != stage.name or prev.version != stage.version:
        return [f"output folder holds {prev.stage} v{prev.version}, not {stage.name} v{stage.version}"]
    reasons = []
    changed = [f"{k} {_show(prev.config.get(k))} -> {_show(v)}" for k, v in config.items()
               if prev.config.get(k) != v]
    if changed:
        reasons.append("config changed: " + ", ".join(changed))
    for name, now in inputs.items():
        old = prev.inputs.get(name, {})
        if old.get("fingerprint") != now["fingerprint"]:
            reasons.append(f"input changed: {name}" + (f" ({now['what']})" if now.get("what") else ""))
    if prev.code_version != code:
        reasons.append(f"code changed: {prev.code_version} -> {code}")
    return reasons or ["fingerprint changed"]


def _show(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False) if not isinstance(value, (int, float)) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def execute(stage: Stage, cfg: Any, force: bool = False, decision: Decision | None = None) -> Manifest | None:
    """Run `stage` unless its output is up to date; return the manifest of the (new or kept) output.
    `decision`: the caller's `decide(stage, cfg)`, when it already made it.

    Under a multi-process launcher every rank calls this; only rank 0 speaks and commits (a ranked stage's
    build returns None on the other ranks, which then return None)."""
    main = ranks.current().main
    decision = decision or decide(stage, cfg)
    if not decision.reasons and not force:
        if main:
            say(f"{stage.name}: unchanged, skipped (fingerprint {decision.fingerprint[:12]}; --force reruns it)")
        assert decision.previous is not None
        return decision.previous
    if main:
        say(f"{stage.name}: runs: " + ("--force" if not decision.reasons else "; ".join(decision.reasons)))
    out = stage.out_dir(cfg)
    if not main and not stage.resumable:  # a single-process stage under a launcher: rank 0 runs it, others wait
        ranks.wait_for(lambda: getattr(artifacts.read_manifest(out), "fingerprint", None) == decision.fingerprint,
                       f"rank 0 to finish {stage.name}")
        return artifacts.read_manifest(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if stage.resumable:
        staging = artifacts.resumable_staging(out, decision.fingerprint, main)
    else:
        staging = artifacts.fresh_staging(out)
    result = stage.build(cfg, staging)
    if result is None:
        return None
    manifest = Manifest(stage=stage.name, version=stage.version, code_version=decision.code_version,
                        config=to_plain(cfg), inputs=decision.inputs, fingerprint=decision.fingerprint,
                        counts=result.counts, created=artifacts.now(), extra=result.extra)
    artifacts.commit(staging, out, manifest)
    say(f"{stage.name}: done -> {out}")
    return manifest
