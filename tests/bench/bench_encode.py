"""Kept for old command lines: the benchmark lives in stages/bench now; this runs `sdxl bench encode` with the
same options (figures are printed and appended to BENCHMARKS.md; --no-append prints only).

    .venv/bin/python tests/bench/bench_encode.py --help
"""
import sys

from stages.cli import app

if __name__ == "__main__":
    app(["bench", "encode", *sys.argv[1:]])
