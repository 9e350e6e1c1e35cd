# Shared by the SLURM launchers: one srun task per node, each running torchrun with one
# process per GPU and the rendezvous taken from SLURM's variables.
#   submit_unless_in_job [SBATCH_OPTION...]   outside a SLURM job: make $LOG_DIR, sbatch the
#                                             calling script with its output there, and exit
#   launch_training ARG...                    runs `python -m megatron_prior.train ARG...` on every node
#   launch_preprocessing ARG...               runs `python tools/preprocess_with_weights.py ARG...` on
#                                             every node (each GPU a rank sharing the input)
# DRY_RUN=1 prints the commands instead of running them.
# CONTAINER_IMAGE=IMAGE runs each node's task in that image through pyxis/enroot, with
# CONTAINER_MOUNTS (pyxis's SRC:DST,... syntax) mounted, by default each of MOUNT_DIRS (an
# array the calling script fills with the repository, data, tokenizer and checkpoint
# directories) at its own path.

GPUS_PER_NODE=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-1}}
MASTER_ADDR=${MASTER_ADDR:-$( (scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" 2>/dev/null || echo localhost) | head -n 1)}
MASTER_PORT=${MASTER_PORT:-6000}
PYTHON=${PYTHON:-python}
LOG_DIR=${LOG_DIR:-$REPO/logs}

export CUDA_DEVICE_MAX_CONNECTIONS=1       # ordered kernel launches, as Megatron's TP overlap needs
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}

# Pasteable: each argument single-quoted where it needs quoting (a ' inside becomes '\'').
_quoted() {
  local out=() arg
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./%=:,@+-]+$ ]]; then out+=("$arg"); else out+=("'${arg//\'/\'\\\'\'}'"); fi
  done
  echo "${out[*]}"
}

submit_unless_in_job() {
  [[ -z "${SLURM_JOB_ID:-}" ]] || return 0
  # sbatch opens --output before the job starts and does not create its directory (a missing
  # one loses the job's output, or fails the job, silently), so it is made here, first. The
  # script's own #SBATCH --output names a file in the submit directory, which always exists,
  # for a plain `sbatch` of it; this command-line --output takes precedence.
  local script
  script="$(cd "$(dirname "${BASH_SOURCE[1]}")" && pwd)/$(basename "${BASH_SOURCE[1]}")"
  local submit=(sbatch "--output=$LOG_DIR/%x-%j.out" "$@" "$script")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "cd $(_quoted "$REPO") && mkdir -p $(_quoted "$LOG_DIR") && $(_quoted "${submit[@]}")"
    return 0  # then prints what the job would run
  fi
  if ! command -v sbatch >/dev/null; then
    echo "sbatch is not on PATH: run this on a SLURM login node (DRY_RUN=1 prints the commands)" >&2
    exit 1
  fi
  mkdir -p "$LOG_DIR"
  # Submitted from the repository, so the job finds it as SLURM_SUBMIT_DIR.
  cd "$REPO"
  exec "${submit[@]}"
}

container_args() {
  [[ -n "${CONTAINER_IMAGE:-}" ]] || return 0
  local mounts=${CONTAINER_MOUNTS:-} dir
  if [[ -z "$mounts" ]]; then
    declare -A seen=()
    for dir in "${MOUNT_DIRS[@]}"; do
      [[ -n "$dir" && -z "${seen[$dir]:-}" ]] || continue
      seen[$dir]=1
      mounts+="${mounts:+,}$dir:$dir"
    done
  fi
  echo "--container-image=$CONTAINER_IMAGE"
  echo "--container-mounts=$mounts"
}

# _launch_torchrun ENTRY ARG...: torchrun on every node running ENTRY (torchrun's own words for
# it: "-m module" or a script path relative to the repository) with ARG...
_launch_torchrun() {
  local entry=$1
  shift
  # Each argument quoted for the inner shell (paths with spaces stay one argument); the node
  # rank is left for each task to expand (escaped $), not expanded here.
  local args
  printf -v args '%q ' "$@"
  local cmd="cd $(printf '%q' "$REPO") && $(printf '%q' "$PYTHON") -m torch.distributed.run"
  cmd+=" --nproc-per-node $GPUS_PER_NODE --nnodes $NNODES --node-rank \${SLURM_NODEID}"
  cmd+=" --rdzv-backend c10d --rdzv-endpoint ${MASTER_ADDR}:${MASTER_PORT} --rdzv-id ${SLURM_JOB_ID:-local}"
  cmd+=" $entry ${args% }"
  local srun=(srun --ntasks-per-node=1 --kill-on-bad-exit=1)
  mapfile -t -O "${#srun[@]}" srun < <(container_args)
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    _quoted "${srun[@]}" bash -c "$cmd"
    return 0
  fi
  "${srun[@]}" bash -c "$cmd"
}

launch_training() { _launch_torchrun "-m megatron_prior.train" "$@"; }
launch_preprocessing() { _launch_torchrun "tools/preprocess_with_weights.py" "$@"; }
