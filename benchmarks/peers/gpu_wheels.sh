#!/usr/bin/env bash
# Wheels of sparsify (eai-sparsify) and of what it needs beyond a GPU machine's PyTorch image, for a machine
# that cannot reach PyPI: run this where pip works, carry the folder, then there
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site "$DIR"/*.whl && export PYTHONPATH=/tmp/site
# The versions are those of the CPU peer venv (setup_venv.sh); torch, transformers, accelerate, einops,
# safetensors, huggingface-hub, pyarrow, pandas and xxhash are expected on the machine already.
# Usage: bash benchmarks/peers/gpu_wheels.sh [DIR] [PYTHON_VERSION]     (defaults: .whl, 3.12)
set -euo pipefail
dir="${1:-.whl}"
py="${2:-3.12}"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
    -d "$dir" eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort==8.4.0 \
    schedulefree==1.4.1 simple-parsing==0.1.9 docstring-parser==0.18.0
ls -l "$dir"
