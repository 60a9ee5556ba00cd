"""`sdxl bench`: measurements, not tests. Each sub-command prints a table and appends it to BENCHMARKS.md
(`--report`) with the date, the machine, the library versions and the full command line.

\b
    sdxl bench loader --samples 1000 --samples 10000       our shards (tar, zarr) vs kohya's per-file .npz
    sdxl bench loader --latency-ms 20                      the same over a localhost server adding 20 ms/request
    sdxl bench train-overhead                              the train stage vs a bare torch loop
    sdxl bench encode                                      images/s per decoder, the whole stage, the VAE alone
    sdxl bench ingest                                      header probe vs full decode
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import typer

from shared.core.command import user_errors
from stages.bench import report as R

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, help=__doc__)


def _report_options(report: Path, append: bool) -> Path | None:
    """Where the table goes: --report, or nowhere with --no-append."""
    return report if append else None


REPORT = typer.Option(R.DEFAULT, "--report", help="The Markdown file the table is appended to.")
APPEND = typer.Option(True, "--append/--no-append", help="Append the table to --report (else only print it).")
KEEP = typer.Option(None, "--dir", help="Keep the generated data in this folder and reuse it on the next run "
                                        "[default: a temporary folder, removed afterwards].")


@contextlib.contextmanager
def workspace(folder: Path | None, prefix: str) -> Iterator[Path]:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
        return
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _command(ctx: typer.Context) -> str:
    flags = {p.name: (p.opts[0], (p.secondary_opts or [None])[0], (p.nargs or 1) > 1) for p in ctx.command.params}
    return R.command_line(f"sdxl bench {ctx.info_name}", ctx.params, flags)


@app.command("loader")
def loader_command(
        ctx: typer.Context,
        samples: list[int] = typer.Option([1000], "--samples", min=1, help="Sample counts to measure (repeatable)."),
        latency_ms: float = typer.Option(0.0, min=0, max=10000, help="Serve everything from a localhost HTTP server "
                                         "that adds this many ms to each request (0: read local files)."),
        batch_size: int = typer.Option(4, min=1, help="Samples per training-ready batch."),
        workers: int = typer.Option(0, min=0, help="DataLoader workers of the per-file path; 0: kohya's "
                                                   "min(8, CPU count)."),
        side: int = typer.Option(1024, min=8, max=4096, help="Image side (latents are side/8 square; SDXL: 1024)."),
        text_widths: tuple[int, int] = typer.Option((768, 1280), help="The two text encoders' widths (SDXL: 768 "
                                                    "1280; the pooled vector is the second's)."),
        shard_samples: int = typer.Option(256, min=1, help="Samples per shard (encode's default: 256)."),
        source: list[str] = typer.Option(["wds", "zarr"], "--source", help="Our formats to read (repeatable)."),
        repeat: int = typer.Option(3, min=1, max=20, help="Runs per path, interleaved; the best is reported."),
        folder: Optional[Path] = KEEP, report: Path = REPORT, append: bool = APPEND) -> None:
    """Samples/s of training-ready batches: our shards through train's reader vs the per-file .npz cache."""
    from stages.bench import loader_run
    from stages.bench.loader_data import Shapes

    with user_errors(), workspace(folder, "bench-loader-") as root:
        shapes = Shapes(side=side, te_dims=tuple(text_widths), pooled=text_widths[1])
        rows, notes = loader_run.measure(root, tuple(samples), latency_ms, batch_size, workers, shapes,
                                         shard_samples, tuple(source), repeat)
        title = "loader" + (f", {latency_ms:g} ms per request over localhost HTTP" if latency_ms else ", local files")
        R.publish(title, loader_run.HEADERS, rows, _command(ctx), _report_options(report, append), notes)


@app.command("train-overhead")
def train_overhead_command(ctx: typer.Context,
                           images: int = typer.Option(64, min=8, help="Synthetic images (demo data)."),
                           steps: int = typer.Option(60, min=10, help="Optimizer steps timed."),
                           batch: int = typer.Option(8, min=1, help="Batch size."),
                           folder: Optional[Path] = KEEP, report: Path = REPORT, append: bool = APPEND) -> None:
    """The train stage's seconds per step against a bare torch loop on builtin:tiny (goal: ratio <= 1.10)."""
    from stages.bench import train_overhead

    with user_errors(), workspace(folder, "bench-train-") as root:
        rows = train_overhead.measure(root, images, steps, batch)
        R.publish("train: loop overhead vs a bare torch loop", train_overhead.HEADERS, rows, _command(ctx),
                  _report_options(report, append))


@app.command("encode")
def encode_command(ctx: typer.Context,
                   images: int = typer.Option(300, min=1, help="Generated images."),
                   side: int = typer.Option(1024, min=16, help="Their long side."),
                   area: int = typer.Option(512, min=64, help="Bucket area side: max_area = area x area."),
                   workers: int = typer.Option(2, min=0, help="Decode workers."),
                   batch: int = typer.Option(8, min=1, help="Encode batch size."),
                   model: str = typer.Option("builtin:tiny", help="The model whose VAE and text encoders run."),
                   folder: Optional[Path] = KEEP, report: Path = REPORT, append: bool = APPEND) -> None:
    """Encode's images/s per decoder (decode alone, the whole stage) and the VAE alone."""
    from stages.bench import encode_speed

    with user_errors(), workspace(folder, "bench-encode-") as root:
        rows = encode_speed.measure(root, images, side, area, workers, batch, model)
        R.publish("encode: decoders, the stage, the VAE alone", encode_speed.HEADERS, rows, _command(ctx),
                  _report_options(report, append))


@app.command("ingest")
def ingest_command(ctx: typer.Context,
                   images: int = typer.Option(2000, min=1, help="Generated images."),
                   side: int = typer.Option(1024, min=16, help="Their long side."),
                   workers: int = typer.Option(2, min=1, help="Ingest workers."),
                   mode: list[str] = typer.Option(["header", "verify"], "--mode", help="header and/or verify."),
                   min_side: int = typer.Option(64, min=1, help="Ingest's min_side."),
                   folder: Optional[Path] = KEEP, report: Path = REPORT, append: bool = APPEND) -> None:
    """Ingest's images/s probing headers vs decoding every image (--verify)."""
    from stages.bench import ingest_speed

    with user_errors(), workspace(folder, "bench-ingest-") as root:
        rows = ingest_speed.measure(root, images, side, workers, tuple(mode), min_side)
        R.publish("ingest: header probing vs --verify", ingest_speed.HEADERS, rows, _command(ctx),
                  _report_options(report, append))
