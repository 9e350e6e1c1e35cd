"""A sweep as one SLURM job array: one array task per training run.

Each task launches ``srun`` with one task per node, and each of those starts ``torchrun``
with the node count, the node's rank and the rendezvous point taken from SLURM's variables
(Megatron-LM's own multi-node convention), one process per GPU. A task whose run already has
a ``summary.json`` exits at once, and one that finds its own checkpoint resumes from it, so
resubmitting the script (after a failure or preemption) only redoes what is missing.

sbatch opens ``--output`` before the job starts and does not create its directory, so the
script, run with bash instead of sbatch, makes it and then submits itself. With
``CONTAINER_IMAGE`` set at submission, training (and evaluation) run in that image through
pyxis/enroot, with the submit directory, the output directory and the data directories mounted
at their own paths (``CONTAINER_MOUNTS`` replaces that list).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from .rundirs import CHECKPOINTS, EVAL, EVAL_LOG, LATEST, SUMMARY, TRAIN_LOG, run_dir
from .spec import Run, SweepError, SweepSpec


def _flag_lines(flags: list[str], indent: str) -> str:
    """One '--flag value...' group per line (a bash array literal may span lines)."""
    groups: list[list[str]] = []
    for arg in flags:
        if arg.startswith("--") or not groups:
            groups.append([arg])
        else:
            groups[-1].append(arg)
    return "\n".join(indent + " ".join(shlex.quote(a) for a in g) for g in groups)


def _mount_dirs(spec: SweepSpec, output_dir: Path) -> list[str]:
    """The output directory and the parent of every absolute path in the shared flags (data
    prefixes, tokenizer, checkpoints to start from), once each, in order."""
    dirs = [str(output_dir)]
    for arg in spec.common_flags():
        for word in arg.split():  # a blend given as one string: 'W1 P1 W2 P2'
            if word.startswith("/"):
                dirs.append(str(Path(word).parent))
    return list(dict.fromkeys(dirs))


def render_sbatch(spec: SweepSpec, runs: list[Run], output_dir: Path | str) -> str:
    """The job-array script for ``runs`` (array task i trains runs[i]). Pure: touches no file."""
    if spec.slurm is None:
        raise SweepError(f"{spec.path}: slurm: missing; --slurm needs a 'slurm' section "
                         "(partition, account, nodes, gpus_per_node, time)")
    if not runs:
        raise SweepError("no runs to submit")
    s = spec.slurm
    out = Path(output_dir)
    logs = out / "slurm" / "logs"
    q = shlex.quote
    header = [
        "#!/bin/bash",
        f"# Scaling-law sweep '{spec.name}' ({spec.path.name}): {len(runs)} training run(s), "
        "one SLURM array task each.",
        "# Written and submitted by examples/sweeps/run_sweep.py --slurm. Resubmitting it skips runs",
        "# whose summary.json exists and resumes interrupted ones from their last checkpoint:",
        "#   bash THIS_SCRIPT [SBATCH_OPTION...]   (makes the log directory, then sbatch's itself)",
        "# CONTAINER_IMAGE=IMAGE at submission runs the tasks in that image (pyxis/enroot).",
        f"#SBATCH --job-name={s.job_name or 'sweep-' + spec.name}",
    ]
    if s.partition:
        header.append(f"#SBATCH --partition={s.partition}")
    if s.account:
        header.append(f"#SBATCH --account={s.account}")
    array = f"0-{len(runs) - 1}" + (f"%{s.max_concurrent}" if s.max_concurrent else "")
    header += [
        f"#SBATCH --nodes={s.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={s.gpus_per_node}",
        f"#SBATCH --time={s.time}",
        f"#SBATCH --array={array}",
        f"#SBATCH --output={logs}/%x-%A_%a.out",
        *(f"#SBATCH {opt}" for opt in s.sbatch_extra),
    ]
    mounts = ",".join(f"{d}:{d}" for d in _mount_dirs(spec, out))
    body = [
        "",
        "set -euo pipefail",
        'if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then',
        "  # Run with bash: sbatch would lose the output of a job whose --output directory is missing.",
        f"  mkdir -p {q(str(logs))}",
        '  exec sbatch "$@" "$0"',
        "fi",
        "CONTAINER_ARGS=()",
        "EVAL_LAUNCH=()",
        'if [[ -n "${CONTAINER_IMAGE:-}" ]]; then',
        f"  DEFAULT_MOUNTS={q(mounts)}",
        '  CONTAINER_ARGS=(--container-image="$CONTAINER_IMAGE" --container-workdir="$SLURM_SUBMIT_DIR"',
        '    --container-mounts="${CONTAINER_MOUNTS:-$SLURM_SUBMIT_DIR:$SLURM_SUBMIT_DIR,$DEFAULT_MOUNTS}")',
        "  # The evaluation runs in the image too, as one task on this node.",
        '  EVAL_LAUNCH=(srun --nodes=1 --ntasks=1 "${CONTAINER_ARGS[@]}")',
        "fi",
        "# Megatron overlaps tensor-parallel communication with compute only with one CUDA queue.",
        "export CUDA_DEVICE_MAX_CONNECTIONS=1",
        *s.setup,
        "",
        "COMMON_ARGS=(",
        _flag_lines(spec.common_flags(), "  "),
        ")",
        "",
        'case "$SLURM_ARRAY_TASK_ID" in',
    ]
    for i, run in enumerate(runs):
        rdir = run_dir(out, run)
        body.append(f"  {i})  # {run.name}: {run.train_iters} iterations, {run.tokens} tokens")
        body.append(f"    RUN_DIR={q(str(rdir))}")
        body.append(f"    ARGS=({' '.join(q(a) for a in spec.grid_flags(run))})")
        evaluation = spec.eval_command_for(run, str(rdir), f"{rdir}/{CHECKPOINTS}", s.python)
        if evaluation is not None:
            body.append(f"    EVAL_CMD={q(evaluation)}")
        body.append("    ;;")
    body += [
        f'  *) echo "array task $SLURM_ARRAY_TASK_ID: no such run (the sweep has {len(runs)})" >&2; exit 1 ;;',
        "esac",
        f'CKPT="$RUN_DIR/{CHECKPOINTS}"',
        'mkdir -p "$RUN_DIR"',
        "",
        f'if [[ -f "$RUN_DIR/{SUMMARY}" ]]; then',
        f'  echo "skip $RUN_DIR: {SUMMARY} exists (finished)"',
        "else",
        f'  if [[ -f "$CKPT/{LATEST}" ]]; then ARGS+=(--load "$CKPT"); fi',
        '  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        "  # Every array task has its own job id: tasks sharing a node get different ports.",
        "  MASTER_PORT=$((20000 + SLURM_JOB_ID % 20000))",
        "  export MASTER_ADDR MASTER_PORT",
        "  # srun starts one shell per node; SLURM_NODEID is read there, so the inner script is",
        "  # single-quoted. Its $0 is the torchrun command, \"$@\" the trainer and its flags.",
        '  srun --ntasks-per-node=1 --kill-on-bad-exit=1 ${CONTAINER_ARGS[@]+"${CONTAINER_ARGS[@]}"} bash -c \\',
        "    'exec \"$0\" --nnodes=\"$SLURM_NNODES\" --node-rank=\"$SLURM_NODEID\" \\",
        f"      --nproc-per-node={s.gpus_per_node} --master-addr=\"$MASTER_ADDR\" "
        "--master-port=\"$MASTER_PORT\" \"$@\"' \\",
        f"    {q(s.torchrun)} {' '.join(q(a) for a in spec.trainer)} \"${{ARGS[@]}}\" \\",
        '    "${COMMON_ARGS[@]}" --save "$CKPT" --log-dir "$RUN_DIR" 2>&1 | tee -a "$RUN_DIR/'
        f'{TRAIN_LOG}"',
        f'  [[ -f "$RUN_DIR/{SUMMARY}" ]] || {{ echo "training exited without writing '
        f'$RUN_DIR/{SUMMARY}" >&2; exit 1; }}',
        "fi",
    ]
    if spec.eval_command is not None:
        body += [
            "",
            f'if [[ ! -f "$RUN_DIR/{EVAL}" ]]; then',
            '  ${EVAL_LAUNCH[@]+"${EVAL_LAUNCH[@]}"} bash -c "$EVAL_CMD" 2>&1 | tee -a "$RUN_DIR/'
            f'{EVAL_LOG}"',
            f'  [[ -f "$RUN_DIR/{EVAL}" ]] || {{ echo "evaluation exited without writing '
            f'$RUN_DIR/{EVAL}" >&2; exit 1; }}',
            "fi",
        ]
    return "\n".join(header + body) + "\n"


def submit(script: Path) -> str:
    """``sbatch --parsable SCRIPT``; returns the job id."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise RuntimeError("sbatch is not on PATH: run on a SLURM login node, or use --dry-run "
                           "to print the script")
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch {script} failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]
