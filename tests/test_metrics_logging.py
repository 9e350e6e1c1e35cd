"""What a run reports: Megatron-LM's iteration line on stdout (last rank only), and W&B beside
TensorBoard when --wandb-project is given (refused up front when wandb does not import)."""

import contextlib
import datetime
import io
import json
import os
import re
import sys
import types

import pytest

from megatron_prior.testing import run_on_ranks
from tests.test_training import LEGACY_DEFAULTS
from megatron_prior.training.arguments import ArgumentError, build_parser, validate_args
from megatron_prior.training.metrics import iteration_line

# The example of Megatron-LM's training_log output the line must reproduce, field for field.
MEGATRON_EXAMPLE = (
    " [2026-12-01 12:00:00] iteration       10/     100 | consumed samples:          320 | elapsed time per "
    "iteration (ms): 25.3 | learning rate: 1.000000E-03 | global batch size:    32 | lm loss: 2.345678E+00 | "
    "loss scale: 1.0 | grad norm: 0.123 | number of skipped iterations:   0 | number of nan iterations:   0 |")


def test_iteration_line_has_megatrons_fields_then_ours():
    line = iteration_line(datetime.datetime(2026, 12, 1, 12, 0, 0), 10, 100, 320, 0.0253, 1e-3, 32,
                          {"lm loss": 2.345678}, 1.0, 0.123, {})
    assert line == MEGATRON_EXAMPLE
    # Our losses follow lm loss in Megatron's loss position; our extras come last.
    line = iteration_line(datetime.datetime(2026, 12, 1, 12, 0, 0), 10, 100, 320, 0.0253, 1e-3, 32,
                          {"loss/grounded": 3.0, "ntp loss": 2.5, "lm loss": 2.345678}, 1.0, 0.123,
                          {"tokens per second": "1234"})
    assert line == MEGATRON_EXAMPLE.replace(
        "lm loss: 2.345678E+00 |", "lm loss: 2.345678E+00 | ntp loss: 2.500000E+00 | loss/grounded: 3.000000E+00 |"
    ) + " tokens per second: 1234 |"


def _args(corpus: dict, *extra: str):
    return build_parser().parse_args([
        "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "2",
        "--lr", "1e-3", "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"], *extra])


@pytest.mark.parametrize("flag,module,package", [
    ("--wandb-project", "wandb", "wandb"),
    ("--tensorboard-dir", "torch.utils.tensorboard", "tensorboard"),
])
def test_missing_writer_is_refused_before_any_work(tiny_corpus, monkeypatch, flag, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # import now raises ImportError
    with pytest.raises(ArgumentError) as err:
        validate_args(_args(tiny_corpus, flag, "x"), world_size=1)
    assert str(err.value).startswith(f"{flag} needs {package}, which does not import here (")
    assert str(err.value).endswith(f"): pip install {package}")


class _Recorder:
    """Stands in for the wandb module and for TensorBoard's SummaryWriter, recording calls."""

    calls: list = []

    def __init__(self, *args, **kwargs):
        _Recorder.calls.append(("SummaryWriter", args, kwargs))

    def add_scalar(self, key, value, step):
        _Recorder.calls.append(("add_scalar", key, value, step))

    def close(self):
        _Recorder.calls.append(("close",))


def _train_with_fake_writers(argv: list) -> tuple:
    """Trains on this rank with recording stand-ins for wandb and TensorBoard; returns
    (stdout, recorded calls)."""
    wandb = types.ModuleType("wandb")
    wandb.init = lambda **kwargs: _Recorder.calls.append(("init", kwargs))
    wandb.log = lambda data, step: _Recorder.calls.append(("log", data, step))
    wandb.finish = lambda: _Recorder.calls.append(("finish",))
    tensorboard = types.ModuleType("torch.utils.tensorboard")
    tensorboard.SummaryWriter = _Recorder
    sys.modules.update({"wandb": wandb, "torch.utils.tensorboard": tensorboard})
    from megatron_prior.train import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        main(argv)
    return out.getvalue(), _Recorder.calls


@pytest.mark.slow
def test_trainer_prints_megatrons_line_and_logs_to_wandb_as_tensorboard(tiny_corpus, tmp_path):
    out = str(tmp_path / "run")
    argv = ["--model", "gpt", "--seq-length", "32", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--micro-batch-size", "2", "--global-batch-size", "8",
            "--train-iters", "4", "--lr", "3e-3", "--lr-warmup-iters", "1", "--data-path", tiny_corpus["data"],
            "--tokenizer-model", tiny_corpus["tokenizer"], "--split", "90,10,0", "--eval-iters", "1",
            "--eval-interval", "4", "--log-interval", "2", "--log-dir", out, "--tensorboard-dir", str(tmp_path / "tb"),
            "--wandb-project", "prior-test", "--wandb-exp-name", "run-1",
            "--data-cache-path", str(tmp_path / "cache"), *LEGACY_DEFAULTS]
    (stdout0, calls0), (stdout1, calls1) = run_on_ranks(_train_with_fake_writers, 2, argv)  # DP = 2

    # Only the last rank reports, as Megatron's print_rank_last.
    assert " iteration " not in stdout0 and calls0 == []
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    train = [r for r in records if "lm_loss" in r]
    lines = [line for line in stdout1.splitlines() if " iteration " in line]
    assert len(lines) == len(train) == 2
    for line, r in zip(lines, train):
        i = r["iteration"]
        assert re.fullmatch(
            r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +4 \| consumed samples: +(\d+) \| "
            r"elapsed time per iteration \(ms\): \d+\.\d \| learning rate: (\S+) \| global batch size: +8 \| "
            r"lm loss: (\S+) \| ntp loss: (\S+) \| (loss/\w+: \S+ \| )*loss scale: 1\.0 \| grad norm: (\S+) \| "
            r"number of skipped iterations: +0 \| number of nan iterations: +0 \| "
            r"tokens per second: \d+ \| throughput per GPU \(TFLOP/s/GPU\): \d+\.\d \|", line), line
        assert f"iteration {i:8d}/       4 | consumed samples: {8 * i:12d} |" in line
        assert f"| learning rate: {r['lr']:.6E} |" in line and f"| lm loss: {r['lm_loss']:.6E} |" in line
        assert f"| grad norm: {r['grad_norm']:.3f} |" in line
        assert r["consumed_samples"] == 8 * i and r["iteration_time_ms"] > 0

    # W&B: one run, named by the flags, its files under the log dir; then every scalar that
    # TensorBoard gets, at the same steps, and a clean finish.
    inits = [c for c in calls1 if c[0] == "init"]
    assert len(inits) == 1
    assert {k: inits[0][1][k] for k in ("project", "name", "dir")} == {
        "project": "prior-test", "name": "run-1", "dir": os.path.join(out, "wandb")}
    assert inits[0][1]["config"]["global_batch_size"] == 8
    tensorboard, wandb = {}, {}
    for c in calls1:
        if c[0] == "add_scalar":
            tensorboard.setdefault(c[3], {})[c[1]] = c[2]
        elif c[0] == "log":
            wandb.setdefault(c[2], {}).update(c[1])
    assert sorted(wandb) == [2, 4] and wandb == tensorboard
    assert "eval_lm_loss" in wandb[4] and wandb[4]["consumed_samples"] == 32
    assert calls1[-1] == ("finish",)
