"""Kept for old command lines: the benchmark lives in stages/bench now; this runs `sdxl bench ingest` with the
same options (figures are printed and appended to BENCHMARKS.md; --no-append prints only).

    .venv/bin/python tests/bench/bench_ingest.py --help
"""
import sys

from stages.cli import app

if __name__ == "__main__":
    app(["bench", "ingest", *sys.argv[1:]])
