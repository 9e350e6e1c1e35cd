"""Megatron-LM's training flags (the subset this fork uses) plus PRIOR's, and their checks.

Every check that can fail runs in ``validate_args`` before any process group, model or data
is built, so a bad combination stops at once with a message that names the flag.
"""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
from dataclasses import dataclass
from typing import Optional, Sequence

from megatron_prior.loss import LOSSES
from megatron_prior.models.config import ARCHITECTURES, PRESETS


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flags."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        # One line, whatever went wrong: the usage of ~80 flags would bury the message.
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")


@dataclass(frozen=True)
class Domain:
    """The values a numeric flag accepts: finite numbers from ``low`` to ``high``."""

    low: float = -math.inf
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        return (math.isfinite(value)
                and (value > self.low if self.low_open else value >= self.low)
                and (value < self.high if self.high_open else value <= self.high))

    def describe(self, integer: bool) -> str:
        lo, hi = (str(int(b)) if math.isfinite(b) and b == int(b) else str(b) for b in (self.low, self.high))
        if math.isinf(self.high):
            bound = f"{'>' if self.low_open else '>='} {lo}"
        else:
            bound = f"in {'(' if self.low_open else '['}{lo}, {hi}{')' if self.high_open else ']'}"
        return bound if integer else f"finite and {bound}"


AT_LEAST_1 = Domain(low=1)
NON_NEGATIVE = Domain(low=0)
POSITIVE = Domain(low=0, low_open=True)
FRACTION = Domain(low=0, high=1, high_open=True)  # dropout, Adam betas: 1 would never update

# Every int and float flag, by dest (tests/test_arguments.py checks none is missing). A value
# outside its domain fails later, far from the flag: --seq-length 0 kills the interpreter with
# SIGFPE in megatron-core's sample-index helper, a zero size divides by zero, a NaN alpha makes
# every PRIOR weight fall back to 1 (plain NTP) without a word.
DOMAINS: dict[str, Domain] = {
    **dict.fromkeys(["num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                     "max_position_embeddings", "patch_size", "vit_num_layers", "vit_hidden_size",
                     "vit_num_attention_heads", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "num_layers_per_virtual_pipeline_stage", "micro_batch_size", "global_batch_size",
                     "seq_length", "train_iters", "lr_decay_iters", "save_interval", "eval_interval",
                     "log_interval", "exit_interval"], AT_LEAST_1),
    **dict.fromkeys(["lr_warmup_iters", "eval_iters", "num_workers"], NON_NEGATIVE),
    **dict.fromkeys(["lr", "min_lr", "weight_decay", "clip_grad", "prior_alpha"], NON_NEGATIVE),
    **dict.fromkeys(["hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"], FRACTION),
    "init_method_std": POSITIVE,
    "exit_duration_in_mins": POSITIVE,  # 0 makes every weight matrix zero: no symmetry to break
    "seed": Domain(low=0, high=2 ** 32 - 1),  # numpy's RandomState (megatron-core's datasets)
}


def _check_domains(args: argparse.Namespace) -> None:
    for dest, domain in DOMAINS.items():
        value = getattr(args, dest)
        if value is not None and value not in domain:
            raise ArgumentError(f"--{dest.replace('_', '-')} must be {domain.describe(isinstance(value, int))}, "
                                f"got {value}")


_SHARE = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*")


