#!/usr/bin/env bash
# Fetch the wheels bench/gpu.sh needs beyond what the lent GPU machine has (it has PyTorch, numpy,
# safetensors, huggingface-hub, tqdm, Pillow, but not diffusers or pydantic) into .whl/, for
# Python 3.12 on x86-64, at the versions this project's environment runs. Run it here (it needs
# PyPI), then carry .whl to the GPU machine; bench/gpu.sh installs them from there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
for pkg in diffusers pydantic pydantic_core annotated_types typing_inspection importlib_metadata; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "$pkg==$(version "$pkg")"
done
ls -la .whl
