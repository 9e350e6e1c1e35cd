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
from typing import Any, Callable, Optional, Sequence

from megatron.core.transformer.enums import AttnBackend

from megatron_prior.checkpoint import CheckpointError, checkpoint_dir, read_model_config
from megatron_prior.compat import have_transformer_engine
from megatron_prior.data.formats import FormatError
from megatron_prior.data.images import ASPECTS, stored_images
from megatron_prior.loss import LOSSES
from megatron_prior.models import packed
from megatron_prior.models.arch import ARCHS, get_arch
from megatron_prior.models.config import PRESETS, ModelConfig
from megatron_prior.parallel import launch_info
from megatron_prior.tokenizer import (SPECIAL_TOKENS_HELP, TOKENIZER_TYPES, infer_tokenizer_type, load_tokenizer,
                                      parse_special_tokens, require_local)


class ArgumentError(ValueError):
    """A bad flag or flag combination; the message names the flags."""


class FlagParser(argparse.ArgumentParser):
    """argparse with a one-line error (the trainer's and the other commands that share its flags)."""

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
                     "seq_length", "train_iters", "train_samples", "lr_decay_iters", "save_interval",
                     "eval_interval", "log_interval", "exit_interval", "context_parallel_size",
                     "recompute_num_layers", "num_query_groups", "image_size"], AT_LEAST_1),
    **dict.fromkeys(["lr_warmup_iters", "eval_iters", "num_workers"], NON_NEGATIVE),
    **dict.fromkeys(["lr", "min_lr", "weight_decay", "clip_grad", "prior_alpha"], NON_NEGATIVE),
    "mi_floor": POSITIVE,  # 0 would let a caption's weights all vanish (fallback 1) token by token
    "rho1_ratio": Domain(low=0, high=1, low_open=True),
    **dict.fromkeys(["hidden_dropout", "attention_dropout", "adam_beta1", "adam_beta2"], FRACTION),
    **dict.fromkeys(["init_method_std", "norm_epsilon", "rotary_base", "rope_scaling_factor"], POSITIVE),
    "adam_eps": POSITIVE,
    "exit_duration_in_mins": POSITIVE,  # 0 makes every weight matrix zero: no symmetry to break
    "seed": Domain(low=0, high=2 ** 32 - 1),  # numpy's RandomState (megatron-core's datasets)
}


