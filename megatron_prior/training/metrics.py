"""What a run reports: Megatron-LM's iteration line on stdout, ``metrics.jsonl``, TensorBoard,
Weights & Biases (``--wandb-project``) and ``summary.json``.

Loss logs travel as ``[sum, count]`` pairs (see megatron_prior.loss): summed over
micro-batches, all-reduced over data-parallel ranks, divided only when reported, so a mean is
exact whatever the batch split. The last rank (on the last pipeline stage, where losses live)
writes the files.

Keys (the same in metrics.jsonl, TensorBoard, W&B and summary.json, with ``eval_`` for the
validation split and ``train_`` in the summary): ``weighted_ce`` (the loss trained on: PRIOR's
weighted CE, plain CE for ntp; Megatron's iteration line prints it as ``lm loss``), ``ce``
(unweighted CE of all loss tokens), ``ce_<kind>`` (per token kind). What a run has trained on,
as counts of positions of the combined (image + text) sequence, read off its batches
(``PositionCounts``): ``loss_tokens`` (positions whose label carries loss: the D of the scaling
fits), ``masked_positions`` (positions holding a text token whose label carries none: a
caption's last token, whose label is padding or the next packed caption's ``<image>``; a
position whose label is a masked end of document), ``image_positions`` (positions the images
add: each image's stream replaces one ``<image>`` placeholder; a packed row has one per
caption), ``padding_positions`` (positions no sample fills) and ``positions`` (rows times the
combined length: what FLOPs count), with ``positions = loss_tokens + masked_positions +
image_positions + padding_positions``. Throughput: ``positions_per_s`` (image included, as
FLOPs) and ``text_positions_per_s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state

from megatron_prior import parallel
from megatron_prior.files import atomic_write_json
from megatron_prior.models.config import ModelConfig

log = logging.getLogger("megatron_prior.train")

# Peak dense bf16 TFLOP/s by device name, for MFU (None where unknown: MFU is then omitted).
PEAK_TFLOPS_BF16 = {"H100": 989.0, "H200": 989.0, "H800": 989.0, "A100": 312.0, "GH200": 989.0, "B200": 2250.0}


def reduce_logs(outputs: list) -> dict:
    """Sum the per-micro-batch ``[sum, count]`` pairs and all-reduce them over data parallel."""
    if not outputs:
        return {}
    keys = sorted(outputs[0])
    stacked = torch.stack([torch.stack([o[k].float() for k in keys]) for o in outputs]).sum(0)
    stacked = stacked.to(parallel.device(), torch.float64)
    dist.all_reduce(stacked, group=parallel_state.get_data_parallel_group())
    return {k: (float(stacked[i, 0]), float(stacked[i, 1])) for i, k in enumerate(keys)}


def _means(pairs: dict) -> dict:
    return {k: (s / c if c else None) for k, (s, c) in pairs.items()}


def flops_per_iteration(cfg: ModelConfig, parameters: int, args: argparse.Namespace) -> float:
    """Training FLOPs of one iteration: 6 x parameters x tokens for the matrix multiplies
    (forward 2, backward 4), plus attention scores and values, 12 x layers x hidden x seq per
    token; the combined (image + text) sequence counts for the vision-language models."""
    seq = cfg.combined_seq_length
    tokens = args.global_batch_size * seq
    attention = 12 * cfg.num_layers * cfg.hidden_size * seq
    return float(tokens * (6 * parameters + attention))


def peak_flops() -> Optional[float]:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    for key, tflops in PEAK_TFLOPS_BF16.items():
        if key in name:
            return tflops * 1e12
    return None


@dataclass
class PositionCounts:
    """What a run has trained on so far, summed over its iterations from the batches' own counts
    (``PositionCounts.of`` an iteration's logs); a count that a resumed checkpoint did not record
    is None from then on. It travels with the checkpoints, so a resumed run counts the whole run."""

    loss_tokens: Optional[int] = 0
    image_positions: Optional[int] = 0
    padding_positions: Optional[int] = 0

    @classmethod
    def of(cls, logs: dict) -> "PositionCounts":
        """One iteration's counts (already summed over micro-batches and data parallel), on
        every rank: only the last pipeline stage computes the loss and its logs, and rank 0, on
        the first, writes the checkpoint that carries the counts."""
        # The ce pair's count is its loss tokens; the share pairs' sums are their positions.
        pairs = (("ce", 1), ("image_share", 0), ("padding_share", 0))
        counts = torch.tensor([logs[key][i] if key in logs else 0.0 for key, i in pairs], dtype=torch.float64,
                              device=parallel.device())
        dist.all_reduce(counts, group=parallel_state.get_pipeline_model_parallel_group())
        return cls(*(int(c) for c in counts.tolist()))

    @classmethod
    def from_state(cls, state: dict) -> "PositionCounts":
        return cls(*(state.get(f.name) for f in dataclasses.fields(cls)))

    def add(self, other: "PositionCounts") -> None:
        for f in dataclasses.fields(self):
            mine = getattr(self, f.name)
            setattr(self, f.name, None if mine is None else mine + getattr(other, f.name))

    def report(self, cfg: ModelConfig, samples: int) -> dict:
        """``loss_tokens``, ``masked_positions``, ``image_positions``, ``padding_positions`` and
        ``positions`` after ``samples`` training rows; ``masked_positions`` is what the others
        leave of the rows' positions (None where any count is unknown)."""
        positions = samples * cfg.combined_seq_length
        known = [self.loss_tokens, self.image_positions, self.padding_positions]
        return {"loss_tokens": self.loss_tokens,
                "masked_positions": None if None in known else positions - sum(known),
                "image_positions": self.image_positions, "padding_positions": self.padding_positions,
                "positions": positions}


def _loss_order(key: str) -> tuple:
    return (key != "lm loss", key != "ce", key)


def iteration_line(when: datetime.datetime, iteration: int, train_iters: int, consumed_samples: int,
                   iteration_time_s: float, lr: float, global_batch_size: int, losses: dict,
                   loss_scale: float, grad_norm: float, extras: dict) -> str:
    """Megatron-LM's ``training_log`` line, field for field, then this project's ``extras``.

    Log parsers written for Megatron read it unchanged. The skipped and NaN counts are 0 by
    construction: Megatron counts iterations whose optimizer step was skipped (NaN ones among
    them), and this loop stops on a failed step instead of skipping it.
    """
    line = f" [{when:%Y-%m-%d %H:%M:%S}] iteration {iteration:8d}/{train_iters:8d} |"
    line += f" consumed samples: {consumed_samples:12d} |"
    line += f" elapsed time per iteration (ms): {iteration_time_s * 1000.0:.1f} |"
    line += f" learning rate: {lr:.6E} |"
    line += f" global batch size: {global_batch_size:5d} |"
    line += "".join(f" {key}: {losses[key]:.6E} |" for key in sorted(losses, key=_loss_order))
    line += f" loss scale: {loss_scale:.1f} |"
    line += f" grad norm: {grad_norm:.3f} |"
    line += f" number of skipped iterations: {0:3d} |"
    line += f" number of nan iterations: {0:3d} |"
    line += "".join(f" {key}: {value} |" for key, value in extras.items())
    return line


class MetricsLogger:
    def __init__(self, args: argparse.Namespace, model_config: ModelConfig) -> None:
        self.args = args
        self.model_config = model_config
        self.writer_rank = dist.get_rank() == dist.get_world_size() - 1
        self.log_dir = args.log_dir
        self.tensorboard = None
        self.wandb = None
        if self.writer_rank and self.log_dir:
            os.makedirs(self.log_dir, exist_ok=True)
            # A resumed run appends; a fresh run starts a new file.
            mode = "a" if args.load else "w"
            self.jsonl = open(os.path.join(self.log_dir, "metrics.jsonl"), mode)
        else:
            self.jsonl = None
        if self.writer_rank and args.tensorboard_dir:
            # Optional dependency, imported only for --tensorboard-dir (validate_args checked it imports).
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(args.tensorboard_dir)
        if self.writer_rank and args.wandb_project:
            # Optional dependency, imported only for --wandb-project (validate_args checked it imports).
            import wandb

            save_dir = args.wandb_save_dir or (os.path.join(self.log_dir, "wandb") if self.log_dir else None)
            if save_dir:
                os.makedirs(save_dir, exist_ok=True)
            wandb.init(project=args.wandb_project, name=args.wandb_exp_name, dir=save_dir, config=vars(args))
            self.wandb = wandb
        self.peak = peak_flops()
        self.started = time.time()

    def info(self, message: str) -> None:
        if self.writer_rank:
            log.info(message)

    def _emit(self, record: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        scalars = {k: v for k, v in record.items() if k != "iteration" and isinstance(v, (int, float))}
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, record["iteration"])
        if self.wandb is not None:
            self.wandb.log(scalars, step=record["iteration"])

    def log_train(self, iteration: int, window: dict, grad_norm: float, lr: float, samples_per_s: float,
                  flops_per_s: float, consumed_samples: int, counts: PositionCounts, iteration_time_s: float,
                  loss_scale: float) -> dict:
        """Report the iterations since the last report: ``window`` holds their summed loss
        pairs, ``iteration_time_s`` their mean wall time; ``counts`` what the run has trained
        on so far."""
        means = _means(window)
        cfg = self.model_config
        record = {"iteration": iteration, **means, "grad_norm": grad_norm, "lr": lr,
                  "consumed_samples": consumed_samples, **counts.report(cfg, consumed_samples),
                  "iteration_time_ms": iteration_time_s * 1000.0,
                  "positions_per_s": samples_per_s * cfg.combined_seq_length,
                  "text_positions_per_s": samples_per_s * cfg.seq_length, "tflops_per_s": flops_per_s / 1e12}
        world = dist.get_world_size()
        if self.peak:
            record["mfu"] = flops_per_s / (self.peak * world)
        if self.writer_rank:
            extras = {"text positions per second": f"{record['text_positions_per_s']:.0f}",
                      "positions per second (text + image)": f"{record['positions_per_s']:.0f}",
                      "throughput per GPU (TFLOP/s/GPU)": f"{flops_per_s / 1e12 / world:.1f}"}
            if "mfu" in record:
                extras["MFU"] = f"{record['mfu']:.1%}"
            # Megatron's "lm loss" is the loss trained on.
            losses = {("lm loss" if k == "weighted_ce" else k): v for k, v in means.items() if v is not None}
            # Megatron prints it from the last rank with print(): stdout, whatever the logging set-up.
            print(iteration_line(
                datetime.datetime.now(), iteration, self.args.train_iters, consumed_samples, iteration_time_s, lr,
                self.args.global_batch_size, losses, loss_scale, grad_norm, extras), flush=True)
            self._emit(record)
        return record

    def log_eval(self, iteration: int, totals: dict) -> dict:
        means = _means(totals)
        record = {"iteration": iteration, **{f"eval_{k}": v for k, v in means.items()}}
        if self.writer_rank:
            log.info(f"validation at iteration {iteration}: ce {means.get('ce', float('nan')):.4f}, "
                     f"weighted_ce {means.get('weighted_ce', float('nan')):.4f}")
            self._emit(record)
        return {"iteration": iteration, "means": means}

    def write_summary(self, iterations: int, samples: int, counts: PositionCounts, last_train: Optional[dict],
                      last_eval: Optional[dict], flops: float, parameters: int, wall_time_s: float,
                      iterations_this_run: int) -> dict:
        """``summary.json``: the last logged training losses (``train_<key>``), the last
        validation (``eval_<key>``), what the run trained on (``PositionCounts.report``) and how."""
        loss_keys = [k for k in (last_train or {}) if k == "weighted_ce" or k == "ce" or k.startswith("ce_")]
        summary = {
            "iterations": iterations,
            "samples": samples,
            **counts.report(self.model_config, samples),
            **{f"train_{k}": last_train[k] for k in loss_keys},
            **{f"eval_{k}": v for k, v in (last_eval or {}).get("means", {}).items()},
            "flops": flops,
            "parameters": parameters,
            "wall_time_s": wall_time_s,
            "iterations_this_run": iterations_this_run,
            "model": self.args.model,
            "loss": self.args.loss,
            "prior_alpha": self.args.prior_alpha,
            "mi_floor": self.args.mi_floor,
            "rho1_ratio": self.args.rho1_ratio,
            "seed": self.args.seed,
            "model_config": self.model_config.to_dict(),
        }
        if self.writer_rank and self.log_dir:
            # A diverged run still gets its summary (NaN losses included), as before.
            atomic_write_json(os.path.join(self.log_dir, "summary.json"), summary, sort_keys=False,
                              allow_nan=True)
        self.close()
        return summary

    def close(self) -> None:
        """Flush and close every sink (a run stopped early closes them without a summary)."""
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