def split_shares(split: str) -> list[float]:
    """``--split`` as three shares (train, valid, test; missing ones are 0), refused where
    megatron-core, which reads every run of digits and dots as a number, would divide by a
    zero sum ("0,0,0"), see no numbers at all ("a,b") or misread one ("1e-3" as 1 and 3)."""
    parts = re.split(r"[,/]", split)
    if len(parts) > 3 or not all(_SHARE.fullmatch(part) for part in parts):
        raise ArgumentError(f"--split {split!r}: give up to three non-negative numbers train,valid,test "
                            "(e.g. 969,30,1)")
    shares = [float(part) for part in parts] + [0.0] * (3 - len(parts))
    if shares[0] == 0:
        raise ArgumentError(f"--split {split!r} leaves no training data (its first share is 0)")
    return shares


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m megatron_prior.train",
        description="Train a reference LM (gpt), an H-LVLM (LLaVA-style) or a U-LVLM (encoder-free) "
        "with next-token prediction (--loss ntp) or PRIOR (--loss prior) on megatron-core, with "
        "tensor, pipeline and data parallelism. Launch with torchrun (or srun) for more than one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=ARCHITECTURES, default="gpt", help="architecture")
    g.add_argument("--model-size", choices=sorted(PRESETS), default=None,
                   help="size preset (num layers / hidden / heads); explicit flags override it")
    g.add_argument("--num-layers", type=int, default=None)
    g.add_argument("--hidden-size", type=int, default=None)
    g.add_argument("--num-attention-heads", type=int, default=None)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: the model's sequence length (text + image positions)")
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default="rope")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--patch-size", type=int, default=8, help="image patch side (ViT and U-LVLM)")
    g.add_argument("--vit-num-layers", type=int, default=2)
    g.add_argument("--vit-hidden-size", type=int, default=64)
    g.add_argument("--vit-num-attention-heads", type=int, default=4)
    g.add_argument("--vit-load", default=None, help="H-LVLM: load the vision encoder from this checkpoint")
    g.add_argument("--freeze-vit", action="store_true", help="H-LVLM: do not train the vision encoder")
    g.add_argument("--freeze-lm", action="store_true", help="H-LVLM: do not train the language model")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None)
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (fp32 main grads)")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 through Transformer Engine's layer spec (Hopper GPUs with TE installed)")
    g.add_argument("--fused-linear-ce", action="store_true",
                   help="output layer + weighted cross-entropy chunk by chunk, never materialising logits")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--seq-length", type=int, default=128, help="text tokens per sample")
    g.add_argument("--train-iters", type=int, required=False, default=None)
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine")
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.95)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.0)
    g.add_argument("--attention-dropout", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=1234)

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default="ntp",
                   help="ntp: plain next-token prediction; prior: weights from the reference log-probs")
    g.add_argument("--prior-alpha", type=float, default=1.0, help="w = (1 - p_ref) ** alpha (paper: 1; > 2 hurts)")
    g.add_argument("--no-mask-eod", dest="mask_eod", action="store_false",
                   help="train on the end-of-document token too")
    g.add_argument("--check-loss-inputs", action="store_true",
                   help="debugging: check label ids, loss mask, token kinds and PRIOR weights inside the loss "
                        "on every micro-batch (a device sync each; the data are checked when loaded anyway)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="token prefixes, optionally weighted: 'P1' or '0.7 P1 0.3 P2' (Megatron blend)")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--tokenizer-model", default=None, help="SentencePiece model (tools/train_tokenizer.py)")
    g.add_argument("--data-cache-path", default=None, help="where megatron-core caches dataset indices")
    g.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes per rank that read and pack batches ahead of the "
                        "step (0: in the training process)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this directory (latest checkpoint)")
    g.add_argument("--save-interval", type=int, default=None)
    g.add_argument("--eval-interval", type=int, default=100)
    g.add_argument("--eval-iters", type=int, default=10, help="0 turns evaluation off")
    g.add_argument("--log-interval", type=int, default=10)
    g.add_argument("--log-dir", default=None, help="metrics.jsonl and summary.json (default: --save)")
    g.add_argument("--tensorboard-dir", default=None)
    g.add_argument("--wandb-project", default=None,
                   help="also log every scalar to Weights & Biases, in this project (needs `pip install wandb`)")
    g.add_argument("--wandb-exp-name", default=None, help="the W&B run's name (default: W&B picks one)")
    g.add_argument("--wandb-save-dir", default=None, help="W&B's local files (default: LOG_DIR/wandb)")
    g.add_argument("--exit-interval", type=int, default=None, help="stop (after saving) at this iteration")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on SIGTERM (SLURM's walltime or preemption notice): finish the iteration, save a "
                        "checkpoint, exit 0; every rank stops at the same iteration; resume with --load")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="stop, save and exit 0 after the first iteration that ends past this many minutes "
                        "of wall time (the slowest rank's clock); resume with --load")
    return p


def _blend_prefixes(data_path: Sequence[str]) -> list[str]:
    """The prefixes of a Megatron blend: 'P' or 'w1 P1 w2 P2 ...'."""
    items = list(data_path)
    if len(items) == 1:
        return items
    if len(items) % 2:
        raise ArgumentError(f"--data-path: a blend needs weight/prefix pairs, got {len(items)} items")
    prefixes = []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            if float(weight) < 0:
                raise ValueError
        except ValueError:
            raise ArgumentError(f"--data-path: {weight!r} is not a non-negative blend weight") from None
        prefixes.append(prefix)
    return prefixes


def _check_tokenizer(path: str) -> None:
    from megatron_prior.tokenizer import load_tokenizer

    try:
        load_tokenizer(path)
    # SentencePiece raises RuntimeError for a file it cannot parse, HuggingFace's tokenizers
    # a bare Exception, a missing special piece ValueError: whatever it is, the file is wrong.
    except Exception as err:  # noqa: BLE001
        raise ArgumentError(f"--tokenizer-model {path}: not a tokenizer this trainer can use (a SentencePiece "
                            f".model from tools/train_tokenizer.py or a HuggingFace tokenizer.json): {err}") from None