def check_domains(args: argparse.Namespace, domains: Optional[dict[str, Domain]] = None) -> None:
    """Refuse a numeric flag outside its domain (``DOMAINS`` and ``domains``; flags a tool does
    not have are skipped), naming the flag."""
    for dest, domain in {**DOMAINS, **(domains or {})}.items():
        value = getattr(args, dest, None)
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
    p = FlagParser(
        prog="python -m megatron_prior.train",
        description="Train a text-only reference LM or a vision-language model (--model) "
        "with next-token prediction (--loss ntp), PRIOR (--loss prior) or another token weighting "
        "(--loss mi, rho1, cal) on megatron-core, with "
        "tensor, pipeline and data parallelism. Launch with torchrun (or srun) for more than one process.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--model", choices=list(ARCHS), default="gpt",
                   help="architecture: " + "; ".join(f"{a.name}: {a.description}" for a in ARCHS.values()))
    g.add_argument("--model-size", choices=sorted(PRESETS), default=None,
                   help="size preset (num layers / hidden / heads); explicit flags override it")
    g.add_argument("--num-layers", type=int, default=None, help="transformer layers of the language model")
    g.add_argument("--hidden-size", type=int, default=None, help="width of the language model")
    g.add_argument("--num-attention-heads", type=int, default=None,
                   help="attention heads of the language model (must divide --hidden-size)")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default 4 x hidden size")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: the model's sequence length (text + image positions)")
    # The language model's shape flags default to None: unset, they come from --lm-load's checkpoint when
    # one is given (LM_SHAPE_FLAGS), else from LM_SHAPE_DEFAULTS.
    g.add_argument("--position-embedding-type", choices=["rope", "learned_absolute"], default=None,
                   help="rotary or learned absolute positions (the U-LVLM needs rope); default rope")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", default=None,
                   help="separate input embedding and output layer weights (default: shared)")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default=None,
                   help="normalisation layers of the language model; default LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=None,
                   help="epsilon of the language model's LayerNorm/RMSNorm; default 1e-5")
    g.add_argument("--swiglu", action="store_true", default=None,
                   help="SwiGLU MLP (SiLU-gated, as Llama); --ffn-hidden-size is then the gate's width")
    g.add_argument("--group-query-attention", action="store_true", default=None,
                   help="grouped-query attention: --num-query-groups key/value heads shared by the query heads")
    g.add_argument("--num-query-groups", type=int, default=None,
                   help="with --group-query-attention: key/value heads (must divide --num-attention-heads; "
                        "default 1)")
    g.add_argument("--rotary-base", type=int, default=None,
                   help="base of the rotary embedding's periods; default 10000")
    g.add_argument("--use-rope-scaling", action="store_true", default=None,
                   help="Llama 3.1's scaling of the rotary frequencies (by --rope-scaling-factor)")
    g.add_argument("--rope-scaling-factor", type=float, default=None,
                   help="with --use-rope-scaling: the factor; default 8")
    g.add_argument("--disable-bias-linear", action="store_true", default=None,
                   help="no biases in the language model's linear layers (Llama)")
    g.add_argument("--add-qkv-bias", action="store_true", default=None,
                   help="biases on the query/key/value projection even with --disable-bias-linear (Qwen2)")
    g.add_argument("--lm-load", default=None,
                   help="initialise the language model (of every --model) from this GPT checkpoint, converted "
                        "(tools/convert_hf_to_megatron.py) or trained here: weights only, no optimizer, iteration "
                        "or RNG state. Its model_config.json supplies the shape flags above that are not given "
                        "(given ones must agree); vocabulary rows the run adds keep their initialisation. "
                        "Skipped when --load holds a checkpoint: resuming wins, as in Megatron-LM")
    g.add_argument("--patch-size", type=int, default=None, help="image patch side (ViT and U-LVLM); default 8")
    g.add_argument("--vit-num-layers", type=int, default=None, help="H-LVLM: transformer layers of the ViT; default 2")
    g.add_argument("--vit-hidden-size", type=int, default=None, help="H-LVLM: width of the ViT; default 64")
    g.add_argument("--vit-num-attention-heads", type=int, default=None,
                   help="H-LVLM: attention heads of the ViT; default 4")
    g.add_argument("--vit-load", default=None,
                   help="H-LVLM: load the vision encoder from this checkpoint (an H-LVLM's, or a CLIP tower converted "
                        "by tools/convert_hf_to_megatron.py); its model_config.json supplies the ViT flags above "
                        "that are not given (given ones must agree) and the ViT's activation")
    g.add_argument("--freeze-vit", action="store_true", help="H-LVLM: do not train the vision encoder")
    g.add_argument("--freeze-lm", action="store_true", help="H-LVLM: do not train the language model")

    g = p.add_argument_group("parallelism and precision")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="ranks each layer's matrices are split over (Megatron tensor parallelism)")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="pipeline stages the layers are split into (must divide --num-layers)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="interleaved pipeline: layers per virtual stage, each rank holding several (GPT only)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and compute (fp32 main grads)")
    g.add_argument("--fp8-format", choices=["hybrid", "e4m3"], default=None,
                   help="FP8 through Transformer Engine's layer spec (Hopper GPUs with TE installed)")
    g.add_argument("--fused-linear-ce", action="store_true",
                   help="output layer + weighted cross-entropy chunk by chunk, never materialising logits")
    g.add_argument("--transformer-impl", choices=["transformer_engine", "local"], default=None,
                   help="layer implementation: Transformer Engine's fused layers or megatron-core's local ones "
                        "(default: transformer_engine where it imports, else local)")
    g.add_argument("--attention-backend", choices=[b.name for b in AttnBackend], default="auto",
                   help="attention kernel (megatron-core's AttnBackend); flash, fused and unfused are Transformer "
                        "Engine's, local is megatron-core's own (needs --transformer-impl local)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="shard the optimizer state (fp32 main params, Adam moments) over data-parallel ranks")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce gradient buckets during the backward pass instead of after it")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="gather the updated parameters during the next forward pass (needs "
                        "--use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="split layer norms, dropout and the activations between them along the sequence over "
                        "tensor-parallel ranks (needs --tensor-model-parallel-size > 1)")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="split every sequence over this many ranks (attention through Transformer Engine)")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation recomputation: full recomputes whole transformer layers (with "
                        "--recompute-method and --recompute-num-layers), selective only core attention")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="with --recompute-granularity full: uniform recomputes groups of --recompute-num-layers "
                        "layers, block the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None,
                   help="layers per recomputed group (uniform) or recomputed layers per stage (block)")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, default=4, help="samples per forward/backward pass on one rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--seq-length", type=int, default=128, help="text tokens per sample")
    g.add_argument("--train-iters", type=int, required=False, default=None,
                   help="iterations to train (or --train-samples)")
    g.add_argument("--train-samples", type=int, default=None,
                   help="samples to train: --train-samples // --global-batch-size iterations (or --train-iters)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (required)")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of the decay")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="cosine", help="learning-rate decay from --lr to --min-lr over --lr-decay-iters")
    g.add_argument("--lr-warmup-iters", type=int, default=0, help="iterations of linear warm-up from 0")
    g.add_argument("--lr-decay-iters", type=int, default=None, help="default: --train-iters")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="Adam's first-moment decay")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="Adam's second-moment decay")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="Adam's epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="clip the global gradient norm to this (0: no clipping)")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="standard deviation of the initial weights (output projections: / sqrt(2 x layers))")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="dropout after attention and MLP")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on the attention probabilities")
    g.add_argument("--seed", type=int, default=1234, help="initial weights, data order and dropout")

    g = p.add_argument_group("loss")
    g.add_argument("--loss", choices=LOSSES, default="ntp",
                   help="ntp: plain next-token prediction; prior: w = (1 - p_ref) ** alpha from the reference "
                        "log-probs; mi: w = max(log p(t | image) - log p_ref(t), --mi-floor), the image-conditioned "
                        "log-probs of tools/score_with_images.py; cal: w = clamp(logit with the image - logit "
                        "without, 1, 5), from the same tool (prior, mi and cal normalised per caption); rho1: "
                        "the --rho1-ratio share of each micro-batch's tokens with the largest excess loss "
                        "(model CE + log p_ref) weigh 1, the rest 0 (Rho-1)")
    g.add_argument("--prior-alpha", type=float, default=1.0, help="w = (1 - p_ref) ** alpha (paper: 1; > 2 hurts)")
    g.add_argument("--mi-floor", type=float, default=0.1,
                   help="--loss mi: w = max(pmi, floor), > 0; a scorer that ignores the image (pmi <= floor "
                        "everywhere) gives every token the same weight, i.e. NTP")
    g.add_argument("--rho1-ratio", type=float, default=0.6,
                   help="--loss rho1: the share of each micro-batch's loss tokens kept, in (0, 1] (Rho-1: 0.6-0.7; "
                        "1 is NTP); selected per micro-batch on each data-parallel rank")
    g.add_argument("--eod-mask-loss", dest="mask_eod", action="store_true",
                   help="leave the end-of-document token out of the loss (default: trained on, as Megatron)")
    g.add_argument("--check-loss-inputs", action="store_true",
                   help="debugging: check label ids, loss mask, token kinds and PRIOR weights inside the loss "
                        "on every micro-batch (a device sync each; the data are checked when loaded anyway)")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", nargs="+", default=None,
                   help="token prefixes, optionally weighted (a Megatron blend): 'P1', 'P1 P2' (equal weights) "
                        "or '0.7 P1 0.3 P2'")
    g.add_argument("--image-size", type=int, default=None,
                   help="vision-language models: side of the square images trained on (default: the size the "
                        "image stores were preprocessed to). An encoded store (--image-store encoded, the default "
                        "of tools/preprocess_with_weights.py) is decoded to it when batches are made, so one "
                        "preprocessing serves several sizes; a raw store's pixels are fixed, so another size is "
                        "refused")
    g.add_argument("--image-aspect", choices=ASPECTS, default=None,
                   help="vision-language models: how images are fitted to --image-size: pad (to square with CLIP's "
                        "mean colour, as LLaVA), crop (resize to cover, centre crop) or stretch (default: the rule "
                        "the stores were preprocessed with); a raw store takes only its own rule")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions")
    g.add_argument("--tokenizer-model", default=None,
                   help="SentencePiece .model (tools/train_tokenizer.py) or HuggingFace tokenizer (a local "
                        "save_pretrained directory, or a bare tokenizer.json)")
    g.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="default: from --tokenizer-model's name (tokenizer.json or a folder holding one: "
                        "HuggingFaceTokenizer, else SentencePieceTokenizer)")
    g.add_argument("--special-tokens", type=parse_special_tokens, default=None, help=SPECIAL_TOKENS_HELP)
    g.add_argument("--data-cache-path", default=None, help="where megatron-core caches dataset indices")
    g.add_argument("--num-workers", type=int, default=0,
                   help="DataLoader worker processes per rank that read and pack batches ahead of the "
                        "step (0: in the training process)")
    g.add_argument("--pack-samples", action="store_true",
                   help="pack several samples into each row of --seq-length (whole captions for --model gpt, captions "
                        "with their images for the vision-language models, the image positions counted), in order, "
                        "attention and positions kept within each sample, instead of one padded sample a row; "
                        "Transformer Engine then takes --micro-batch-size 1 (as NeMo's sequence packing)")

    g = p.add_argument_group("checkpointing and logging")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--load", default=None, help="resume from this directory (latest checkpoint)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="save a checkpoint every this many iterations (and at the end)")
    g.add_argument("--eval-interval", type=int, default=100,
                   help="evaluate on the validation split every this many iterations (and at the end)")
    g.add_argument("--eval-iters", type=int, default=10, help="0 turns evaluation off")
    g.add_argument("--log-interval", type=int, default=10,
                   help="print the iteration line and log metrics every this many iterations")
    g.add_argument("--log-dir", default=None, help="metrics.jsonl and summary.json (default: --save)")
    g.add_argument("--tensorboard-dir", default=None, help="also log every scalar to TensorBoard in this directory")
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


