#!/bin/bash
# Download, on a machine that reaches PyPI, the wheels examples/gpu_check.sh installs on a GPU
# machine that reaches no package index: megatron-core (the tested version, CPython 3.12,
# manylinux x86_64) and Liger-Kernel (pure Python; its fused linear cross-entropy is the
# reference for ours). Their own needs (torch, numpy, packaging, triton) are on a CUDA PyTorch
# machine already, so they are not fetched (--no-deps). Transformer Engine is not fetched: its
# PyTorch extension is built against the local torch and CUDA at install time.
#
#   bash examples/fetch_gpu_wheels.sh            # into wheels/ (gpu_check.sh's default WHEELS)
#   WHEELS=dir PYTHON=python3 bash examples/fetch_gpu_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PYTHON=${PYTHON:-python3}
MEGATRON_CORE=${MEGATRON_CORE:-megatron-core==0.19.2}
LIGER_KERNEL=${LIGER_KERNEL:-liger-kernel}
"$PYTHON" -m pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
  --no-deps -d "$WHEELS" "$MEGATRON_CORE" "$LIGER_KERNEL"
ls -l "$WHEELS"
