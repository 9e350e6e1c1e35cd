#!/bin/bash
# Pre-train a vision-language model with PRIOR (or NTP) on a SLURM cluster.
#
#   sbatch examples/pretrain_lvlm_prior.sh                 # defaults below
#   MODEL=ulvlm LOSS=ntp NNODES=4 sbatch -N 4 examples/pretrain_lvlm_prior.sh
#   DRY_RUN=1 bash examples/pretrain_lvlm_prior.sh          # print the commands, run nothing
#
# One SLURM task per node; each task runs torchrun with one process per GPU, the rendezvous
# taken from SLURM's variables. Every path and size is an environment variable.
#SBATCH --job-name=prior-lvlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repo from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO/examples/lib/slurm_launch.sh"
MODEL=${MODEL:-hlvlm}                      # hlvlm | ulvlm
LOSS=${LOSS:-prior}                        # prior | ntp
PRIOR_ALPHA=${PRIOR_ALPHA:-1.0}
MODEL_SIZE=${MODEL_SIZE:-1.3b}
DATA_PATH=${DATA_PATH:-/data/captions/train_caption_document}
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/data/captions/tokenizer.model}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-/checkpoints/${MODEL}-${LOSS}}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${CHECKPOINT_DIR}/tensorboard}
VIT_LOAD=${VIT_LOAD:-}                     # hlvlm: pre-trained vision encoder checkpoint
TP=${TP:-2}
PP=${PP:-1}
MICRO_BATCH_SIZE=${MICRO_BATCH_SIZE:-8}
GLOBAL_BATCH_SIZE=${GLOBAL_BATCH_SIZE:-256}
SEQ_LENGTH=${SEQ_LENGTH:-256}
TRAIN_ITERS=${TRAIN_ITERS:-20000}
LR=${LR:-3e-4}
MIN_LR=${MIN_LR:-3e-5}
WARMUP_ITERS=${WARMUP_ITERS:-500}
NUM_WORKERS=${NUM_WORKERS:-2}                # DataLoader processes per GPU rank (reading, packing)
PRECISION=${PRECISION:---bf16}             # add "--fp8-format hybrid" on Hopper with TE
TRAIN_ARGS=(
  --model "$MODEL" --model-size "$MODEL_SIZE"
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP"
  --micro-batch-size "$MICRO_BATCH_SIZE" --global-batch-size "$GLOBAL_BATCH_SIZE"
  --seq-length "$SEQ_LENGTH" --train-iters "$TRAIN_ITERS"
  --lr "$LR" --min-lr "$MIN_LR" --lr-decay-style cosine --lr-warmup-iters "$WARMUP_ITERS"
  --weight-decay 0.1 --clip-grad 1.0 $PRECISION
  --loss "$LOSS" --prior-alpha "$PRIOR_ALPHA"
  --data-path $DATA_PATH --split 990,10,0 --tokenizer-model "$TOKENIZER_MODEL" --num-workers "$NUM_WORKERS"
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
  --eval-interval 1000 --eval-iters 20 --log-interval 10
  --tensorboard-dir "$TENSORBOARD_DIR"
)
if [[ "$MODEL" == hlvlm && -n "$VIT_LOAD" ]]; then
  TRAIN_ARGS+=(--vit-load "$VIT_LOAD" --freeze-vit)
fi

[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$CHECKPOINT_DIR"
launch_training "${TRAIN_ARGS[@]}"
