"""Running a stage under the artifact contract, and deciding whether it needs to run at all.

A stage is described by a `Stage`: its config class, where it writes, what its inputs are (each with a
fingerprint) and a `build` function that fills a staging folder. `execute` computes the fingerprint of
config + inputs + code, skips the stage when a finished output has the same one (saying so), and otherwise
builds into staging and commits atomically, printing why it ran.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from shared.core import artifacts, integrity, outputs, ranks
from shared.core.artifacts import Manifest
from shared.core.config import fingerprinted, to_plain
from shared.core.graph import Format
from shared.core.log import say


@dataclass
class BuildResult:
    counts: dict
    extra: dict = field(default_factory=dict)


def _nothing(cfg: Any) -> list:
    return []


@dataclass(frozen=True)
class Stage:
    name: str
    version: int
    module: str  # the stage's module: its code version covers it and every project module it imports
    out_dir: Callable[[Any], Path]
    inputs: Callable[[Any], dict]
    build: Callable[[Any, Path, dict], BuildResult | None]  # (config, staging folder, the decided inputs)
    resumable: bool = False  # keeps its staging folder across crashes (build resumes from what is there)
    #: (what, folder) pairs `--out` must stay apart from: inputs, sources, model folders (read from cfg only)
    protected: Callable[[Any], list[tuple[str, Path]]] = _nothing
    trees: tuple[str, ...] = ()  # bulky subfolders recorded as stamps (their index holds per-unit hashes)
    skip: tuple[str, ...] = ()   # subfolders not recorded at all (logs)
    #: resumable stages: a damaged finished output goes back to staging and the build resumes there; this
    #: drops what is damaged first, so the build redoes only that
    repair: Callable[[Any, Path], None] | None = None
    #: what an interrupted run leaves in its staging folder, for the one line printed on SIGINT / SIGTERM
    kept: Callable[[Path], str] | None = None
    #: the artifact formats it reads from its input folder and writes into its output (shared/core/graph.py):
    #: its place in `sdxl run`, its default --in and which folders it accepts follow from them; the manifest
    #: records the written ones with their versions (`holds`)
    reads: tuple[Format, ...] = ()
    writes: tuple[Format, ...] = ()


@dataclass
class Decision:
    fingerprint: str
    code_version: str
    inputs: dict
    reasons: list[str]
    previous: Manifest | None
    damaged: bool = False


def decide(stage: Stage, cfg: Any) -> Decision:
    """Whether `stage` must run for `cfg`, and why (empty reasons: its output is up to date)."""
    inputs = stage.inputs(cfg)
    code = artifacts.code_version(stage.module)
    config = fingerprinted(cfg)
    fp = artifacts.hash_json({"stage": stage.name, "version": stage.version, "code": code, "config": config,
                              "inputs": {k: v["fingerprint"] for k, v in inputs.items()}})
    out = stage.out_dir(cfg)
    prev = artifacts.read_manifest(out)
    if prev is None:
        unfinished = artifacts.staging_dir(out).exists()
        why = "previous run did not finish" if unfinished else "no previous output"
        return Decision(fp, code, inputs, [why], None)
    if prev.fingerprint != fp:
        return Decision(fp, code, inputs, _differences(stage, prev, config, inputs, code), prev)
    if prev.files is None:
        return Decision(fp, code, inputs, ["its manifest records no file hashes (older sdxl)"], prev)
    damaged = integrity.damage(Path(out), prev.files, prev.trees)
    if damaged:
        more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
        return Decision(fp, code, inputs, [f"output damaged: {damaged[0]}{more}"], prev, True)
    if stage.resumable and _rerun_of(stage, out, fp):
        # a rerun of an up-to-date output (--force, or options outside the fingerprint such as sample prompts)
        # was interrupted: its staging folder is resumed, not left behind by "unchanged, skipped"
        return Decision(fp, code, inputs, [f"an interrupted rerun did not finish ({artifacts.staging_dir(out).name} "
                                           f"is resumed)"], prev)
    return Decision(fp, code, inputs, [], prev)


def _rerun_of(stage: Stage, out: Path, fingerprint: str) -> bool:
    """`out`'s staging folder holds an unfinished run of this stage for `fingerprint` (not a repair)."""
    found = artifacts.read_job(artifacts.staging_dir(Path(out)))
    return (found.get("stage"), found.get("fingerprint")) == (stage.name, fingerprint) and not found.get("repair")


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


@contextlib.contextmanager
def claimed(stage: Stage, cfg: Any) -> Iterator[None]:
    """Check that `--out` may be written, then hold it (an OS lock) and turn SIGINT / SIGTERM into one line
    saying what is kept; reentrant, so a stage's `run` may claim before it decides."""
    rank = ranks.current()
    out = Path(stage.out_dir(cfg))
    outputs.check_apart(out, stage.protected(cfg))
    outputs.check_target(out, stage.name)
    claim = outputs.claim(out, stage.name, rank.rank, outputs.job_id(rank.world))
    try:
        with _interrupts(stage, out, rank.main, first=claim.depth == 1):
            yield
    finally:
        outputs.release(claim)


