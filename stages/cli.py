"""The `sdxl` command: one sub-command per stage of the stage graph (shared/core/graph.py), plus `run`, `demo` and
the `bench` group. The plugins named in SDXL_PLUGINS are imported first (shared/core/registry.py), so their
registry entries (a stage, too) are in every command's --help and accepted as values."""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer

from shared.core import graph
from shared.core.command import config_option, stage_command, user_errors
from shared.core.errors import PipelineError
from shared.core.registry import load_plugins
from stages import bench, export, pipeline


def run_command(config: Optional[Path] = config_option(),
                force: bool = typer.Option(False, "--force", help="Rerun every stage, even up-to-date ones.")) -> None:
    """Run every stage in order from pipeline.toml, skipping stages whose output is up to date."""
    with user_errors():
        pipeline.run_all(config, force=force)


def demo_command(workdir: Path = typer.Option(Path("demo"), help="Folder for the synthetic data and outputs."),
                 images: int = typer.Option(64, min=8, help="Number of synthetic images."),
                 seed: int = typer.Option(0, min=0, help="Seed of the synthetic dataset."),
                 steps: int = typer.Option(200, min=1, help="LoRA training steps."),
                 force: bool = typer.Option(False, "--force", help="Rerun every stage.")) -> None:
    """Synthetic captioned images through the whole pipeline on the built-in tiny model."""
    with user_errors():
        pipeline.demo(workdir, images, seed, force=force, steps=steps)


def _version(value: bool) -> None:
    if value:
        from shared.core.artifacts import PACKAGE_VERSION

        typer.echo(f"sdxl-stages {PACKAGE_VERSION}")
        raise typer.Exit()


def _main_options(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                               help="Print the version and exit.")) -> None:
    """sdxl stages: a staged, offline pipeline for fine-tuning Stable Diffusion XL."""


def build_app() -> typer.Typer:
    """The `sdxl` app, its options' choices and help read from the registries as they are now."""
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                      rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                      help="sdxl stages: a staged, offline pipeline for fine-tuning Stable Diffusion XL.")
    app.callback()(_main_options)
    for node in graph.order():   # the stage graph (built-in stages and plugins' ones), in run order
        app.command(node.name)(stage_command(node.Config, node.name, node.run, node.doc, graph.TABLES))
    app.command("compare")(export.compare_command)
    app.command("run")(run_command)
    app.command("demo")(demo_command)
    app.add_typer(bench.app, name="bench")
    return app


def _plugins_loaded() -> None:
    try:
        load_plugins()
    except PipelineError as e:   # a plugin named but not importable: one line, exit 2 as every user error
        sys.stderr.write(f"error: {e}\n")
        raise SystemExit(2) from None


_plugins_loaded()
app = build_app()


def main() -> None:
    # bitsandbytes logs advice on import (peft imports it) about optional CPU kernels; not the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
