"""Walltime and preemption (--exit-signal-handler, --exit-duration-in-mins): a run told to stop
finishes its iteration, saves, exits 0 without a summary.json (it is not finished), every rank
stops at the same iteration, and the resumed run reproduces the uninterrupted one bit for bit."""

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_prior.testing import run_on_ranks
from tests.test_training import LEGACY_DEFAULTS

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
ITERS = 16
# What metrics.jsonl records besides the numbers of the training itself.
TIMING = {"iteration_time_ms", "positions_per_s", "text_positions_per_s", "tflops_per_s", "mfu"}


def _argv(corpus: dict, out: Path, *extra: str, iters: int = ITERS) -> list:
    return ["--model", "gpt", "--seq-length", "32", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "3e-3", "--lr-warmup-iters", "1", "--loss", "prior",
            "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"], "--split", "90,10,0",
            "--eval-iters", "0", "--log-interval", "1", "--save", str(out),
            "--data-cache-path", str(out / "cache"), *LEGACY_DEFAULTS, *extra]


def _records(out: Path) -> list:
    """Per-iteration training numbers of metrics.jsonl (losses, grad norm, lr, samples)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in lines]


def _checkpointed_iteration(out: Path) -> int:
    return int((out / "latest_checkpointed_iteration.txt").read_text())


def _train(argv: list):
    from megatron_prior.train import main

    return main(argv)


def _command(argv: list) -> list:
    return [sys.executable, "-m", "megatron_prior.train", *argv]


# One intra-op thread in every single-process run: the same reduction order in each, so the
# comparisons can be exact.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run(argv: list) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(argv), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def reference(tiny_corpus, tmp_path_factory) -> list:
    """The uninterrupted single-process run."""
    out = tmp_path_factory.mktemp("reference")
    _run(_argv(tiny_corpus, out))
    return _records(out)


@pytest.mark.skipif(not hasattr(fcntl, "F_SETPIPE_SZ"), reason="needs Linux's pipe resizing")
def test_sigterm_stops_saves_and_resumes_exactly(tiny_corpus, tmp_path, reference):
    """SIGTERM to the whole process group, as SLURM sends it at the walltime (the DataLoader
    worker gets it too), once the log shows iteration >= 2."""
    out = tmp_path / "run"
    argv = _argv(tiny_corpus, out, "--exit-signal-handler", "--num-workers", "1")
    with open(tmp_path / "stderr.log", "w") as stderr:
        proc = subprocess.Popen(_command(argv), cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=stderr,
                                bufsize=0, start_new_session=True)
        # Timing-proof: the trainer blocks on a full pipe, so with a one-page pipe read one byte at
        # a time it is never more than ~10 log lines (iterations) ahead of this loop.
        fcntl.fcntl(proc.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
        signalled_at = None
        try:
            for line in iter(proc.stdout.readline, b""):
                found = re.search(rb" iteration +(\d+)/", line)
                if signalled_at is None and found and int(found.group(1)) >= 2:
                    signalled_at = int(found.group(1))
                    os.killpg(proc.pid, signal.SIGTERM)
            assert proc.wait(timeout=600) == 0, (tmp_path / "stderr.log").read_text()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    log = (tmp_path / "stderr.log").read_text()
    stopped = _checkpointed_iteration(out)
    assert signalled_at is not None and signalled_at <= stopped < ITERS, (signalled_at, stopped)
    assert (f"SIGTERM received (--exit-signal-handler): stopped at iteration {stopped} of {ITERS} after saving "
            f"a checkpoint to {out}; resume with --load {out}") in log
    assert "Traceback" not in log
    assert not (out / "summary.json").exists()  # not finished: a sweep or a resubmitted job resumes it
    assert _records(out) == reference[:stopped]

    _run([*argv, "--load", str(out)])
    assert _checkpointed_iteration(out) == ITERS and (out / "summary.json").exists()
    assert _records(out) == reference  # every loss, grad norm and lr, bit for bit


def _train_with_sigterm_on_rank_0(argv: list):
    """SIGTERM reaches rank 0 only, right as its handler is installed (before any iteration)."""
    from megatron_prior.training.signals import EarlyExit

    if os.environ["RANK"] == "0":
        install = EarlyExit.install

        def install_then_signal(self):
            install(self)
            os.kill(os.getpid(), signal.SIGTERM)
        EarlyExit.install = install_then_signal
    return _train(argv)


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_iteration(tiny_corpus, tmp_path):
    """Rank 1 never sees the signal; without the all-reduced decision it would wait in the next
    iteration's collectives for rank 0, which left (resuming exactly is the test above's)."""
    out = tmp_path / "run"
    argv = _argv(tiny_corpus, out, "--tensor-model-parallel-size", "2", "--exit-signal-handler")
    assert run_on_ranks(_train_with_sigterm_on_rank_0, 2, argv) == [None, None]
    assert _checkpointed_iteration(out) == 1 and not (out / "summary.json").exists()
    assert [r["iteration"] for r in _records(out)] == [1]


def test_exit_duration_stops_after_the_iteration_that_runs_over(tiny_corpus, tmp_path, reference):
    """A budget shorter than the set-up: the first iteration ends past it, on every rank."""
    out = tmp_path / "run"
    log = _run(_argv(tiny_corpus, out, "--exit-duration-in-mins", "1e-4")).stderr
    assert (f"wall time over --exit-duration-in-mins 0.0001 on some rank: stopped at iteration 1 of {ITERS} "
            f"after saving a checkpoint to {out}") in log
    assert _checkpointed_iteration(out) == 1 and not (out / "summary.json").exists()
    assert _records(out) == reference[:1]
