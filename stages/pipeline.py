"""`sdxl run` and `sdxl demo`; the built-in stages' registration in the stage graph (shared/core/graph.py), whose
order `sdxl run` follows. The only module that imports stage modules.

Each stage skips itself when its output's fingerprint matches (see shared/core/stage.py), so `run` is cheap to
repeat and prints, per stage, why it runs or that it is skipped.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Iterator

from shared.core import graph
from shared.core.config import load_toml, resolve
from shared.core.errors import ConfigError
from shared.core.log import say
from stages.synthetic import generate_dataset
from stages import bucket, encode, export, generate, ingest, train

#: the built-in stages, registered here and nowhere else (a plugin registers its own with graph.STAGES.add):
#: the `sdxl` commands, the pipeline.toml tables and what `sdxl run` runs all come from graph.STAGES; the run
#: order follows from what each stage reads and writes (its Stage declaration), not from this list's order
for _node in (graph.node(ingest), graph.node(bucket), graph.node(encode),
              graph.node(train), graph.node(export),
              graph.node(generate, folder="classes", runs=False)):
    if _node.name not in graph.STAGES:
        graph.STAGES.add(_node)


class _Stages(Sequence):
    """(table, stage module) of the stages `sdxl run` runs, in run order (read from graph.STAGES when used)."""

    def __init__(self, runs: bool):
        self._runs = runs

    def _pairs(self) -> list[tuple[str, Any]]:
        return [(n.name, n.module) for n in graph.order() if n.runs == self._runs]

    def __getitem__(self, k: Any) -> Any:
        return self._pairs()[k]

    def __len__(self) -> int:
        return len(self._pairs())

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return iter(self._pairs())


#: (pipeline.toml table, stage module) of the stages `sdxl run` runs, in run order
STAGES: Sequence[tuple[str, Any]] = _Stages(runs=True)
#: stages that `sdxl run` does not run (their own command makes input for one that it does)
OPTIONAL: Sequence[tuple[str, Any]] = _Stages(runs=False)
#: the tables a pipeline.toml may hold besides [pipeline], with their config classes
TABLES = graph.TABLES


def run_all(config_path: Path | None, force: bool = False, overrides: dict[str, dict] | None = None) -> list:
    """Every stage `sdxl run` runs, in graph order, configured from pipeline.toml (plus per-stage overrides)."""
    toml = load_toml(config_path, TABLES)
    if "ingest" not in toml or "sources" not in toml["ingest"]:
        if not (overrides or {}).get("ingest", {}).get("sources"):
            raise ConfigError("sdxl run needs [ingest] sources in the config (or use the stage commands)")
    manifests = []
    for node in graph.nodes(runs_only=True):
        cfg = resolve(node.Config, node.name, toml, (overrides or {}).get(node.name))
        manifests.append(node.run(cfg, force=force))
    return manifests


def demo(workdir: Path, images: int, seed: int, force: bool = False, steps: int = 200) -> list:
    """Synthetic captioned images through every stage, at a size a CPU handles in minutes."""
    data = generate_dataset(workdir / "data", count=images, seed=seed)
    say(f"demo: {images} synthetic images in {data}")
    overrides: dict[str, dict[str, Any]] = {
        "ingest": {"sources": (str(data),), "min_side": 128, "workdir": workdir},
        "bucket": {"max_area": 256 * 256, "min_side": 128, "max_side": 512, "max_upscale": 4.0,
                   "min_bucket_items": 4, "workdir": workdir},
        "encode": {"model": "builtin:tiny", "caption_variants": 2, "flip": True, "format": "both", "workdir": workdir},
        "train": {"model": "builtin:tiny", "method": "lora", "lora_preset": "attn+conv", "lora_rank": 32,
                  "lora_alpha": 32.0, "learning_rate": 3e-3, "batch_size": 8, "max_steps": steps,
                  "checkpoint_every": 100, "caption_dropout": 0.1, "workdir": workdir},
        "export": {"format": ("kohya", "peft"), "workdir": workdir},
    }
    manifests = run_all(None, force=force, overrides=overrides)
    done = dict(zip((n.name for n in graph.nodes(runs_only=True)), manifests))
    ingested, bucketed, encoded, trained = done["ingest"], done["bucket"], done["encode"], done["train"]
    say(f"demo: {ingested.counts['out']} images accepted ({ingested.counts['in']} files with captions); "
        f"{bucketed.counts['out']} items planned into {bucketed.extra.get('buckets_used')} buckets; "
        f"{encoded.counts['out']} encoded into {encoded.extra.get('shards')} shards ({workdir / 'encode'}); "
        f"{trained.extra['steps']} LoRA steps trained ({workdir / 'train'}); exported as kohya and peft LoRA, "
        f"each loaded back through diffusers and verified ({workdir / 'export'})")
    (first_step, first), (last_step, last) = trained.extra["eval_loss"]["first"], trained.extra["eval_loss"]["last"]
    say(f"demo: loss on the fixed evaluation set (same samples, timesteps and noise): {first:.4f} at step "
        f"{first_step} -> {last:.4f} at step {last_step} ({100 * (1 - last / first):.0f}% lower)")
    return manifests
