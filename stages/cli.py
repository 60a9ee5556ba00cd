"""The `sdxl` command: one sub-command per stage, plus `run`, `demo` and the `bench` group."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from shared.core.command import config_option, stage_command, user_errors
from stages import bench, bucket, encode, export, generate, ingest, pipeline, train

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="sdxl stages: a staged, offline pipeline for fine-tuning Stable Diffusion XL.")
app.command("ingest")(stage_command(ingest.Config, "ingest", ingest.run, ingest.__doc__ or "", pipeline.TABLES))
app.command("bucket")(stage_command(bucket.Config, "bucket", bucket.run, bucket.__doc__ or "", pipeline.TABLES))
app.command("encode")(stage_command(encode.Config, "encode", encode.run, encode.__doc__ or "", pipeline.TABLES))
app.command("train")(stage_command(train.Config, "train", train.run, train.__doc__ or "", pipeline.TABLES))
app.command("export")(stage_command(export.Config, "export", export.run, export.__doc__ or "", pipeline.TABLES))
app.command("compare")(export.compare_command)
app.command("generate")(stage_command(generate.Config, "generate", generate.run, generate.__doc__ or "",
                                      pipeline.TABLES))
app.add_typer(bench.app, name="bench")


@app.command("run")
def run_command(config: Optional[Path] = config_option(),
                force: bool = typer.Option(False, "--force", help="Rerun every stage, even up-to-date ones.")) -> None:
    """Run every stage in order from pipeline.toml, skipping stages whose output is up to date."""
    with user_errors():
        pipeline.run_all(config, force=force)


@app.command("demo")
def demo_command(workdir: Path = typer.Option(Path("demo"), help="Folder for the synthetic data and outputs."),
                 images: int = typer.Option(64, min=8, help="Number of synthetic images."),
                 seed: int = typer.Option(0, min=0, help="Seed of the synthetic dataset."),
                 steps: int = typer.Option(200, min=1, help="LoRA training steps."),
                 force: bool = typer.Option(False, "--force", help="Rerun every stage.")) -> None:
    """Synthetic captioned images through the whole pipeline on the built-in tiny model."""
    with user_errors():
        pipeline.demo(workdir, images, seed, force=force, steps=steps)


def main() -> None:
    # bitsandbytes logs advice on import (peft imports it) about optional CPU kernels; not the user's concern
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    app()


if __name__ == "__main__":
    main()
