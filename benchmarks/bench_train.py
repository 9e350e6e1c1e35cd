"""Step time of PRIOR over NTP on the same configuration, side by side in one process.

For each architecture, two trainers are built on the same data and weights (one per loss),
and their training steps are timed in alternating blocks so drift and noise hit both alike.
The ratio PRIOR/NTP is the cost of the PRIOR weighting (target <= 1.02). On CPU the models
are tiny; on a GPU (when one is present) pass --model-size and sizes that fit, and any other
trainer flag through --train-args (shape, --fp8-format, --use-distributed-optimizer, ...).
On a GPU the table also gives the process's peak allocated memory (all trainers it built).

    .venv/bin/python benchmarks/bench_train.py [--archs gpt,ulvlm,hlvlm] [--steps 30]
    python benchmarks/bench_train.py --archs gpt --model-size 1.3b --bf16 --losses ntp \\
        --train-args="--normalization RMSNorm --untie-embeddings-and-output-weights"
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

LOSSES = ("ntp", "prior")
WARMUP_STEPS = 3


def trainer_argv(corpus: dict, arch: str, loss: str, opts: argparse.Namespace) -> list[str]:
    """The trainer's flags for one of the runs timed."""
    # Exactly the iterations timed: the dataset's sample index covers no more than these.
    iters = WARMUP_STEPS + opts.blocks * opts.steps
    argv = ["--model", arch, "--model-size", opts.model_size, "--seq-length", str(opts.seq_length),
            "--patch-size", "4", "--micro-batch-size", str(opts.micro_batch_size),
            "--global-batch-size", str(opts.micro_batch_size * 2), "--train-iters", str(iters),
            "--lr", "1e-4", "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"],
            "--split", "100,0,0", "--eval-iters", "0", "--loss", loss,
            # The settings the recorded numbers were measured with (Megatron's defaults differ).
            "--adam-beta2", "0.95", "--hidden-dropout", "0", "--attention-dropout", "0", "--eod-mask-loss",
            *shlex.split(opts.train_args)]
    return argv + (["--bf16"] if opts.bf16 else [])


def _trainer_args(corpus: dict, arch: str, loss: str, opts: argparse.Namespace):
    from megatron_prior.training.arguments import build_parser, validate_args

    return validate_args(build_parser().parse_args(trainer_argv(corpus, arch, loss, opts)), world_size=1)


def _time_steps(trainer, steps: int) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--archs", default="gpt,ulvlm,hlvlm")
    parser.add_argument("--losses", default=",".join(LOSSES),
                        help="losses to build and time (the PRIOR/NTP ratio needs both)")
    parser.add_argument("--model-size", default="tiny")
    parser.add_argument("--seq-length", type=int, default=48)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--blocks", type=int, default=5, help="alternating blocks per loss")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--train-args", default="",
                        help="more trainer flags as one string, given as --train-args=\"...\" (they override "
                             "the ones above)")
    opts = parser.parse_args(argv)
    losses = opts.losses.split(",")
    if not losses or any(loss not in LOSSES for loss in losses) or len(set(losses)) != len(losses):
        parser.error(f"--losses {opts.losses!r}: a comma-separated subset of {','.join(LOSSES)}")
    opts.losses = [loss for loss in LOSSES if loss in losses]
    return opts


def main(argv=None) -> None:
    opts = parse_args(argv)

    from megatron_prior import parallel
    from megatron_prior.testing import make_caption_corpus
    from megatron_prior.training.loop import Trainer, count_parameters
    from megatron_prior.training.metrics import flops_per_iteration, peak_flops

    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    with tempfile.TemporaryDirectory() as tmp:
        corpus = make_caption_corpus(tmp, num_train=600, image_size=16)
        rows = []
        for arch in opts.archs.split(","):
            parallel.initialize(seed=1)
            try:
                if cuda:
                    torch.cuda.reset_peak_memory_stats()
                trainers = {loss: Trainer.build(_trainer_args(corpus, arch, loss, opts)) for loss in opts.losses}
                for t in trainers.values():
                    _time_steps(t, WARMUP_STEPS)
                times = {loss: [] for loss in trainers}
                for _ in range(opts.blocks):
                    for loss, t in trainers.items():
                        times[loss].append(_time_steps(t, opts.steps))
                median = {loss: statistics.median(times[loss]) for loss in trainers}
                last = opts.losses[-1]  # PRIOR's throughput when it ran
                t = trainers[last]
                tokens = t.args.global_batch_size * t.args.seq_length
                params = count_parameters([m.module for m in t.model])
                flops = flops_per_iteration(t.model_config, params, t.args)
                peak = peak_flops()
                rows.append((arch, params, median, tokens / median[last],
                             flops / median[last] / peak if peak else None,
                             torch.cuda.max_memory_allocated() / 2**30 if cuda else None))
                del trainers, t
            finally:
                parallel.destroy()
    last = opts.losses[-1].upper()
    print(f"\nstep time ({device}; {opts.model_size} models, seq {opts.seq_length}, micro-batch "
          f"{opts.micro_batch_size} x 2{'; ' + opts.train_args if opts.train_args else ''}; median of "
          f"{opts.blocks} alternating blocks of {opts.steps} steps)")
    print(f"{'arch':8s} {'params':>14s} " + " ".join(f"{loss.upper() + ' ms/step':>14s}" for loss in opts.losses)
          + f" {'PRIOR/NTP':>10s} {last + ' tokens/s':>15s} {last + ' MFU':>10s} {'peak GiB':>9s}")
    for arch, params, median, tps, mfu, mem in rows:
        ratio = f"{median['prior'] / median['ntp']:10.3f}" if len(median) == 2 else f"{'n/a':>10s}"
        mfu_text = f"{mfu:10.1%}" if mfu is not None else f"{'n/a':>10s}"
        mem_text = f"{mem:9.2f}" if mem is not None else f"{'n/a':>9s}"
        print(f"{arch:8s} {params:14,d} " + " ".join(f"{median[loss] * 1e3:14.2f}" for loss in opts.losses)
              + f" {ratio} {tps:15,.0f} {mfu_text} {mem_text}")


if __name__ == "__main__":
    main()
