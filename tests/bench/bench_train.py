"""Kept for old command lines: the benchmark lives in stages/bench now; this runs `sdxl bench train-overhead` with the
same options (figures are printed and appended to BENCHMARKS.md; --no-append prints only).

    .venv/bin/python tests/bench/bench_train.py --help
"""
import sys

from stages.cli import app

if __name__ == "__main__":
    app(["bench", "train-overhead", *sys.argv[1:]])
