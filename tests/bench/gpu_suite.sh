#!/usr/bin/env bash
# Every GPU check of the project in one run, under 9 minutes on one H100: the carried wheels installed, the tests
# marked gpu, then the training benchmark (gpu_suite.py: per memory preset, LoRA rank 32 and a full fine-tune on
# builtin:sdxl-random at 1024x1024 in bf16: samples/s, MFU, max allocated memory against the planner). The last
# table it prints goes into BENCHMARKS.md.
#
# Here:   bash tests/bench/prepare_gpu_wheels.sh        (once; fills the git-ignored .wheels/)
# There:  bash tests/bench/gpu_suite.sh [gpu_suite.py options]      with .wheels carried
set -uo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.wheels}
SITE=${SITE:-/tmp/sdxl-site}
export SDXL_PROGRESS=0 PYTHONUNBUFFERED=1 SDXL_CACHE=${SDXL_CACHE:-/tmp/sdxl-cache}

if compgen -G "$WHEELS/*.whl" > /dev/null; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "$WHEELS"/*.whl || { echo "error: installing the wheels of $WHEELS failed" >&2; exit 2; }
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "note: no wheels in $WHEELS (run tests/bench/prepare_gpu_wheels.sh here and carry the folder)" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

"$PYTHON" - <<'PY' || exit 2
import importlib, sys
import torch
missing = []
for name in ("diffusers", "transformers", "peft", "safetensors", "typer", "webdataset", "zarr"):
    try:
        importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - report every one that fails, then stop
        missing.append(f"{name} ({type(e).__name__}: {str(e)[:80]})")
if missing:
    sys.exit("error: cannot import " + "; ".join(missing))
if not torch.cuda.is_available():
    sys.exit("error: no CUDA device")
print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}, Python {sys.version.split()[0]}")
PY

status=0
timeout 150 "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider tests/test_optim.py tests/test_planner.py || status=$?
[ "$status" -eq 5 ] && status=0   # no test selected is no failure
timeout 380 "$PYTHON" tests/bench/gpu_suite.py --budget 330 "$@" || status=$?
exit "$status"
