#!/bin/bash
# The same training as the SLURM launchers, on this machine's CPU: torchrun, 2 gloo processes.
#
#   bash examples/run_local.sh                        # U-LVLM, PRIOR, TP=2, on a small generated corpus
#   MODEL=hlvlm LOSS=ntp TP=1 PP=2 bash examples/run_local.sh
#   DATA_PATH=demo_output/data/train_caption_document TOKENIZER_MODEL=demo_output/data/tokenizer.model \
#     bash examples/run_local.sh
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-$REPO/.venv/bin/python}
WORK=${WORK:-$REPO/local_run}
MODEL=${MODEL:-ulvlm}
LOSS=${LOSS:-prior}
NPROC=${NPROC:-2}
TP=${TP:-2}
PP=${PP:-1}
TRAIN_ITERS=${TRAIN_ITERS:-50}
DATA_PATH=${DATA_PATH:-}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-}

if [[ -z "$DATA_PATH" ]]; then
  if [[ ! -f "$WORK/corpus/data/train_caption_document.idx" ]]; then
    echo "making a small caption corpus in $WORK/corpus (generator -> tokenizer -> preprocessing)"
    mkdir -p "$WORK/corpus"
    "$PYTHON" -c "from megatron_prior.testing import make_caption_corpus as m; m('$WORK/corpus', num_train=1000)"
  fi
  DATA_PATH=$WORK/corpus/data/train_caption_document
  TOKENIZER_MODEL=$WORK/corpus/tok.model
fi

"$PYTHON" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m megatron_prior.train \
  --model "$MODEL" --model-size tiny --patch-size 4 --seq-length 40 \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" \
  --micro-batch-size 4 --global-batch-size 16 --train-iters "$TRAIN_ITERS" \
  --lr 1e-3 --min-lr 1e-4 --lr-warmup-iters 5 --loss "$LOSS" \
  --adam-beta2 0.95 --hidden-dropout 0.0 --attention-dropout 0.0 --eod-mask-loss \
  --data-path "$DATA_PATH" --tokenizer-model "$TOKENIZER_MODEL" --split 95,5,0 \
  --eval-interval 25 --eval-iters 2 --log-interval 5 \
  --save "$WORK/checkpoints/$MODEL-$LOSS" --load "$WORK/checkpoints/$MODEL-$LOSS" --save-interval 25
