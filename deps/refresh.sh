#!/usr/bin/env bash
# Refreshes deps/lock.txt, the tested dependency set: every direct and transitive version that
# `pip install -e ".[all]"` needs on CPU Python 3.10-3.12, resolved once for all three (uv's
# universal resolution: per-version pins carry environment markers).
#   bash deps/refresh.sh
# A refresh lands only with a green CI run on it (CI installs with this file).
# torch is pinned exactly in pyproject.toml (CPU wheel), so its line and the CUDA runtime
# packages only PyPI's CUDA build of torch needs are left out of the lock.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "uv==0.13.9"
cuda_only=(torch triton cuda-bindings cuda-pathfinder cuda-toolkit
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
    nvidia-cusparselt-cu13 nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx)
python -m uv pip compile pyproject.toml --extra all --universal --python-version 3.10 \
    --custom-compile-command "bash deps/refresh.sh" \
    "${cuda_only[@]/#/--no-emit-package=}" --quiet -o deps/lock.txt "$@"
