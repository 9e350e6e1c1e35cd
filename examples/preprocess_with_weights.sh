#!/bin/bash
# Tokenize image-caption data and score it with the reference LM on a SLURM cluster: every GPU of
# every node is a rank of tools/preprocess_with_weights.py, each scoring its share of the input;
# the result is one dataset, the bytes a single process would write. The output folder must be
# on a file system every node sees (rank 0 merges the ranks' datasets from $OUTPUT_PREFIX.ranks/).
#
#   bash examples/preprocess_with_weights.sh                # submits itself: logs in $LOG_DIR (default logs/)
#   NNODES=4 bash examples/preprocess_with_weights.sh -N 4  # sbatch options after the script
#   DRY_RUN=1 bash examples/preprocess_with_weights.sh      # print the commands, run nothing
#
# INPUT is anything the tool reads (--input-format auto): LLaVA-Pretrain's JSON (the default),
# a COCO captions JSON, webdataset shards ('/data/shards/{00000..00999}.tar') or JSONL.
# Submission, containers (CONTAINER_IMAGE, CONTAINER_MOUNTS) and launch as in
# examples/pretrain_lvlm_prior.sh (examples/lib/slurm_launch.sh).
#SBATCH --job-name=prior-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=12:00:00
#SBATCH --exclusive
#SBATCH --output=%x-%j.out
set -euo pipefail

# sbatch runs a copy of this script from its spool directory: find the repo from the submit dir.
REPO=${REPO:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}}
source "$REPO/examples/lib/slurm_launch.sh"
submit_unless_in_job "$@"
INPUT=${INPUT:-/data/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_ROOT=${IMAGE_ROOT-/data/LLaVA-Pretrain/images}   # relative image paths start here; IMAGE_ROOT= for shards
TOKENIZER_MODEL=${TOKENIZER_MODEL:-/data/captions/tokenizer.model}
REFERENCE_LOAD=${REFERENCE_LOAD:-/checkpoints/reference-lm}
OUTPUT_PREFIX=${OUTPUT_PREFIX:-/data/llava/train}
IMAGE_SIZE=${IMAGE_SIZE:-336}
IMAGE_ASPECT=${IMAGE_ASPECT:-pad}
WORKERS=${WORKERS:-6}                        # processes per GPU rank: parsing, tokenizing, reading images
ARGS=(
  --input "$INPUT" --json-keys caption --tokenizer-model "$TOKENIZER_MODEL" --append-eod
  --output-prefix "$OUTPUT_PREFIX" --reference-type gpt --reference-load "$REFERENCE_LOAD"
  --image-size "$IMAGE_SIZE" --image-aspect "$IMAGE_ASPECT" --workers "$WORKERS" --skip-bad-records
)
[[ -z "$IMAGE_ROOT" ]] || ARGS+=(--image-root "$IMAGE_ROOT")

# Mounted in the container (CONTAINER_IMAGE) at their own paths, unless CONTAINER_MOUNTS is set.
MOUNT_DIRS=("$REPO" "$(dirname "$INPUT")" "$(dirname "$TOKENIZER_MODEL")" "$REFERENCE_LOAD"
            "$(dirname "$OUTPUT_PREFIX")")
[[ -z "$IMAGE_ROOT" ]] || MOUNT_DIRS+=("$IMAGE_ROOT")

[[ "${DRY_RUN:-0}" == 1 ]] || mkdir -p "$(dirname "$OUTPUT_PREFIX")"
launch_preprocessing "${ARGS[@]}"