def add_trainer_flags(group: argparse._ArgumentGroup, dests: Sequence[str]) -> None:
    """Give another tool's parser (``group``) these flags as the trainer defines them (names,
    types, defaults, help), so a flag means the same in both. argparse's ``parents=`` shares
    actions the same way, but only whole parsers."""
    actions = {action.dest: action for action in build_parser()._actions}
    for dest in dests:
        group._add_action(actions[dest])


def _is_number(item: str) -> bool:
    try:
        float(item)
    except ValueError:
        return False
    return True


def _blend_prefixes(data_path: Sequence[str]) -> list[str]:
    """The prefixes of a Megatron blend: 'P1 P2 ...' (equal weights) or 'w1 P1 w2 P2 ...'
    (megatron-core's get_blend_from_list reads both; weights are told apart by parsing)."""
    items = list(data_path)
    if not _is_number(items[0]):
        return items
    if len(items) % 2:
        raise ArgumentError(f"--data-path: a weighted blend needs weight/prefix pairs, got {len(items)} items")
    prefixes = []
    for weight, prefix in zip(items[0::2], items[1::2]):
        try:
            if float(weight) < 0:
                raise ValueError
        except ValueError:
            raise ArgumentError(f"--data-path: {weight!r} is not a non-negative blend weight") from None
        prefixes.append(prefix)
    return prefixes


