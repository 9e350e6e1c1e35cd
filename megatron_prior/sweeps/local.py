"""Run a sweep on this machine, one run after the other, resumably, through the shared step
runner (``megatron_prior.runs``).

A run whose ``summary.json`` exists is finished and skipped (its evaluation still runs if
``eval.json`` is missing). A run interrupted mid-way restarts from its own last checkpoint
(``--load``), as Megatron does. Each run logs to its own ``train.log`` and ``eval.log``; the
runner's stamps (seconds and CPU seconds of each step) go to ``{output_dir}/logs/``. Before the
first run starts, every unfinished run's full argv passes the trainer's own checks.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from megatron_prior.files import atomic_write_json
from megatron_prior.runs import Step, StepRunner, resolve_command

from .rundirs import (CHECKPOINTS, EVAL, EVAL_LOG, LATEST, RUN_RECORD, SUMMARY, TRAIN_LOG,
                      check_run_record, check_runs, output_flags, run_dir, run_record)
from .spec import Run, SweepSpec

# Megatron's setting for overlapping TP communication with compute; unbuffered so a log's
# tail is current when a run fails.
RUN_ENV = {"CUDA_DEVICE_MAX_CONNECTIONS": "1", "PYTHONUNBUFFERED": "1"}


@dataclass
class LocalReport:
    finished: list[str] = field(default_factory=list)  # done before this call
    trained: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)   # left for later (--max-runs, --dry-run)


def train_command(spec: SweepSpec, run: Run, rdir: Path) -> list[str]:
    """Logical argv of one run (``resolve_command`` adds the interpreter); resumes from the
    run's own checkpoint when one exists."""
    launcher = []
    if spec.local_nproc_per_node > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={spec.local_nproc_per_node}"]
    argv = [*launcher, *spec.trainer, *spec.run_flags(run), *output_flags(rdir)]
    if (rdir / CHECKPOINTS / LATEST).exists():
        argv += ["--load", str(rdir / CHECKPOINTS)]
    return argv


def _steps(spec: SweepSpec, run: Run, rdir: Path, python: str, train: bool) -> list[Step]:
    """The run's training step (if ``train``) and its evaluation step (if it has none yet)."""
    steps = []
    if train:
        steps.append(Step(f"train_{run.name}", f"training run {run.name}", [rdir / SUMMARY],
                          train_command(spec, run, rdir), log=rdir / TRAIN_LOG))
    command = spec.eval_command_for(run, str(rdir), str(rdir / CHECKPOINTS), shlex.quote(python))
    if command is not None and not (rdir / EVAL).exists():
        steps.append(Step(f"eval_{run.name}", f"evaluation of {run.name}", [rdir / EVAL], command,
                          deps=[steps[0].name] if train else [], log=rdir / EVAL_LOG))
    return steps


def run_local(spec: SweepSpec, output_dir: Path, *, max_runs: Optional[int] = None,
              dry_run: bool = False, python: str = sys.executable,
              stream: Optional[TextIO] = None) -> LocalReport:
    """Train (and evaluate) every unfinished run of the grid, at most ``max_runs`` of them.

    Progress and skip notices go to ``stream`` (default: sys.stdout at call time).
    """
    stream = stream or sys.stdout
    output_dir = Path(output_dir)
    report = LocalReport()
    todo: list[Run] = []
    unfinished: list[Run] = []
    steps: list[Step] = []

    def echo(msg: str) -> None:
        print(msg, file=stream, flush=True)

    for run in spec.runs():
        rdir = run_dir(output_dir, run)
        check_run_record(spec, run, rdir)
        if (rdir / SUMMARY).exists():
            report.finished.append(run.name)
            echo(f"skip {run.name}: {SUMMARY} exists (finished)")
            steps += _steps(spec, run, rdir, python, train=False)
            continue
        unfinished.append(run)
        if max_runs is not None and len(todo) >= max_runs:
            report.pending.append(run.name)
        else:
            todo.append(run)
            steps += _steps(spec, run, rdir, python, train=True)
    if dry_run:
        for run in todo:
            rdir = run_dir(output_dir, run)
            echo(shlex.join(resolve_command(train_command(spec, run, rdir), python)))
            command = spec.eval_command_for(run, str(rdir), str(rdir / CHECKPOINTS), shlex.quote(python))
            if command:
                echo(f"  then: {command}")
        report.pending = [r.name for r in todo] + report.pending
        return report
    check_runs(spec, unfinished, output_dir, world_size=spec.local_nproc_per_node)
    for run in todo:
        rdir = run_dir(output_dir, run)
        atomic_write_json(rdir / RUN_RECORD, run_record(spec, run), sort_keys=False)
        if (rdir / CHECKPOINTS / LATEST).exists():
            echo(f"resume {run.name} from its checkpoint")
    runner = StepRunner(Path.cwd(), env=RUN_ENV, echo=echo, label=f"sweep {spec.name}",
                        log_dir=output_dir / "logs", python=python)
    runner.run(steps)
    report.trained = [run.name for run in todo]
    return report
