"""Step time of PRIOR over NTP on the same configuration, side by side in one process.

For each architecture, two trainers are built on the same data and weights (one per loss),
and their training steps are timed in alternating blocks so drift and noise hit both alike.
The ratio PRIOR/NTP is the cost of the PRIOR weighting (target <= 1.02). On CPU the models
are tiny; on a GPU (when one is present) pass --model-size and sizes that fit.

    .venv/bin/python benchmarks/bench_train.py [--archs gpt,ulvlm,hlvlm] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch


def _trainer_args(corpus: dict, arch: str, loss: str, opts: argparse.Namespace):
    from megatron_prior.training.arguments import build_parser, validate_args

    argv = ["--model", arch, "--model-size", opts.model_size, "--seq-length", str(opts.seq_length),
            "--patch-size", "4", "--micro-batch-size", str(opts.micro_batch_size),
            "--global-batch-size", str(opts.micro_batch_size * 2), "--train-iters", "100000",
            "--lr", "1e-4", "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"],
            "--split", "100,0,0", "--eval-iters", "0", "--loss", loss]
    if opts.bf16:
        argv.append("--bf16")
    return validate_args(build_parser().parse_args(argv), world_size=1)


def _time_steps(trainer, steps: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="gpt,ulvlm,hlvlm")
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--seq-length", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per loss")
    parser.add_argument("--bf16", action="store_true")
    opts = parser.parse_args()

    from megatron_prior import parallel
    from megatron_prior.testing import make_caption_corpus
    from megatron_prior.training.loop import Trainer, count_parameters
    from megatron_prior.training.metrics import flops_per_iteration, peak_flops

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_caption_corpus(tmp, num_train=600, image_size=16)
        rows = []
        for arch in opts.archs.split(","):
            parallel.initialize(seed=1)
            try:
                trainers = {loss: Trainer.build(_trainer_args(corpus, arch, loss, opts)) for loss in ("ntp", "prior")}
                for t in trainers.values():
                    _time_steps(t, 3)  # warm-up
                times = {"ntp": [], "prior": []}
                for _ in range(opts.blocks):
                    for loss, t in trainers.items():
                        times[loss].append(_time_steps(t, opts.steps))
                ntp, prior = statistics.median(times["ntp"]), statistics.median(times["prior"])
                t = trainers["prior"]
                tokens = t.args.global_batch_size * t.args.seq_length
                params = count_parameters([m.module for m in t.model])
                flops = flops_per_iteration(t.model_config, params, t.args)
                peak = peak_flops()
                rows.append((arch, params, ntp * 1e3, prior * 1e3, prior / ntp, tokens / prior,
                             flops / prior / peak if peak else None))
            finally:
                parallel.destroy()
    print(f"\nstep time, PRIOR vs NTP ({device}; {opts.model_size} models, seq {opts.seq_length}, "
          f"micro-batch {opts.micro_batch_size} x 2; median of {opts.blocks} alternating blocks of {opts.steps} steps)")
    print(f"{'arch':8s} {'params':>12s} {'NTP ms/step':>12s} {'PRIOR ms/step':>14s} {'PRIOR/NTP':>10s} "
          f"{'PRIOR tokens/s':>15s} {'PRIOR MFU':>10s}")
    for arch, params, ntp, prior, ratio, tps, mfu in rows:
        mfu_text = f"{mfu:10.1%}" if mfu is not None else f"{'n/a':>10s}"
        print(f"{arch:8s} {params:12,d} {ntp:12.2f} {prior:14.2f} {ratio:10.3f} {tps:15,.0f} {mfu_text}")


if __name__ == "__main__":
    main()
