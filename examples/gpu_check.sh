#!/bin/bash
# GPU checks on one H100/H200 in at most 8 minutes (a deadline: a check that would not finish
# in the time left is SKIPPED, and said so). Each check prints PASSED, FAILED or SKIPPED with
# the reason; the output of each goes to $OUT/NAME.txt, the verdicts to $OUT/summary.txt.
#   setup        installs the wheels carried in $WHEELS (examples/fetch_gpu_wheels.sh downloads
#                megatron-core's and Liger-Kernel's on a machine with PyPI), builds the C++ packer
#   parity       the loss's CUDA parity tests (tests/test_loss_cuda.py)
#   gpt1b        NTP and PRIOR training steps of a ~1B Llama-shaped GPT in bf16 (16 layers, hidden
#                2048, 32 heads, FFN 8192, RMSNorm, RoPE, untied embeddings; the trainer's MLP is
#                GELU, not SwiGLU): tokens/s, MFU and the PRIOR/NTP step-time ratio (<= 1.02)
#   losses       weighted CE against megatron-core's CE, and the fused linear weighted CE against
#                the output layer + CE and Liger-Kernel's fused linear CE: 8k tokens x 128k vocab
#                (hidden 4096), bf16, time and peak memory
#   fp8          the same GPT with --fp8-format hybrid vs bf16 (needs Transformer Engine)
#   distopt      peak memory with and without --use-distributed-optimizer (one GPU is one
#                data-parallel rank: nothing to shard, so this checks that it runs; the saving
#                needs DP > 1)
#   lvlm         PRIOR/NTP step time of the U-LVLM and H-LVLM (small) on CUDA
#
#   bash examples/gpu_check.sh            # on the GPU machine, from anywhere
#   DRY_RUN=1 bash examples/gpu_check.sh  # print the commands (assuming every package imports), run none
#   WHEELS=dir PYTHON=python3 OUT=dir BUDGET_S=480 bash examples/gpu_check.sh
set -uo pipefail  # not -e: a failing check is reported and the next one runs
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-wheels}
PYTHON=${PYTHON:-python3}
OUT=${OUT:-gpu_check_output}
BUDGET_S=${BUDGET_S:-480}
DRY_RUN=${DRY_RUN:-0}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
LLAMA_1B="--num-layers 16 --hidden-size 2048 --num-attention-heads 32 --ffn-hidden-size 8192"
LLAMA_1B+=" --normalization RMSNorm --position-embedding-type rope --untie-embeddings-and-output-weights"
GPT1B=(benchmarks/bench_train.py --archs gpt --model-size 1.3b --seq-length 2048 --micro-batch-size 2 --bf16)
START=$SECONDS
if [[ "$DRY_RUN" != 1 ]]; then
  mkdir -p "$OUT"
  : >"$OUT/summary.txt"
fi

say() {  # LINE: to the terminal and (unless a dry run) the summary
  if [[ "$DRY_RUN" == 1 ]]; then echo "$1"; else echo "$1" | tee -a "$OUT/summary.txt"; fi
}

verdict() {  # NAME VERDICT [REASON]
  say "$1: $2${3:+ ($3)}"
}

# check NAME SECONDS CMD...: runs CMD (output to the terminal and $OUT/NAME.txt) under a
# timeout of SECONDS, or skips it when less than that is left of the budget.
check() {
  local name=$1 seconds=$2
  shift 2
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
    return 0
  fi
  local left=$((BUDGET_S - (SECONDS - START)))
  if ((left < seconds)); then
    verdict "$name" SKIPPED "needs up to ${seconds} s, ${left} s left of the ${BUDGET_S} s budget"
    return 1
  fi
  echo "== $name (up to ${seconds} s)"
  local began=$SECONDS
  timeout "$seconds" "$@" 2>&1 | tee "$OUT/$name.txt"
  local rc=${PIPESTATUS[0]}
  if ((rc == 0)); then
    verdict "$name" PASSED "$((SECONDS - began)) s"
  elif ((rc == 124)); then
    verdict "$name" FAILED "timed out after ${seconds} s"
  else
    verdict "$name" FAILED "exit $rc after $((SECONDS - began)) s"
  fi
  return "$rc"
}

