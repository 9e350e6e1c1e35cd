"""Run a graph of steps: subprocesses (or in-process functions) with dependencies, in parallel
up to ``jobs``, each logged to its own file, skipped when already done. The demo pipeline's
stages and a sweep's training and evaluation runs both go through it.

A step is done when all its ``outputs`` exist and its stamp (``{log_dir}/{name}.stamp.json``,
written after it succeeds) records the same command; a step whose command changed, or one of
whose dependencies ran in this invocation, runs again. So an interrupted pipeline resumes where
it stopped, and changing one setting reruns only what depends on it. ``force`` reruns
everything. Before a step runs, its ``clean`` paths are removed (stale partial outputs of an
interrupted run would otherwise mix with the new ones); a step that succeeds without writing
all its outputs fails.

A command is a logical argv, ``["-m", "module", ...]`` or ``["path/NAME.py", ...]``, to which
the runner prepends the Python interpreter (``tools/NAME.py`` is found in the repository), so
stamps depend on neither; or a shell command line (a string), run as written. Commands and
relative paths are taken from ``workdir``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

from megatron_prior.files import atomic_write_json

REPO_ROOT = Path(__file__).resolve().parents[1]

Command = Union[list[str], str]


class RunFailed(RuntimeError):
    """A step exited non-zero, raised, or left an output unwritten; the message names it and
    quotes its log's tail."""


@dataclass
class Step:
    name: str
    description: str                            # what messages call it: "training run xs_ntp_D1024_seed1"
    outputs: list[Path]
    command: Optional[Command] = None           # logical argv or shell command line (see the module doc)
    func: Optional[Callable[[], None]] = None   # in-process alternative to a command
    deps: list[str] = field(default_factory=list)
    clean: list[Path] = field(default_factory=list)
    always: bool = False                        # run every time (cheap steps such as the report)
    log: Optional[Path] = None                  # default {log_dir}/{name}.log; each attempt appends

    def __post_init__(self) -> None:
        if (self.command is None) == (self.func is None):
            raise ValueError(f"step {self.name}: give exactly one of command and func")


@dataclass
class StepResult:
    name: str
    ran: bool
    seconds: float
    cpu_seconds: Optional[float] = None  # user + system time of the subprocess (None in-process)


def resolve_command(command: Command, python: str = sys.executable) -> Command:
    """The real argv of a logical command (a shell command line is returned as it is)."""
    if isinstance(command, str):
        return command
    first = command[0]
    if first == "-m":
        return [python, *command]
    if first.endswith(".py"):
        if first.startswith("tools/"):
            path = REPO_ROOT / first
            if not path.is_file():
                raise FileNotFoundError(f"{path}: this step needs the repository's tools/ folder "
                                        "(run it from a source checkout)")
            return [python, str(path), *command[1:]]
        return [python, *command]
    raise ValueError(f"a step command starts with '-m' or a Python script (NAME.py), got {first!r}")


