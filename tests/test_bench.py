"""`sdxl bench`: a smoke test per sub-command on tiny inputs (each runs, prints its table, and appends it with
date, machine, versions and command to the report file, here a temporary copy of BENCHMARKS.md). Not timed:
the figures themselves are in BENCHMARKS.md."""
import shutil
from pathlib import Path

import pytest

from stages.bench import report
from stages.cli import app

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def benchmarks(tmp_path) -> Path:
    copy = tmp_path / "BENCHMARKS.md"
    shutil.copy(ROOT / "BENCHMARKS.md", copy)
    return copy


def run_bench(runner, benchmarks: Path, *args: str) -> str:
    before = benchmarks.read_text()
    result = runner.invoke(app, ["bench", *args, "--report", str(benchmarks)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    after = benchmarks.read_text()
    assert after.startswith(before)  # appended, nothing rewritten
    added = after[len(before):]
    assert "Machine: " in added and "torch " in added and f"sdxl bench {args[0]}" in added, added
    assert added.count("\n| ") >= 2 and "| --- |" in added
    return added


def test_loader_local_and_over_http(runner, benchmarks, tmp_path):
    tiny = ["--samples", "24", "--side", "32", "--text-widths", "8", "24", "--shard-samples", "8",
            "--batch-size", "2", "--workers", "1", "--repeat", "1", "--dir", str(tmp_path / "data")]
    added = run_bench(runner, benchmarks, "loader", *tiny)
    assert "--text-widths 8 24" in added and f"--dir {tmp_path / 'data'}" in added and "--append" in added
    assert "| 24 | wds | local |" in added and "| 24 | zarr | local |" in added and "per-file .npz" in added
    assert "| 24 | wds, epoch 2 | local |" in added and "| 24 | zarr, epoch 2 | local |" in added
    added = run_bench(runner, benchmarks, "loader", *tiny, "--latency-ms", "5")  # the data is reused
    assert "wds by URL | HTTP +5 ms" in added and "zarr by URL" in added


def test_ingest(runner, benchmarks):
    added = run_bench(runner, benchmarks, "ingest", "--images", "6", "--side", "64", "--workers", "1",
                      "--min-side", "16")
    assert "| header | 1 | 6 | 6 |" in added and "| verify |" in added


def test_encode(runner, benchmarks):
    added = run_bench(runner, benchmarks, "encode", "--images", "4", "--side", "128", "--area", "64",
                      "--workers", "0", "--batch", "2")
    assert "| decode only | pil |" in added and "| encode stage" in added and "VAE alone" in added


@pytest.mark.slow
def test_train_overhead(runner, benchmarks):
    added = run_bench(runner, benchmarks, "train-overhead", "--images", "8", "--steps", "10", "--batch", "2")
    assert "| 10 | 2 |" in added


def test_table_and_command_line():
    assert report.table(["a", "b"], [(1, 2.345), ("x", 12345.6)]) == \
        "| a | b |\n| --- | --- |\n| 1 | 2.35 |\n| x | 12,346 |"
    flags = {"append": ("--append", "--no-append", False), "widths": ("--text-widths", None, True),
             "folder": ("--dir", None, False)}
    params = {"samples": [1, 2], "append": False, "folder": "/d", "widths": (8, 24), "latency_ms": 20.0}
    assert report.command_line("sdxl bench loader", params, flags) == \
        "sdxl bench loader --samples 1 --samples 2 --no-append --dir /d --text-widths 8 24 --latency-ms 20.0"


def test_a_bad_option_is_one_line(runner, tmp_path):
    result = runner.invoke(app, ["bench", "loader", "--source", "parquet", "--samples", "2", "--side", "16",
                                 "--text-widths", "4", "4", "--dir", str(tmp_path), "--no-append"])
    assert result.exit_code == 2 and "--source parquet" in result.output