def check_tokenizer(path: str, tokenizer_type: Optional[str], special_tokens: Optional[dict]) -> None:
    try:
        require_local(path, "--tokenizer-model")
    except FileNotFoundError as err:
        raise ArgumentError(str(err)) from None
    if tokenizer_type is not None:
        inferred = infer_tokenizer_type(path)
        if inferred != tokenizer_type:
            raise ArgumentError(f"--tokenizer-type {tokenizer_type}: --tokenizer-model {path} is a {inferred} file "
                                "(a HuggingFaceTokenizer is a tokenizer.json or a folder holding one)")
    try:
        load_tokenizer(path, tokenizer_type, special_tokens)
    # SentencePiece raises RuntimeError for a file it cannot parse, HuggingFace's tokenizers
    # a bare Exception, a missing special piece ValueError: whatever it is, the file is wrong.
    except Exception as err:  # noqa: BLE001
        raise ArgumentError(f"--tokenizer-model {path}: not a tokenizer this trainer can use (a SentencePiece "
                            f".model from tools/train_tokenizer.py or a HuggingFace tokenizer.json): {err}") from None


def _check_transformer_impl(args: argparse.Namespace) -> None:
    te = have_transformer_engine()
    if args.transformer_impl is None:
        args.transformer_impl = "transformer_engine" if te else "local"
    elif args.transformer_impl == "transformer_engine" and not te:
        raise ArgumentError("--transformer-impl transformer_engine: Transformer Engine does not import here "
                            "(pip install transformer_engine, or the NGC PyTorch image of the Dockerfile); "
                            "--transformer-impl local runs megatron-core's own layers")
    local = args.transformer_impl == "local"
    if local and args.attention_backend not in ("auto", "local"):
        raise ArgumentError(f"--attention-backend {args.attention_backend} is a Transformer Engine kernel: it needs "
                            "--transformer-impl transformer_engine")
    if not local and args.attention_backend == "local":
        raise ArgumentError("--attention-backend local is only supported with --transformer-impl local")
    if args.fp8_format is not None:
        if local:
            raise ArgumentError(f"--fp8-format {args.fp8_format} needs --transformer-impl transformer_engine"
                                + ("" if te else ", and Transformer Engine does not import here (FP8 runs on "
                                   "Hopper GPUs with TE, e.g. the NGC image of the Dockerfile)"))
        if not args.bf16:
            raise ArgumentError("--fp8-format needs --bf16 (FP8 GEMMs with bf16 parameters)")