def _tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n  ".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class StepRunner:
    """Runs steps under ``workdir`` (commands run there; relative paths are relative to it).

    ``log_dir`` (default ``workdir/logs``) holds the stamps and the logs of steps that name no
    log of their own; ``label`` starts every progress line (``[demo 01:02] done ...``).
    """

    def __init__(self, workdir: Path, jobs: int = 1, force: bool = False, env: Optional[dict] = None,
                 echo: Callable[[str], None] = print, *, label: str = "steps",
                 log_dir: Optional[Path] = None, python: str = sys.executable) -> None:
        if jobs < 1:
            raise ValueError(f"jobs must be >= 1, got {jobs}")
        self.workdir = Path(workdir)
        self.log_dir = self.workdir / (log_dir if log_dir is not None else "logs")
        self.jobs = jobs
        self.force = force
        self.env = dict(os.environ, **(env or {}))
        self.label = label
        self.python = python
        self._echo = echo
        self._start = time.perf_counter()
        self._lock = threading.Lock()
        self._procs: set[subprocess.Popen] = set()
        self._stopping = False

    def echo(self, message: str) -> None:
        elapsed = int(time.perf_counter() - self._start)
        with self._lock:
            self._echo(f"[{self.label} {elapsed // 60:02d}:{elapsed % 60:02d}] {message}")

    # --- completion bookkeeping ----------------------------------------------------------
    def _stamp_path(self, step: Step) -> Path:
        return self.log_dir / f"{step.name}.stamp.json"

    def log_path(self, step: Step) -> Path:
        return self.workdir / step.log if step.log is not None else self.log_dir / f"{step.name}.log"

    def _missing_outputs(self, step: Step) -> list[Path]:
        return [p for p in step.outputs if not (self.workdir / p).exists()]

    def is_done(self, step: Step) -> bool:
        if self.force or step.always or self._missing_outputs(step):
            return False
        try:
            stamp = json.loads(self._stamp_path(step).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        return stamp.get("command") == step.command

    def _write_stamp(self, step: Step, seconds: float, cpu_seconds: Optional[float]) -> None:
        atomic_write_json(self._stamp_path(step), {
            "command": step.command, "seconds": round(seconds, 2),
            "cpu_seconds": None if cpu_seconds is None else round(cpu_seconds, 2)})

    # --- running one step ----------------------------------------------------------------
    def _execute(self, step: Step) -> tuple[float, Optional[float]]:
        for path in step.clean:
            target = self.workdir / path
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        self._stamp_path(step).unlink(missing_ok=True)
        start = time.perf_counter()
        cpu_seconds = None
        if step.func is not None:
            try:
                step.func()
            except Exception as err:
                raise RunFailed(f"{step.description} failed: {err}") from err
        else:
            cpu_seconds = self._run_command(step)
        missing = self._missing_outputs(step)
        if missing:
            log = self.log_path(step)
            tail = "" if step.func is not None else f"; the end of {log}:\n  {_tail(log)}"
            raise RunFailed(f"{step.description} succeeded but wrote no {', '.join(map(str, missing))}{tail}")
        seconds = time.perf_counter() - start
        self._write_stamp(step, seconds, cpu_seconds)
        return seconds, cpu_seconds

    def _run_command(self, step: Step) -> float:
        """Run the step's command; returns its CPU seconds (the measure of cost that does not
        depend on what else the machine is doing)."""
        argv = resolve_command(step.command, self.python)
        shell = isinstance(argv, str)
        log_path = self.log_path(step)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "a") as log:
            log.write(f"$ {argv if shell else shlex.join(argv)}\n")
            log.flush()
            with self._lock:
                if self._stopping:
                    raise RunFailed(f"{step.description} not started: the other steps are stopping")
                proc = subprocess.Popen(argv, shell=shell, cwd=self.workdir, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
                self._procs.add(proc)
            try:
                # wait4 (not proc.wait) to get this child's own resource usage.
                _, status, usage = os.wait4(proc.pid, 0)
                proc.returncode = code = os.waitstatus_to_exitcode(status)
            finally:
                with self._lock:
                    self._procs.discard(proc)
        if code != 0:
            raise RunFailed(f"{step.description} failed (exit {code}); the end of {log_path}:\n  {_tail(log_path)}")
        return usage.ru_utime + usage.ru_stime

    def _stop_all(self) -> None:
        with self._lock:
            self._stopping = True
            procs = list(self._procs)
        for proc in procs:
            proc.terminate()
        # The worker threads reap their processes (wait4); give them 10 s, then kill.
        deadline = time.perf_counter() + 10
        while time.perf_counter() < deadline:
            with self._lock:
                if not self._procs:
                    return
            time.sleep(0.1)
        with self._lock:
            for proc in self._procs:
                proc.kill()

    # --- the graph -----------------------------------------------------------------------
    def run(self, steps: Sequence[Step]) -> dict[str, StepResult]:
        """Run (or skip) every step, dependencies first, in list order among the ready ones;
        raises RunFailed on the first failure (after stopping the steps still running)."""
        by_name = {s.name: s for s in steps}
        if len(by_name) != len(steps):
            raise ValueError("step names must be unique")
        for s in steps:
            unknown = [d for d in s.deps if d not in by_name]
            if unknown:
                raise ValueError(f"step {s.name} depends on unknown steps {unknown}")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        results: dict[str, StepResult] = {}
        pending = list(steps)
        running: dict[Future, Step] = {}
        with ThreadPoolExecutor(max_workers=self.jobs) as pool:
            try:
                while pending or running:
                    # Skipping a step can make later ones ready: pass over the list until stable.
                    progressed = True
                    while progressed and len(running) < self.jobs:
                        progressed = False
                        for step in list(pending):
                            if len(running) >= self.jobs:
                                break
                            if not all(d in results for d in step.deps):
                                continue
                            pending.remove(step)
                            progressed = True
                            dep_ran = any(results[d].ran for d in step.deps)
                            if not dep_ran and self.is_done(step):
                                results[step.name] = StepResult(step.name, False, 0.0)
                                self.echo(f"skip   {step.description} (done: {', '.join(map(str, step.outputs))})")
                                continue
                            self.echo(f"start  {step.description}")
                            running[pool.submit(self._execute, step)] = step
                    if not running:
                        if pending:  # a dependency cycle: nothing can start
                            raise ValueError(f"steps {[s.name for s in pending]} wait on each other")
                        break
                    finished, _ = wait(running, return_when=FIRST_COMPLETED)
                    for future in finished:
                        step = running.pop(future)
                        seconds, cpu = future.result()
                        results[step.name] = StepResult(step.name, True, seconds, cpu)
                        self.echo(f"done   {step.description} in {seconds:.1f} s"
                                  + ("" if cpu is None else f" ({cpu:.1f} CPU s)"))
            except BaseException:
                self._stop_all()
                raise
        return results
