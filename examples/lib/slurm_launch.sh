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
  local launch=(
    "$PYTHON" -m torch.distributed.run
    --nproc-per-node "$GPUS_PER_NODE" --nnodes "$NNODES"
    --node-rank '${SLURM_NODEID}'
    --rdzv-backend c10d --rdzv-endpoint "${MASTER_ADDR}:${MASTER_PORT}" --rdzv-id "${SLURM_JOB_ID:-local}"
    -m megatron_prior.train "$@"
  )
  # The node rank is expanded inside each task (single quotes above), not here.
  local cmd="cd '$REPO' && ${launch[*]}"
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c \"$cmd\""
    return 0
  fi
  mkdir -p logs
  srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c "$cmd"
}
