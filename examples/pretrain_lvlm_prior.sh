#!/bin/bash
# Pre-train a vision-language model with PRIOR (or NTP) on a SLURM cluster.
#
#   bash examples/pretrain_lvlm_prior.sh                   # submits itself: logs in $LOG_DIR (default logs/)
#   MODEL=ulvlm LOSS=ntp bash examples/pretrain_lvlm_prior.sh -N 4 --partition=gpu   # sbatch options
#   CONTAINER_IMAGE=nvcr.io#myteam/megatron-prior:latest bash examples/pretrain_lvlm_prior.sh   # pyxis
#   DRY_RUN=1 bash examples/pretrain_lvlm_prior.sh          # print the commands, run nothing
#
# Run with bash outside a job, it makes the log directory and submits itself with sbatch (which
# does not create the directory of --output). A plain `sbatch examples/pretrain_lvlm_prior.sh`
# from the repository works too; its output then goes to the submit directory.
# One SLURM task per node; each task runs torchrun with one process per GPU, the rendezvous
# taken from SLURM's variables. Every path and size is an environment variable.
#SBATCH --job-name=prior-lvlm
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repo from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO/examples/lib/slurm_launch.sh"
submit_unless_in_job "$@"
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
  --adam-beta2 0.95 --hidden-dropout 0.0 --attention-dropout 0.0 --eod-mask-loss
  --loss "$LOSS" --prior-alpha "$PRIOR_ALPHA"
  --data-path $DATA_PATH --split 990,10,0 --tokenizer-model "$TOKENIZER_MODEL" --num-workers "$NUM_WORKERS"
  --save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --save-interval 1000
  --eval-interval 1000 --eval-iters 20 --log-interval 10
  --tensorboard-dir "$TENSORBOARD_DIR"
)
if [[ "$MODEL" == hlvlm && -n "$VIT_LOAD" ]]; then
  TRAIN_ARGS+=(--vit-load "$VIT_LOAD" --freeze-vit)
fi

# Mounted in the container (CONTAINER_IMAGE) at their own paths, unless CONTAINER_MOUNTS is set.
MOUNT_DIRS=("$REPO" "$(dirname "$TOKENIZER_MODEL")" "$CHECKPOINT_DIR" ${VIT_LOAD:+"$VIT_LOAD"})
for word in $DATA_PATH; do  # prefixes of a blend ('P' or 'W1 P1 W2 P2 ...')
  [[ "$word" =~ ^[0-9.eE+-]+$ ]] || MOUNT_DIRS+=("$(dirname "$word")")
done

[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$CHECKPOINT_DIR"
launch_training "${TRAIN_ARGS[@]}"
