#!/usr/bin/env bash
# Download, here (where pip reaches the registry), the wheels that the GPU machine lacks into .wheels/ (git-
# ignored), for its Python (3.12) on linux x86_64: it has torch 2.11, transformers, peft, accelerate,
# safetensors, huggingface-hub, numpy, pillow, pyyaml, typer, tqdm, tensorboard, but not diffusers, zarr,
# webdataset or the optional optimizers. The versions are those installed in this checkout's .venv (what the
# tests ran with), else the newest. gpu_suite.sh installs them there; carry the folder: carry [".wheels"].
#
#     bash tests/bench/prepare_gpu_wheels.sh            # PYVER=3.12 DEST=.wheels PYTHON=.venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/../.."
PYVER=${PYVER:-3.12}
DEST=${DEST:-.wheels}
PYTHON=${PYTHON:-.venv/bin/python}
LIMIT_MIB=${LIMIT_MIB:-60}   # the working tree and the carried folders travel within 64 MiB together
PACKAGES=(diffusers importlib_metadata webdataset braceexpand zarr numcodecs donfig google-crc32c
          bitsandbytes prodigyopt schedulefree)

pinned=()
for name in "${PACKAGES[@]}"; do
  version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
  pinned+=("$name${version:+==$version}")
done
rm -rf "$DEST"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
         manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
  "${platforms[@]}" -d "$DEST" "${pinned[@]}"
ls -l "$DEST"
total=$(du -sm "$DEST" | cut -f1)
echo "$DEST: ${total} MiB for ${pinned[*]}"
if [ "$total" -gt "$LIMIT_MIB" ]; then
  echo "error: $DEST is ${total} MiB, over ${LIMIT_MIB} MiB: the working tree travels within 64 MiB" >&2
  exit 1
fi
