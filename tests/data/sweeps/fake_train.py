"""Stand-in for `python -m megatron_prior.train` in the sweep tests: no model, just the
output contract (summary.json, metrics.jsonl, a checkpoint marker), with a held-out loss that
follows a known law L = E + A N^-alpha + B D^-beta (PRIOR: a larger beta) plus seeded noise,
D being the loss tokens: 3/4 of the text positions (the rest padding), beside 20 image
positions per sample.

Env: FAKE_TRAIN_CALLS (append one line per call), FAKE_TRAIN_FAIL (exit 3 when the run's
log dir ends with this name), FAKE_TRAIN_NOISE (relative noise, default 0).
"""

import argparse
import json
import os
import random
import sys
from pathlib import Path

PRESET_PARAMS = {"tiny": 120_000, "small": 480_000}
LAW = {"ntp": dict(E=1.2, A=300.0, alpha=0.45, B=60.0, beta=0.30),
       "prior": dict(E=1.2, A=300.0, alpha=0.45, B=120.0, beta=0.36)}

p = argparse.ArgumentParser()
for flag in ("--model", "--model-size", "--loss", "--save", "--log-dir", "--load"):
    p.add_argument(flag)
for flag in ("--num-layers", "--hidden-size", "--num-attention-heads", "--ffn-hidden-size",
             "--seq-length", "--global-batch-size", "--train-iters", "--seed"):
    p.add_argument(flag, type=int)
args, unknown = p.parse_known_args()
log_dir = Path(args.log_dir)
if os.environ.get("FAKE_TRAIN_CALLS"):
    with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
        f.write(json.dumps({"run": log_dir.name, "load": args.load, "extra": unknown}) + "\n")
if os.environ.get("FAKE_TRAIN_FAIL") and log_dir.name.endswith(os.environ["FAKE_TRAIN_FAIL"]):
    print("fake trainer: simulated out-of-memory at iteration 3", file=sys.stderr)
    sys.exit(3)
params = (PRESET_PARAMS[args.model_size] if args.model_size
          else 12 * args.num_layers * args.hidden_size ** 2)
samples = args.train_iters * args.global_batch_size
text = samples * args.seq_length
tokens = text * 3 // 4
law = LAW[args.loss]
loss = law["E"] + law["A"] * params ** -law["alpha"] + law["B"] * tokens ** -law["beta"]
rng = random.Random(f"{args.seed}-{tokens}-{params}")
loss *= 1 + float(os.environ.get("FAKE_TRAIN_NOISE", "0")) * rng.gauss(0.0, 1.0)
Path(args.save).mkdir(parents=True, exist_ok=True)
(Path(args.save) / "latest_checkpointed_iteration.txt").write_text(str(args.train_iters))
(log_dir / "metrics.jsonl").write_text(json.dumps({"iteration": args.train_iters, "weighted_ce": loss}) + "\n")
summary = {"iterations": args.train_iters, "samples": samples, "loss_tokens": tokens,
           "padding_positions": text - tokens, "image_positions": samples * 20, "positions": text + samples * 20,
           "train_ce": loss * 0.98,
           "eval_ce": loss, "eval_ce_grounded": loss * 1.5, "eval_ce_template": loss * 0.5,
           "flops": 6.0 * params * tokens, "parameters": params, "wall_time_s": 0.01,
           "model": args.model, "loss": args.loss, "prior_alpha": 1.0, "seed": args.seed}
tmp = log_dir / "summary.json.tmp"
tmp.write_text(json.dumps(summary))
os.replace(tmp, log_dir / "summary.json")
print(f"fake trainer: {args.loss} N={params} D={tokens} eval_ce={loss:.4f}")