def world_size_from_env() -> int:
    if "WORLD_SIZE" in os.environ:
        return int(os.environ["WORLD_SIZE"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_NTASKS"])
    return 1


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Fill defaults that depend on other flags and refuse bad combinations."""
    world_size = world_size or world_size_from_env()
    preset = PRESETS.get(args.model_size, {}) if args.model_size else {}
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if getattr(args, key) is None and key in preset:
            setattr(args, key, preset[key])
    missing = [f"--{k.replace('_', '-')}" for k in ("num_layers", "hidden_size", "num_attention_heads")
               if getattr(args, k) is None]
    if missing:
        raise ArgumentError(f"{', '.join(missing)} not set: give them or a --model-size preset")
    if args.train_iters is None:
        raise ArgumentError("--train-iters is required")
    _check_domains(args)
    if split_shares(args.split)[1] == 0 and args.eval_iters > 0:
        raise ArgumentError(f"--split {args.split!r} leaves no validation data for --eval-iters {args.eval_iters}: "
                            "give it a validation share or pass --eval-iters 0")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    tp, pp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size
    if world_size % (tp * pp):
        raise ArgumentError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                            f"x --pipeline-model-parallel-size {pp}")
    args.data_parallel_size = world_size // (tp * pp)
    if args.num_attention_heads % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                            f"--num-attention-heads {args.num_attention_heads}")
    if args.num_layers % pp:
        raise ArgumentError(f"--num-layers {args.num_layers} is not divisible by "
                            f"--pipeline-model-parallel-size {pp}")
    args.virtual_pipeline_model_parallel_size = None
    if args.num_layers_per_virtual_pipeline_stage is not None:
        if pp < 2:
            raise ArgumentError("--num-layers-per-virtual-pipeline-stage needs --pipeline-model-parallel-size >= 2")
        per_stage = args.num_layers // pp
        if per_stage % args.num_layers_per_virtual_pipeline_stage:
            raise ArgumentError(f"--num-layers-per-virtual-pipeline-stage {args.num_layers_per_virtual_pipeline_stage} "
                                f"does not divide the {per_stage} layers of a pipeline stage")
        args.virtual_pipeline_model_parallel_size = per_stage // args.num_layers_per_virtual_pipeline_stage
        if args.model != "gpt":
            raise ArgumentError("virtual pipeline stages are supported for --model gpt only")
    if args.model == "hlvlm" and args.vit_num_attention_heads % tp:
        raise ArgumentError(f"--vit-num-attention-heads {args.vit_num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                            f"--micro-batch-size {args.micro_batch_size} x data parallel size "
                            f"{args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    if args.fp8_format is not None:
        from megatron_prior.compat import have_transformer_engine

        if not have_transformer_engine():
            raise ArgumentError(f"--fp8-format {args.fp8_format} needs Transformer Engine, which does not "
                                "import here (FP8 runs on Hopper GPUs with TE, e.g. the NGC image of the Dockerfile)")
        if not args.bf16:
            raise ArgumentError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 parameters)")
    if args.freeze_vit and args.model != "hlvlm":
        raise ArgumentError("--freeze-vit applies to --model hlvlm only")
    if args.data_path is None:
        raise ArgumentError("--data-path is required")
    if args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-model is required")
    if not os.path.exists(args.tokenizer_model):
        raise ArgumentError(f"--tokenizer-model {args.tokenizer_model}: no such file")
    _check_tokenizer(args.tokenizer_model)
    for prefix in _blend_prefixes(args.data_path):
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ArgumentError(f"--data-path {prefix}: missing {prefix + ext}")
        images = prefix + ".images"
        if args.model != "gpt" and not os.path.exists(images):
            raise ArgumentError(f"--model {args.model} trains on captions with images, but --data-path {prefix} "
                                f"has no image store ({images} missing): text-only data trains --model gpt, "
                                "or preprocess with --image-key")
        if args.loss == "prior":
            scores = prefix + ".logprobs.idx"
            if not os.path.exists(scores):
                raise ArgumentError(f"--loss prior needs reference scores, but {prefix} has none ({scores} "
                                    "missing): run tools/preprocess_with_weights.py with a reference model")
    for flag, value, module, package in (("--tensorboard-dir", args.tensorboard_dir, "torch.utils.tensorboard",
                                          "tensorboard"), ("--wandb-project", args.wandb_project, "wandb", "wandb")):
        if value is not None:
            try:
                importlib.import_module(module)
            except ImportError as err:
                raise ArgumentError(f"{flag} needs {package}, which does not import here ({err}): "
                                    f"pip install {package}") from None
    for flag, value in (("--save-interval", args.save_interval), ("--exit-signal-handler", args.exit_signal_handler),
                        ("--exit-duration-in-mins", args.exit_duration_in_mins)):
        if value not in (None, False) and args.save is None:
            raise ArgumentError(f"{flag} needs --save (the checkpoint to resume from)")
    if args.log_dir is None:
        args.log_dir = args.save
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        # megatron-core's scheduler asserts it once the model is built.
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
                            f"{args.lr_decay_iters} (default: --train-iters)")
    return args


def parse_args(argv: Optional[Sequence[str]] = None, world_size: Optional[int] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate_args(args, world_size)
    except ArgumentError as err:
        parser.error(str(err))