class _Interrupted(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise(signum: int, frame: Any) -> None:
    raise _Interrupted(signum)


@contextlib.contextmanager
def _interrupts(stage: Stage, out: Path, main: bool, first: bool) -> Iterator[None]:
    if not first or threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except (_Interrupted, KeyboardInterrupt) as e:
        signum = getattr(e, "signum", signal.SIGINT)
        if main:
            staging = artifacts.staging_dir(out)
            kept = stage.kept(staging) if stage.kept and staging.exists() else "nothing of this run is kept"
            say(f"{stage.name}: interrupted by {signal.Signals(signum).name}; {kept}; rerun the same command to "
                f"{'resume' if stage.resumable else 'start again'}")
        raise SystemExit(128 + signum) from None
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


def execute(stage: Stage, cfg: Any, force: bool = False, decision: Decision | None = None) -> Manifest | None:
    """Run `stage` unless its output is up to date; return the manifest of the (new or kept) output.
    `decision`: the caller's `decide(stage, cfg)`, made while it held the claim.

    Under a multi-process launcher every rank calls this; only rank 0 speaks and commits (a ranked stage's
    build returns None on the other ranks, which then return None)."""
    with claimed(stage, cfg):
        return _execute(stage, cfg, force, decision or decide(stage, cfg))


def _execute(stage: Stage, cfg: Any, force: bool, decision: Decision) -> Manifest | None:
    rank = ranks.current()
    main = rank.main
    if not decision.reasons and not force:
        if main:
            say(f"{stage.name}: unchanged, skipped (fingerprint {decision.fingerprint[:12]}; --force reruns it)")
            _drop_leftover(stage, Path(stage.out_dir(cfg)))
        assert decision.previous is not None
        return decision.previous
    if main:
        say(f"{stage.name}: runs: " + ("--force" if not decision.reasons else "; ".join(decision.reasons)))
    out = Path(stage.out_dir(cfg))
    job = outputs.job_id(rank.world)
    if not main and not stage.resumable:  # a single-process stage under a launcher: rank 0 runs it, others wait
        ranks.wait_for(lambda: getattr(artifacts.read_manifest(out), "fingerprint", None) == decision.fingerprint,
                       f"rank 0 to finish {stage.name}", alive=lambda: outputs.partner_alive(out, 0, job))
        return artifacts.read_manifest(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging(stage, cfg, decision, rank, job)
    result = stage.build(cfg, staging, decision.inputs)
    if result is None:
        return None
    manifest = Manifest(stage=stage.name, version=stage.version, code_version=decision.code_version,
                        config=to_plain(cfg), inputs=decision.inputs, fingerprint=decision.fingerprint,
                        counts=result.counts, created=artifacts.now(), extra=result.extra,
                        holds={f.name: f.version for f in stage.writes} or None)
    artifacts.commit(staging, out, manifest, stage.trees, stage.skip)
    say(f"{stage.name}: done -> {out}")
    return manifest


def _drop_leftover(stage: Stage, out: Path) -> None:
    """A stage that starts afresh (not resumable) and is skipped removes the staging folder an interrupted
    rerun of it left (its job.json names this stage); a resumable stage's is resumed instead (see decide)."""
    staging = artifacts.staging_dir(out)
    if stage.resumable or artifacts.read_job(staging).get("stage") != stage.name or staging.is_symlink():
        return
    artifacts.remove_output(staging)
    say(f"{stage.name}: removed {staging.name}, left by an interrupted run")


def _staging(stage: Stage, cfg: Any, decision: Decision, rank: ranks.Rank, job: str) -> Path:
    """The folder the build writes into: fresh, or (resumable stages) the one to resume — prepared by rank 0,
    awaited by the others; a damaged finished output goes back there to be repaired, not redone."""
    out = Path(stage.out_dir(cfg))
    staging = artifacts.staging_dir(out)
    if not stage.resumable:
        return artifacts.fresh_staging(out, stage.name)
    if not rank.main:
        def prepared() -> bool:
            found = artifacts.read_job(staging)
            return (found.get("fingerprint"), found.get("job")) == (decision.fingerprint, job)
        ranks.wait_for(lambda: prepared() and outputs.partner_alive(out, 0, job), f"rank 0 to prepare {staging}",
                       alive=lambda: outputs.partner_alive(out, 0, job))
        return staging
    if decision.damaged and out.is_dir() and not staging.exists():
        # job.json first, so the folder is recognisable whenever a kill stops this; it says a repair is due
        # (redone after a kill until resumable_staging rewrites it) and names no job: the other ranks wait
        artifacts.write_job(out, stage.name, decision.fingerprint, "", repair=True)
        os.replace(out, staging)
    found = artifacts.read_job(staging)
    if found.get("repair") and found.get("fingerprint") == decision.fingerprint:
        (staging / artifacts.MANIFEST).unlink(missing_ok=True)
        if stage.repair is not None:
            stage.repair(cfg, staging)
    return artifacts.resumable_staging(out, stage.name, decision.fingerprint, job)