def _check_scale_features(args: argparse.Namespace) -> None:
    """Megatron-LM's rules for the distributed optimizer, overlaps, SP, CP and recomputation,
    refused here instead of megatron-core asserting after the model is built."""
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ArgumentError("--overlap-param-gather needs --use-distributed-optimizer")
    if args.overlap_param_gather and not args.overlap_grad_reduce:
        raise ArgumentError("--overlap-param-gather needs --overlap-grad-reduce")
    local = args.transformer_impl == "local"
    if args.sequence_parallel:
        if args.tensor_model_parallel_size == 1:
            raise ArgumentError("--sequence-parallel needs --tensor-model-parallel-size > 1 (it splits what "
                                "tensor parallelism leaves replicated)")
        if not get_arch(args.model).supports_sequence_parallel:
            # The vision-language models assemble their image + text stream themselves, where
            # GPTModel's embedding would scatter it over the sequence-parallel ranks.
            able = " or ".join(a.name for a in ARCHS.values() if a.supports_sequence_parallel)
            raise ArgumentError(f"--sequence-parallel is supported for --model {able} only (--model {args.model} "
                                "does not split its image + text sequence)")
        if local:
            # megatron-core's local spec norms with torch's LayerNorm (apex's fused one only with
            # CUDA), which asserts it does not support sequence parallelism.
            raise ArgumentError("--sequence-parallel needs --transformer-impl transformer_engine: megatron-core's "
                                "local layers use torch's LayerNorm, which does not support sequence parallelism")
    if args.context_parallel_size > 1:
        # megatron-core's local attention asserts CP == 1; with TE the forward step would also
        # have to cut each batch into this rank's sequence chunks (get_batch_on_this_cp_rank).
        raise ArgumentError("--context-parallel-size > 1 is not supported yet: the batches are not split over "
                            "context-parallel ranks (and megatron-core's local attention, "
                            "--transformer-impl local, does not support it at all)")
    if args.recompute_granularity == "full":
        if args.recompute_method is None or args.recompute_num_layers is None:
            raise ArgumentError("--recompute-granularity full needs --recompute-method (uniform or block) and "
                                "--recompute-num-layers")
        per_stage = args.num_layers // args.pipeline_model_parallel_size
        if args.recompute_num_layers > per_stage:
            raise ArgumentError(f"--recompute-num-layers {args.recompute_num_layers} is more than the {per_stage} "
                                "layers of a pipeline stage")
    else:
        for flag, value in (("--recompute-method", args.recompute_method),
                            ("--recompute-num-layers", args.recompute_num_layers)):
            if value is not None:
                raise ArgumentError(f"{flag} needs --recompute-granularity full "
                                    f"(got {args.recompute_granularity or 'no recomputation'})")