importable() {  # MODULE: 0 when $PYTHON imports it (always, in a dry run)
  [[ "$DRY_RUN" == 1 ]] || "$PYTHON" -c "import $1" >/dev/null 2>&1
}

if [[ "$DRY_RUN" != 1 ]]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt" || {
    echo "no NVIDIA GPU here (nvidia-smi failed): run this on the GPU machine, or DRY_RUN=1" >&2
    exit 1
  }
fi

# --- setup ---------------------------------------------------------------------------------
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
  # No index: the GPU machine may reach none; the wheels' own needs must already be there.
  check wheels 120 "$PYTHON" -m pip install --no-index --find-links "$WHEELS" "${wheels[@]}"
else
  verdict wheels SKIPPED "no $WHEELS/*.whl: using what $PYTHON has installed"
fi
check packer 120 "$PYTHON" setup.py build_ext --inplace
for module in megatron.core transformer_engine.pytorch liger_kernel; do
  if importable "$module"; then say "$module: importable"; else say "$module: not importable"; fi
done
if ! importable megatron.core; then
  for name in parity gpt1b losses fp8 distopt lvlm; do
    verdict "$name" SKIPPED "megatron-core does not import: carry its wheel in $WHEELS/ (examples/fetch_gpu_wheels.sh)"
  done
  exit 1
fi

# --- checks, most important first ------------------------------------------------------------
check parity 150 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_loss_cuda.py

check gpt1b 240 "$PYTHON" "${GPT1B[@]}" --steps 5 --blocks 3 --train-args="$LLAMA_1B"

loss_variants=(a b d e)
if importable liger_kernel; then
  loss_variants+=(f)
else
  verdict losses-liger SKIPPED \
    "liger_kernel does not import: carry its wheel in $WHEELS/ (examples/fetch_gpu_wheels.sh)"
fi
check losses 180 "$PYTHON" benchmarks/bench_loss.py --tokens 8192 --vocab-sizes 131072 --hidden-size 4096 \
  --tensor-model-parallel-sizes 1 --dtypes bf16 --fused-dtypes bf16 --iters 3 --variants "${loss_variants[@]}"

if importable transformer_engine.pytorch; then
  # NTP only; its ms/step against gpt1b's NTP column is the FP8 speed-up (target >= 1.3x).
  check fp8 180 "$PYTHON" "${GPT1B[@]}" --losses ntp --steps 5 --blocks 3 \
    --train-args="$LLAMA_1B --fp8-format hybrid"
else
  verdict fp8 SKIPPED "transformer_engine does not import here: FP8 runs through Transformer Engine"
fi

if "$PYTHON" -m megatron_prior.train --help 2>/dev/null | grep -q -- --use-distributed-optimizer; then
  check distopt-off 120 "$PYTHON" "${GPT1B[@]}" --losses ntp --steps 2 --blocks 1 --train-args="$LLAMA_1B" &&
    check distopt-on 120 "$PYTHON" "${GPT1B[@]}" --losses ntp --steps 2 --blocks 1 \
      --train-args="$LLAMA_1B --use-distributed-optimizer"
else
  verdict distopt SKIPPED "the trainer has no --use-distributed-optimizer flag"
fi

check lvlm 120 "$PYTHON" benchmarks/bench_train.py --archs ulvlm,hlvlm --model-size small --seq-length 256 \
  --micro-batch-size 16 --steps 5 --blocks 3 --bf16

if [[ "$DRY_RUN" != 1 ]]; then
  echo "== summary ($((SECONDS - START)) s; outputs in $OUT/)"
  cat "$OUT/summary.txt"
  ! grep -q FAILED "$OUT/summary.txt"
fi
