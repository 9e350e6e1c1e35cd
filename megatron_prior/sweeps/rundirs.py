"""A sweep's run directories: where each run keeps its files, the record that ties a run
directory to its flags, and the trainer's check of each run's full argv.

    {output_dir}/runs/{run}/run.json          the flags the run was (or is being) trained with
    {output_dir}/runs/{run}/train.log         trainer stdout + stderr
    {output_dir}/runs/{run}/summary.json      written by the trainer at the end: the run is done
    {output_dir}/runs/{run}/metrics.jsonl     written by the trainer
    {output_dir}/runs/{run}/checkpoints/      --save (and --load when resuming)
    {output_dir}/runs/{run}/eval.json         written by the evaluation command, if any
    {output_dir}/runs/{run}/eval.log          its stdout + stderr
    {output_dir}/logs/                        local runs: the step runner's stamps
    {output_dir}/slurm/{name}.sbatch          the job-array script; slurm/logs/ its outputs
    {output_dir}/results.json, results.md, fit.json, scaling.png
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .spec import DEFAULT_TRAINER, Run, SweepError, SweepSpec

SUMMARY = "summary.json"
EVAL = "eval.json"
RUN_RECORD = "run.json"
TRAIN_LOG = "train.log"
EVAL_LOG = "eval.log"
CHECKPOINTS = "checkpoints"
LATEST = "latest_checkpointed_iteration.txt"


def run_dir(output_dir: Path, run: Run) -> Path:
    return Path(output_dir) / "runs" / run.name


def output_flags(rdir: Path | str) -> list[str]:
    return ["--save", f"{rdir}/{CHECKPOINTS}", "--log-dir", str(rdir)]


def check_runs(spec: SweepSpec, runs: Sequence[Run], output_dir: Path, world_size: int) -> None:
    """Refuse, before any of ``runs`` starts, one whose full argv the trainer's own
    ``validate_args`` refuses at ``world_size`` processes (parallel sizes, batch sizes, data
    files and PRIOR scores, ...). The SweepError names the run and the trainer's message."""
    if spec.trainer != DEFAULT_TRAINER:
        return
    for run in runs:
        spec.trainer_args(run, output_flags(run_dir(output_dir, run)), world_size)


def run_record(spec: SweepSpec, run: Run) -> dict:
    return {"sweep": spec.name, "run": run.name, "size": run.size.name, "loss": run.loss,
            "seed": run.seed, "tokens": run.tokens, "train_iters": run.train_iters,
            "flags": spec.run_flags(run)}


def check_run_record(spec: SweepSpec, run: Run, rdir: Path) -> bool:
    """True when ``rdir`` holds a record of this run; refuse one trained with other flags.

    Without this, editing a fixed flag (say the learning rate) and rerunning would silently
    mix old and new runs in one fit.
    """
    path = rdir / RUN_RECORD
    if not path.exists():
        return False
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise SweepError(f"{path}: unreadable run record: {err}") from err
    new = run_record(spec, run)
    if old.get("flags") != new["flags"]:
        old_flags, new_flags = old.get("flags") or [], new["flags"]
        changed = [f for f in new_flags if f not in old_flags] + [f for f in old_flags if f not in new_flags]
        raise SweepError(
            f"{rdir}: this run directory was made with other training flags than "
            f"{spec.path} now gives (differing: {' '.join(changed) or 'order'}); use another "
            "--output-dir, or delete the run directory to retrain it")
    return True
