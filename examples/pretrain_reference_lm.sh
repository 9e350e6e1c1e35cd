#!/bin/bash
# Pre-train PRIOR's text-only reference LM (a GPT) on the captions, on a SLURM cluster.
# Its checkpoint then scores the captions: tools/preprocess_with_weights.py --reference-type gpt
# --reference-load $CHECKPOINT_DIR.
#
#   bash examples/pretrain_reference_lm.sh                 # submits itself: logs in $LOG_DIR (default logs/)
#   bash examples/pretrain_reference_lm.sh --partition=gpu --time=2:00:00   # sbatch options
#   DRY_RUN=1 bash examples/pretrain_reference_lm.sh       # print the commands, run nothing
#
# Submission, containers (CONTAINER_IMAGE, CONTAINER_MOUNTS) and launch as in
# examples/pretrain_lvlm_prior.sh (examples/lib/slurm_launch.sh).
#SBATCH --job-name=prior-reference-lm
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=12:00:00
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repo from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO/examples/lib/slurm_launch.sh"
submit_unless_in_job "$@"
MODEL_SIZE=${MODEL_SIZE:-350m}
DATA_PATH=${DATA_PATH:-/data/captions/text_caption_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/data/captions/tokenizer.model}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-/checkpoints/reference-lm}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${CHECKPOINT_DIR}/tensorboard}
TP=${TP:-1}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-16}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
SEQ_LENGTH=${SEQ_LENGTH:-512}
TRAIN_ITERS=${TRAIN_ITERS:-10000}
LR=${LR:-6e-4}
MIN_LR=${MIN_LR:-6e-5}
WARMUP_ITERS=${WARMUP_ITERS:-200}
NUM_WORKERS=${NUM_WORKERS:-2}                # DataLoader processes per GPU rank (reading, packing)
PRECISION=${PRECISION:---bf16}
TRAIN_ARGS=(
  --model gpt --model-size "$MODEL_SIZE"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --seq-length "$SEQ_LENGTH" --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS"
  --weight-decay 0.1 --clip-grad 1.0 $PRECISION --loss ntp
  --adam-beta2 0.95 --hidden-dropout 0.0 --attention-dropout 0.0 --eod-mask-loss
  --data-path $DATA_PATH --split 990,10,0 --tokenizer-model "$TOKENIZER_MODEL" --num-workers "$NUM_WORKERS"
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
  --eval-interval 1000 --eval-iters 20 --log-interval 10
  --tensorboard-dir "$TENSORBOARD_DIR"
)

# Mounted in the container (CONTAINER_IMAGE) at their own paths, unless CONTAINER_MOUNTS is set.
MOUNT_DIRS=("$REPO" "$(dirname "$TOKENIZER_MODEL")" "$CHECKPOINT_DIR")
for word in $DATA_PATH; do  # prefixes of a blend ('P' or 'W1 P1 W2 P2 ...')
  [[ "$word" =~ ^[0-9.eE+-]+$ ]] || MOUNT_DIRS+=("$(dirname "$word")")
done

[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$CHECKPOINT_DIR"
launch_training "${TRAIN_ARGS[@]}"
