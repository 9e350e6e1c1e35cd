#!/bin/bash
# GPU checks for one H100/H200 (Python 3.12, CUDA torch, no megatron-core, no TE), <= 8 minutes:
#   1. installs megatron-core and our runtime deps from wheels carried in $WHEELS (no network there),
#      builds the C++ packer;
#   2. runs the loss's CUDA parity tests (tests/test_loss_cuda.py);
#   3. times NTP vs PRIOR training of a ~125M-parameter GPT (and the LVLMs) in bf16: tokens/s, MFU;
#   4. runs the loss benchmark on the GPU.
# Prepare the wheels on a machine with PyPI access:
#   pip download --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#     --no-deps -d wheels megatron-core==0.16.1 sentencepiece psutil pybind11 einops
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_output}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"

$PYTHON -m pip install --no-index --find-links "$WHEELS" megatron-core sentencepiece psutil pybind11 einops pytest \
  2>&1 | tail -1
$PYTHON setup.py build_ext --inplace 2>&1 | tail -1
export PYTHONPATH=$PWD CUDA_DEVICE_MAX_CONNECTIONS=1

echo "== loss parity on CUDA"
timeout 120 $PYTHON -m pytest -q tests/test_loss_cuda.py 2>&1 | tail -3 | tee "$OUT/loss_parity.txt"

echo "== training throughput, NTP vs PRIOR (bf16)"
timeout 240 $PYTHON benchmarks/bench_train.py --archs gpt --model-size 125m --seq-length 1024 \
  --micro-batch-size 8 --steps 5 --blocks 3 --bf16 2>&1 | tail -4 | tee "$OUT/train_gpt125m.txt"
timeout 120 $PYTHON benchmarks/bench_train.py --archs ulvlm,hlvlm --model-size small --seq-length 256 \
  --micro-batch-size 16 --steps 5 --blocks 3 --bf16 2>&1 | tail -4 | tee "$OUT/train_lvlm.txt"

echo "== loss benchmark"
timeout 120 $PYTHON benchmarks/bench_loss.py --tensor-model-parallel-sizes 1 2>&1 | tail -20 | tee "$OUT/bench_loss.txt"