# The language model's shape flags (argparse dests), each with how a ModelConfig holds it.
LM_SHAPE_FLAGS: dict[str, Callable[[ModelConfig], Any]] = {
    "num_layers": lambda c: c.num_layers,
    "hidden_size": lambda c: c.hidden_size,
    "num_attention_heads": lambda c: c.num_attention_heads,
    "ffn_hidden_size": lambda c: c.ffn_hidden_size or 4 * c.hidden_size,
    "position_embedding_type": lambda c: c.position_embedding_type,
    "untie_embeddings_and_output_weights": lambda c: not c.share_embeddings_and_output_weights,
    "normalization": lambda c: c.normalization,
    "norm_epsilon": lambda c: c.norm_epsilon,
    "swiglu": lambda c: c.swiglu,
    "group_query_attention": lambda c: c.num_query_groups is not None,
    "num_query_groups": lambda c: c.num_query_groups,
    "rotary_base": lambda c: c.rotary_base,
    "use_rope_scaling": lambda c: c.rope_scaling,
    "rope_scaling_factor": lambda c: c.rope_scaling_factor,
    "disable_bias_linear": lambda c: not c.add_bias_linear,
    "add_qkv_bias": lambda c: c.add_qkv_bias,
}
# Their values without --lm-load (a ModelConfig's defaults, so older runs build as before).
LM_SHAPE_DEFAULTS = dict(position_embedding_type="rope", untie_embeddings_and_output_weights=False,
                         normalization="LayerNorm", norm_epsilon=1e-5, swiglu=False, group_query_attention=False,
                         rotary_base=10000, use_rope_scaling=False, rope_scaling_factor=8.0,
                         disable_bias_linear=False, add_qkv_bias=False)


# The H-LVLM's vision encoder, likewise from --vit-load (the encoder type, vit_activation, its
# LayerNorm epsilon and the pixel normalisation have no flags: they come with the encoder's
# checkpoint, e.g. a converted CLIP's quick GELU and CLIP's mean and std, or SigLIP's).
VIT_SHAPE_FLAGS: dict[str, Callable[[ModelConfig], Any]] = {
    "vit_num_layers": lambda c: c.vit_num_layers,
    "vit_hidden_size": lambda c: c.vit_hidden_size,
    "vit_num_attention_heads": lambda c: c.vit_num_attention_heads,
    "patch_size": lambda c: c.patch_size,
    "vision_model_type": lambda c: c.vision_model_type,
    "vit_activation": lambda c: c.vit_activation,
    "vit_norm_epsilon": lambda c: c.vit_norm_epsilon,
    "image_mean": lambda c: c.image_mean,
    "image_std": lambda c: c.image_std,
    # Its position embedding has one row per patch: the encoder takes the image size it was built for.
    "image_size": lambda c: c.image_size,
}
VIT_SHAPE_DEFAULTS = dict(vit_num_layers=2, vit_hidden_size=64, vit_num_attention_heads=4, patch_size=8,
                          vision_model_type="clip", vit_activation="gelu", vit_norm_epsilon=1e-5,
                          image_mean=[0.0, 0.0, 0.0], image_std=[1.0, 1.0, 1.0])


def shape_from_checkpoint(args: argparse.Namespace, flag: str, fields: dict) -> ModelConfig:
    """Unset shape flags from the model_config.json of the checkpoint ``flag`` names; a given
    flag must agree with it. Returns that config."""
    load = getattr(args, flag.lstrip("-").replace("-", "_"))
    try:
        saved = read_model_config(checkpoint_dir(load))
    except CheckpointError as err:
        raise ArgumentError(f"{flag} {load}: {err}") from None
    disagree = []
    for dest, value_of in fields.items():
        value = value_of(saved)
        given = getattr(args, dest, None)
        if given is None:
            setattr(args, dest, value)
        elif given != value:
            disagree.append(f"--{dest.replace('_', '-')} {given} (checkpoint: {value})")
    if disagree:
        raise ArgumentError(f"{flag} {load}: shape flags disagree with its model_config.json: {'; '.join(disagree)} "
                            "(leave them out to take the checkpoint's)")
    return saved


