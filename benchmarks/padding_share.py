"""Padding with and without ``--pack-samples``: the share of the positions a training step
computes that hold padding, as the trainer logs it (``padding_share`` in metrics.jsonl), and
the loss tokens per step that buys. A count, not a timing: it does not depend on machine load.

One short training run per (architecture, packing) on a generated caption corpus (the demo's
generator, 16x16 images, unigram scores), tiny models: the share depends on the data and the
row length, not on the model.

    .venv/bin/python benchmarks/padding_share.py                      # seq 512, ~2 min on 2 cores
    .venv/bin/python benchmarks/padding_share.py --seq-length 48 128 512 --iters 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior.models.arch import ARCHS  # noqa: E402
from megatron_prior.testing import make_caption_corpus, run_on_ranks  # noqa: E402


def _train(argv: list) -> dict:
    from megatron_prior.train import main

    return main(argv)


def _run(corpus: dict, arch: str, seq_length: int, pack: bool, iters: int, out: str) -> dict:
    # The GPT reads the same captions as a text corpus: no image flags.
    image = [] if arch == "gpt" else ["--patch-size", "4", "--vit-num-layers", "1", "--vit-hidden-size", "32",
                                      "--vit-num-attention-heads", "4"]
    argv = ["--model", arch, "--seq-length", str(seq_length), *image, "--num-layers", "1", "--hidden-size", "32",
            "--num-attention-heads", "4", "--micro-batch-size", "4", "--global-batch-size", "8",
            "--train-iters", str(iters), "--lr", "1e-3", "--data-path", corpus["data"], "--tokenizer-model",
            corpus["tokenizer"], "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--log-dir", out,
            "--data-cache-path", os.path.join(out, "cache"), "--loss", "prior", *(["--pack-samples"] if pack else [])]
    run_on_ranks(_train, 1, argv)
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if "weighted_ce" in line]
    # loss_tokens is the run's running count: its last value over the steps is the mean per step.
    return {"padding_share": sum(r["padding_share"] for r in records) / len(records),
            "loss_tokens_per_step": records[-1]["loss_tokens"] / len(records)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq-length", type=int, nargs="+", default=[512], help="text positions per row")
    parser.add_argument("--archs", nargs="+", default=sorted(ARCHS), choices=sorted(ARCHS), help="architectures")
    parser.add_argument("--iters", type=int, default=3, help="training iterations per run (8 rows each)")
    parser.add_argument("--num-train", type=int, default=400, help="captions in the generated corpus")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(os.path.join(tmp, "corpus"))
        corpus = make_caption_corpus(os.path.join(tmp, "corpus"), num_train=args.num_train)
        print(f"{'arch':6s} {'seq':>5s} {'padding unpacked':>17s} {'padding packed':>15s} "
              f"{'loss tokens/step unpacked':>26s} {'packed':>8s} {'ratio':>6s}")
        for seq in args.seq_length:
            for arch in args.archs:
                got = {pack: _run(corpus, arch, seq, pack, args.iters, os.path.join(tmp, f"{arch}-{seq}-{pack}"))
                       for pack in (False, True)}
                u, p = got[False], got[True]
                print(f"{arch:6s} {seq:5d} {u['padding_share']:17.1%} {p['padding_share']:15.1%} "
                      f"{u['loss_tokens_per_step']:26.0f} {p['loss_tokens_per_step']:8.0f} "
                      f"{p['loss_tokens_per_step'] / u['loss_tokens_per_step']:6.1f}", flush=True)


if __name__ == "__main__":
    main()
