#!/usr/bin/env bash
# bench/gpu_wheels.sh [DIR]   (default DIR: .whl, ignored by git)
# Downloads the wheels that bench/gpu_check.py needs on a GPU machine whose image already holds torch (CUDA),
# numpy, safetensors, tokenizers, accelerate, rich, torchmetrics, nvidia-ml-py and tensorboard, but not
# codetune's pinned versions of the rest. --no-deps: each wheel is named here, so nothing else is pulled in;
# they are for CPython 3.12 on x86-64 Linux (the device image), whatever this machine runs.
# On the GPU machine, from the repository root:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_check.py --out gpu_check.json
set -euo pipefail

DIR="${1:-.whl}"
PYTHON="${PYTHON:-python3}"
WHEELS=(
    bitsandbytes==0.50.2
    transformers==5.24.0
    peft==0.21.2
    lightning==2.6.6
    jsonargparse==4.53.0
    docstring-parser==0.18.0    # jsonargparse[signatures]: --help text from the docstrings
    typeshed-client==2.15.0     # jsonargparse[signatures]: resolving stub types
    tree-sitter==0.26.1
    tree-sitter-rust==0.24.2
    tree-sitter-python==0.25.0
    pathspec==1.1.1
)
# pip matches a manylinux tag exactly, so list the ones these packages publish.
PLATFORMS=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64
           manylinux2014_x86_64 manylinux1_x86_64)

mkdir -p "$DIR"
"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]/#/--platform=}" -d "$DIR" "${WHEELS[@]}"
du -ch "$DIR"/*.whl | tail -1