def _check_lm_shape(args: argparse.Namespace) -> None:
    for dest, value in {**LM_SHAPE_DEFAULTS, **VIT_SHAPE_DEFAULTS}.items():
        if getattr(args, dest, None) is None:
            setattr(args, dest, value)
    if args.group_query_attention:
        if args.num_query_groups is None:
            args.num_query_groups = 1  # Megatron-LM's default: multi-query attention
        if args.num_attention_heads % args.num_query_groups:
            raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                                f"--num-query-groups {args.num_query_groups}")
        if args.num_query_groups % args.tensor_model_parallel_size:
            raise ArgumentError(f"--num-query-groups {args.num_query_groups} is not divisible by "
                                f"--tensor-model-parallel-size {args.tensor_model_parallel_size}")
    elif args.num_query_groups is not None:
        raise ArgumentError("--num-query-groups needs --group-query-attention")
    if args.add_qkv_bias and not args.disable_bias_linear:
        raise ArgumentError("--add-qkv-bias needs --disable-bias-linear (without it every linear layer has biases)")


def resolve_images(args: argparse.Namespace, prefixes: list[str], size_from: str, flag: str = "--data-path") -> None:
    """``--image-size`` and ``--image-aspect`` of a vision-language model: unset, the image
    stores' (one square size for the whole blend; their rule when they share one, else each
    store keeps its own); set, every raw store must already hold them. ``size_from`` names where
    a set size came from, ``flag`` the flag that gave ``prefixes``."""
    try:
        stores = [stored_images(prefix) for prefix in prefixes]
    except FormatError as err:
        raise ArgumentError(f"{flag}: {err}") from None
    if args.image_size is None:
        sizes = sorted({(store.height, store.width) for store in stores})
        if len(sizes) > 1:
            raise ArgumentError(f"{flag}: the blended image stores hold images of different sizes {sizes}: "
                                "give --image-size N (encoded stores are decoded to it)")
        (height, width), = sizes
        if height != width:
            raise ArgumentError(f"{flag}: images are {height}x{width}; the models take square images: give "
                                "--image-size N (an encoded store is decoded to N x N)")
        args.image_size, size_from = height, f"the images of {flag} {prefixes[0]}"
    if args.image_aspect is None:
        aspects = {store.aspect for store in stores}
        args.image_aspect = aspects.pop() if len(aspects) == 1 else None
    for store in stores:
        aspect = args.image_aspect or store.aspect
        problem = store.refit_problem(args.image_size, args.image_size, aspect)
        if problem:
            square = (args.image_size, args.image_size)
            flags = [f"{size_from} {args.image_size}"] if (store.height, store.width) != square else []
            flags += [f"--image-aspect {aspect}"] if aspect != store.aspect else []
            raise ArgumentError(f"{', '.join(flags)}: {problem}")
    if args.image_size % args.patch_size:
        raise ArgumentError(f"image size {args.image_size} ({size_from}) is not divisible by --patch-size "
                            f"{args.patch_size}")


