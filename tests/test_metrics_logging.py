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

import numpy as np
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
                          {"ce_grounded": 3.0, "ce": 2.5, "lm loss": 2.345678}, 1.0, 0.123,
                          {"text positions per second": "1234"})
    assert line == MEGATRON_EXAMPLE.replace(
        "lm loss: 2.345678E+00 |", "lm loss: 2.345678E+00 | ce: 2.500000E+00 | ce_grounded: 3.000000E+00 |"
    ) + " text positions per second: 1234 |"


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
    train = [r for r in records if "weighted_ce" in r]
    lines = [line for line in stdout1.splitlines() if " iteration " in line]
    assert len(lines) == len(train) == 2
    for line, r in zip(lines, train):
        i = r["iteration"]
        assert re.fullmatch(
            r" \[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] iteration +(\d+)/ +4 \| consumed samples: +(\d+) \| "
            r"elapsed time per iteration \(ms\): \d+\.\d \| learning rate: (\S+) \| global batch size: +8 \| "
            r"lm loss: (\S+) \| ce: (\S+) \| (ce_\w+: \S+ \| )*padding_share: \S+ \| loss scale: 1\.0 \| grad norm: (\S+) \| "
            r"number of skipped iterations: +0 \| number of nan iterations: +0 \| "
            r"text positions per second: \d+ \| positions per second \(text \+ image\): \d+ \| "
            r"throughput per GPU \(TFLOP/s/GPU\): \d+\.\d \|", line), line
        assert f"iteration {i:8d}/       4 | consumed samples: {8 * i:12d} |" in line
        assert f"| learning rate: {r['lr']:.6E} |" in line and f"| lm loss: {r['weighted_ce']:.6E} |" in line
        assert f"| grad norm: {r['grad_norm']:.3f} |" in line
        assert f"| padding_share: {r['padding_share']:.6E} |" in line
        assert r["consumed_samples"] == 8 * i and r["iteration_time_ms"] > 0
        # GPT: no image; a text position is a loss token, masked (--eod-mask-loss: the label is an
        # <eod>) or padding (megatron-core's rows of concatenated documents have none).
        assert r["image_positions"] == r["padding_positions"] == 0 and r["positions"] == 8 * i * 32 == \
            r["loss_tokens"] + r["masked_positions"]
        assert 0 < r["masked_positions"] < r["loss_tokens"]
        assert r["positions_per_s"] == pytest.approx(r["text_positions_per_s"])

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
    assert "eval_weighted_ce" in wandb[4] and wandb[4]["consumed_samples"] == 32
    assert calls1[-1] == ("finish",)


def _count_against_the_batches(argv: list) -> dict:
    """Trains a U-LVLM in this process; returns its summary and the counts read off the very
    batches it trained on (the data stream restarts at sample 0 when training starts), from the
    layout alone: text position j lands at j + image_offset x (<image> tokens up to j) of the
    combined row; it holds a token when its label carries loss or it is a caption's closing
    <eod> (a caption's last token: its label is padding or the next caption's <image>)."""
    from megatron_prior import parallel
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.loop import Trainer

    args = parse_args(argv, world_size=1)
    parallel.initialize(seed=args.seed)
    trainer = Trainer.build(args)
    cfg, tok = trainer.model_config, trainer.data.tokenizer
    batches = [{k: b[k].numpy() for k in ("tokens", "loss_mask")} for i in range(args.train_iters)
               for b in trainer.data.train_batches(i * args.global_batch_size)]
    summary = trainer.train()
    counts = dict(loss_tokens=0, masked_positions=0, image_positions=0, padding_positions=0, rows=0, images=0)
    for b in batches:
        images = b["tokens"] == cfg.image_token_id
        landed = np.arange(b["tokens"].shape[1]) + cfg.image_offset * np.cumsum(images, axis=1)
        token = ((b["loss_mask"] == 1) | (b["tokens"] == tok.eod)) & (landed < cfg.combined_seq_length)
        counts["loss_tokens"] += int(b["loss_mask"].sum())
        counts["masked_positions"] += int((token & (b["loss_mask"] == 0)).sum())
        counts["image_positions"] += int(images.sum()) * cfg.image_offset
        counts["padding_positions"] += int((cfg.combined_seq_length - token.sum(axis=1)).sum()
                                           - images.sum() * cfg.image_offset)
        counts["rows"] += len(b["tokens"])
    return {"summary": summary, "counts": counts, "image_offset": cfg.image_offset,
            "combined": cfg.combined_seq_length, "eod_is_pad_id": tok.eod == 0,
            "any_fraction": any(bool(((b["loss_mask"] != 0) & (b["loss_mask"] != 1)).any()) for b in batches)}


@pytest.mark.slow
@pytest.mark.parametrize("seq,packed", [(24, False), (96, True)], ids=["unpacked", "packed"])
def test_positions_are_loss_tokens_masked_image_and_padding(tiny_corpus, tmp_path, seq, packed):
    """summary.json's counts against the batches: positions = loss_tokens + masked_positions +
    image_positions + padding_positions, the padding being the slots no caption fills; packed,
    every caption's image counts, not one a row."""
    argv = ["--model", "ulvlm", "--seq-length", str(seq), "--patch-size", "4", "--num-layers", "2", "--hidden-size",
            "32", "--num-attention-heads", "4", "--micro-batch-size", "4", "--global-batch-size", "8", "--train-iters",
            "3", "--lr", "1e-3", "--data-path", tiny_corpus["data"], "--tokenizer-model", tiny_corpus["tokenizer"],
            "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--log-dir", str(tmp_path), "--loss",
            "prior", "--data-cache-path", str(tmp_path / "cache"), *(["--pack-samples"] if packed else [])]
    (r,) = run_on_ranks(_count_against_the_batches, 1, argv)
    s, c, samples = r["summary"], r["counts"], 3 * 8
    assert not r["any_fraction"] and not r["eod_is_pad_id"]  # a 0/1 mask: its sum counts tokens
    assert c["rows"] == s["samples"] == samples and s["loss_tokens"] == c["loss_tokens"] > 0
    # 16x16 images in 4x4 patches: <img_start> + 4 rows of (4 patches + a break) = 21 positions,
    # 20 more than the <image> placeholder they replace.
    assert r["image_offset"] == 20 and r["combined"] == 20 + seq
    for key in ("masked_positions", "image_positions", "padding_positions"):
        assert s[key] == c[key], key
    assert s["positions"] == samples * r["combined"] == (s["loss_tokens"] + s["masked_positions"]
                                                          + s["image_positions"] + s["padding_positions"])
    # Each caption's closing <eod> is masked unless it is only a label (a caption that fills its row).
    assert 0 < s["masked_positions"] <= s["image_positions"] // 20 and s["padding_positions"] > 0
    # Packed, a row holds several captions, each with its image; unpacked, one.
    assert s["image_positions"] > samples * 20 if packed else s["image_positions"] == samples * 20
    with open(tmp_path / "metrics.jsonl") as f:
        last = [json.loads(line) for line in f][-1]
    keys = ("loss_tokens", "masked_positions", "image_positions", "padding_positions", "positions")
    assert {k: last[k] for k in keys} == {k: s[k] for k in keys}
    assert last["positions_per_s"] == pytest.approx(last["text_positions_per_s"] * (20 + seq) / seq)
