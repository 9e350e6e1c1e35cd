# Shared by the SLURM launchers: one srun task per node, each running torchrun with one
# process per GPU and the rendezvous taken from SLURM's variables.
#   launch_training ARG...     runs `python -m megatron_prior.train ARG...` on every node
# DRY_RUN=1 prints the command instead of running it.

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
MASTER_ADDR=${MASTER_ADDR:-$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || echo localhost) | head -n 1)}
MASTER_PORT=${MASTER_PORT:-6000}
PYTHON=${PYTHON:-python}

export CUDA_DEVICE_MAX_CONNECTIONS=1       # ordered kernel launches, as Megatron's TP overlap needs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

launch_training() {
  # Each argument quoted for the inner shell (paths with spaces stay one argument); the node
  # rank is left for each task to expand (escaped $), not expanded here.
  local args
  printf -v args '%q ' "$@"
  local cmd="cd $(printf '%q' "$REPO") && $(printf '%q' "$PYTHON") -m torch.distributed.run"
  cmd+=" --nproc-per-node $GPUS_PER_NODE --nnodes $NNODES --node-rank \${SLURM_NODEID}"
  cmd+=" --rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} --rdzv-id ${SLURM_JOB_ID:-local}"
  cmd+=" -m megatron_prior.train ${args% }"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    # Single-quoted as one would type it (a ' inside becomes '\''), so it can be pasted.
    echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '${cmd//\'/\'\\\'\'}'"
    return 0
  fi
  mkdir -p logs
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$cmd"
}
