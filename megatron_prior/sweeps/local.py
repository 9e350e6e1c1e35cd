"""Run a sweep on this machine, one training run after the other, resumably.

A run whose ``summary.json`` exists is finished and skipped (its evaluation still runs if
``eval.json`` is missing). A run interrupted mid-way restarts from its own last checkpoint
(``--load``), as Megatron does. Each run logs to its own ``train.log``.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, TextIO

from tqdm import tqdm

from megatron_prior.files import atomic_write_json

from .layout import (CHECKPOINTS, EVAL, EVAL_LOG, LATEST, RUN_RECORD, SUMMARY, TRAIN_LOG,
                     check_run_record, output_flags, run_dir, run_record)
from .spec import Run, SweepSpec


class RunFailed(RuntimeError):
    """A training or evaluation subprocess failed; the message holds its log's tail."""


@dataclass
class LocalReport:
    finished: list[str] = field(default_factory=list)  # done before this call
    trained: list[str] = field(default_factory=list)
    pending: list[str] = field(default_factory=list)   # left for later (--max-runs, --dry-run)


def train_command(spec: SweepSpec, run: Run, rdir: Path, python: str = sys.executable) -> list[str]:
    """argv of one run; resumes from the run's own checkpoint when one exists."""
    if spec.local_nproc_per_node > 1:
        launcher = [python, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={spec.local_nproc_per_node}"]
    else:
        launcher = [python]
    argv = [*launcher, *spec.trainer, *spec.run_flags(run), *output_flags(rdir)]
    if (rdir / CHECKPOINTS / LATEST).exists():
        argv += ["--load", str(rdir / CHECKPOINTS)]
    return argv


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _execute(argv: list[str] | str, log: Path, what: str, shell: bool = False) -> float:
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", PYTHONUNBUFFERED="1")
    start = time.perf_counter()
    with open(log, "ab") as out:
        out.write(f"$ {argv if shell else shlex.join(argv)}\n".encode())
        out.flush()
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=env, shell=shell).returncode
    if rc != 0:
        raise RunFailed(f"{what} failed (exit {rc}); last lines of {log}:\n{_tail(log)}")
    return time.perf_counter() - start


def _evaluate(spec: SweepSpec, run: Run, rdir: Path, python: str, echo) -> None:
    command = spec.eval_command_for(run, str(rdir), str(rdir / CHECKPOINTS), shlex.quote(python))
    if command is None or (rdir / EVAL).exists():
        return
    seconds = _execute(command, rdir / EVAL_LOG, f"evaluation of {run.name}", shell=True)
    if not (rdir / EVAL).exists():
        raise RunFailed(f"evaluation of {run.name} exited 0 but wrote no {rdir / EVAL} "
                        f"(command: {command}); see {rdir / EVAL_LOG}")
    echo(f"  evaluated {run.name} in {seconds:.1f} s")


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

    def echo(msg: str) -> None:
        tqdm.write(msg, file=stream)

    for run in spec.runs():
        rdir = run_dir(output_dir, run)
        check_run_record(spec, run, rdir)
        if (rdir / SUMMARY).exists():
            report.finished.append(run.name)
            echo(f"skip {run.name}: {SUMMARY} exists (finished)")
            if not dry_run:
                _evaluate(spec, run, rdir, python, echo)
        elif max_runs is not None and len(todo) >= max_runs:
            report.pending.append(run.name)
        else:
            todo.append(run)
    if dry_run:
        for run in todo:
            rdir = run_dir(output_dir, run)
            echo(shlex.join(train_command(spec, run, rdir, python)))
            command = spec.eval_command_for(run, str(rdir), str(rdir / CHECKPOINTS), shlex.quote(python))
            if command:
                echo(f"  then: {command}")
        report.pending = [r.name for r in todo] + report.pending
        return report
    for run in tqdm(todo, desc=f"sweep {spec.name}", unit="run", file=stream, disable=not todo):
        rdir = run_dir(output_dir, run)
        rdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(rdir / RUN_RECORD, run_record(spec, run), sort_keys=False)
        argv = train_command(spec, run, rdir, python)
        resumed = " (resuming from its checkpoint)" if "--load" in argv else ""
        echo(f"train {run.name}: {run.train_iters} iterations, {run.tokens} tokens{resumed}")
        seconds = _execute(argv, rdir / TRAIN_LOG, f"training run {run.name}")
        if not (rdir / SUMMARY).exists():
            raise RunFailed(f"training run {run.name} exited 0 but wrote no {rdir / SUMMARY}; "
                            f"last lines of {rdir / TRAIN_LOG}:\n{_tail(rdir / TRAIN_LOG)}")
        echo(f"  trained {run.name} in {seconds:.1f} s")
        _evaluate(spec, run, rdir, python, echo)
        report.trained.append(run.name)
    return report