def validate_args(args: argparse.Namespace, world_size: Optional[int] = None) -> argparse.Namespace:
    """Fill defaults that depend on other flags and refuse bad combinations."""
    world_size = world_size or launch_info().world_size
    # Where the image size comes from: the flag, else --vit-load (it is a ViT shape flag), else
    # the image stores (_resolve_images).
    size_from = "--image-size" if args.image_size is not None else f"--vit-load {args.vit_load}'s image size"
    args.lm_load_vocab_size = None
    if args.lm_load is not None:
        args.lm_load_vocab_size = shape_from_checkpoint(args, "--lm-load", LM_SHAPE_FLAGS).vocab_size
    if args.vit_load is not None:
        shape_from_checkpoint(args, "--vit-load", VIT_SHAPE_FLAGS)
    preset = PRESETS.get(args.model_size, {}) if args.model_size else {}
    for key in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size"):
        if getattr(args, key) is None and key in preset:
            setattr(args, key, preset[key])
    missing = [f"--{k.replace('_', '-')}" for k in ("num_layers", "hidden_size", "num_attention_heads")
               if getattr(args, k) is None]
    if missing:
        raise ArgumentError(f"{', '.join(missing)} not set: give them or a --model-size preset")
    if (args.train_iters is None) == (args.train_samples is None):
        raise ArgumentError("give one of --train-iters and --train-samples")
    if args.lr is None:
        raise ArgumentError("--lr is required (Megatron has no default learning rate)")
    arch = get_arch(args.model)
    check_domains(args)
    if split_shares(args.split)[1] == 0 and args.eval_iters > 0:
        raise ArgumentError(f"--split {args.split!r} leaves no validation data for --eval-iters {args.eval_iters}: "
                            "give it a validation share or pass --eval-iters 0")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    tp, pp, cp = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.context_parallel_size
    if world_size % (tp * pp * cp):
        raise ArgumentError(f"world size {world_size} is not divisible by --tensor-model-parallel-size {tp} "
                            f"x --pipeline-model-parallel-size {pp}"
                            + (f" x --context-parallel-size {cp}" if cp > 1 else ""))
    args.data_parallel_size = world_size // (tp * pp * cp)
    if args.num_attention_heads % tp:
        raise ArgumentError(f"--num-attention-heads {args.num_attention_heads} is not divisible by "
                            f"--tensor-model-parallel-size {tp}")
    if args.hidden_size % args.num_attention_heads:
        raise ArgumentError(f"--hidden-size {args.hidden_size} is not divisible by "
                            f"--num-attention-heads {args.num_attention_heads}")
    _check_lm_shape(args)
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
        if not arch.supports_virtual_pipeline:
            able = " or ".join(a.name for a in ARCHS.values() if a.supports_virtual_pipeline)
            raise ArgumentError(f"virtual pipeline stages are supported for --model {able} only")
    problem = arch.check_args(args) or packed.check_args(args)
    if problem:
        raise ArgumentError(problem)
    for other in ARCHS.values():
        for dest in other.only_flags:
            if other is not arch and getattr(args, dest) not in (None, False):
                raise ArgumentError(f"--{dest.replace('_', '-')} applies to --model {other.name} only")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size * args.data_parallel_size
    if args.global_batch_size % (args.micro_batch_size * args.data_parallel_size):
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                            f"--micro-batch-size {args.micro_batch_size} x data parallel size "
                            f"{args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // (args.micro_batch_size * args.data_parallel_size)
    if args.train_samples is not None:
        # Megatron-LM without batch-size ramp-up: whole iterations only.
        args.train_iters = args.train_samples // args.global_batch_size
        if args.train_iters == 0:
            raise ArgumentError(f"--train-samples {args.train_samples} is less than one iteration of "
                                f"--global-batch-size {args.global_batch_size}")
    _check_transformer_impl(args)
    _check_scale_features(args)
    if args.data_path is None:
        raise ArgumentError("--data-path is required")
    if args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-model is required")
    check_tokenizer(args.tokenizer_model, args.tokenizer_type, args.special_tokens)
    for prefix in _blend_prefixes(args.data_path):
        for ext in (".bin", ".idx"):
            if not os.path.exists(prefix + ext):
                raise ArgumentError(f"--data-path {prefix}: missing {prefix + ext}")
        images = prefix + ".images"
        if arch.needs_images and not os.path.exists(images):
            raise ArgumentError(f"--model {args.model} trains on captions with images, but --data-path {prefix} "
                                f"has no image store ({images} missing): text-only data trains --model "
                                f"{' or '.join(a.name for a in ARCHS.values() if not a.needs_images)}, "
                                "or preprocess with --image-key")
        if args.loss in ("prior", "mi", "rho1"):
            scores = prefix + ".logprobs.idx"
            if not os.path.exists(scores):
                raise ArgumentError(f"--loss {args.loss} needs reference scores, but {prefix} has none ({scores} "
                                    "missing): run tools/preprocess_with_weights.py with a reference model")
        if args.loss in ("mi", "cal"):
            scores = prefix + ".imglogprobs.idx"
            if not os.path.exists(scores):
                raise ArgumentError(f"--loss {args.loss} needs image-conditioned scores, but {prefix} has none "
                                    f"({scores} missing): run tools/score_with_images.py --data-path {prefix} "
                                    "--load LVLM_CHECKPOINT --tokenizer-model ...")
    if arch.needs_images:
        resolve_images(args, _blend_prefixes(args.data_path), size_from)
    else:
        for flag, value in (("--image-size", args.image_size), ("--image-aspect", args.image_aspect)):
            if value is not None:
                raise ArgumentError(f"{flag} applies to the vision-language models (--model "
                                    f"{' or '.join(a.name for a in ARCHS.values() if a.needs_images)}), not to "
                                    f"--model {args.model}")
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
