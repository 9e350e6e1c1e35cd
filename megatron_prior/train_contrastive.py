"""``python -m megatron_prior.train_contrastive``: pre-train the H-LVLM's vision encoder on
image-caption pairs with CLIP's contrastive loss, and measure what its features carry.

    python -m megatron_prior.train_contrastive --data-path data/train_caption_document \\
        --tokenizer-model data/tokenizer.model --micro-batch-size 64 --train-iters 500 --lr 1e-3 \\
        --save runs/clip --eval-data-path data/heldout_caption_document \\
        --train-labels data/train.jsonl --eval-labels data/heldout.jsonl
    python -m megatron_prior.train --model hlvlm --vit-load runs/clip --freeze-vit ...

The model is ``models.contrastive.ContrastiveModel``: megatron-core's CLIPViTModel built as the
H-LVLM builds it (``--vit-*``, ``--patch-size``, ``--image-size``: by default the store's) and a
small causal text tower (``--text-*``), both projected to ``--embed-dim``, with the symmetric
InfoNCE loss (``loss.contrastive``) over each micro-batch: the other pairs of the micro-batch
are the negatives, and with ``--global-batch-size`` larger than ``--micro-batch-size`` the
micro-batches' gradients are averaged. Data: one preprocessed prefix (``--data-path``: tokens and
image store, as for the LVLM runs) read by ``data.CaptionDataset``; its shuffled epochs follow
``--seed``. Optimiser: torch's AdamW (what megatron-core's ``adam`` is without Apex or TE),
no weight decay on biases, norms and the temperature, with megatron-core's learning-rate
schedule (the trainer's ``--lr-*`` flags). One process (CPU or one GPU).

``--save`` receives the encoder as a checkpoint ``--vit-load`` reads (``models.contrastive``),
then ``vision_quality.json`` (``eval.vision_quality``): caption retrieval over the held-out set
and a linear probe of object colour and shape on the frozen features, with chance beside each.

``--freeze-vit`` trains only the text side against a fixed encoder (LiT): from ``--vit-load``
(e.g. an NTP warm-up's) or a random one, so that any encoder gets a retrieval number.
``--eval-only`` trains nothing: the report for ``--vit-load``'s encoder (retrieval only when the
checkpoint is this tool's, with its text tower) or, without it, for a random encoder
(``--seed``, drawn as a fresh H-LVLM's would be).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

# megatron-core warns on import that Transformer Engine and Apex are missing; these layers use neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

import torch  # noqa: E402

from megatron_prior import parallel  # noqa: E402
from megatron_prior.data.caption_dataset import CaptionDataset  # noqa: E402
from megatron_prior.data.images import images_path  # noqa: E402
from megatron_prior.eval.vision_quality import read_scene_labels, summary, vision_quality  # noqa: E402
from megatron_prior.files import atomic_write_json  # noqa: E402
from megatron_prior.loss.contrastive import info_nce  # noqa: E402
from megatron_prior.models import contrastive  # noqa: E402
from megatron_prior.models.contrastive import ContrastiveModel, TextTower  # noqa: E402
from megatron_prior.models.vision_encoder import load_vision_encoder  # noqa: E402
from megatron_prior.parallel import launch_info  # noqa: E402
from megatron_prior.tokenizer import load_tokenizer  # noqa: E402
from megatron_prior.training.arguments import (AT_LEAST_1, NON_NEGATIVE, VIT_SHAPE_DEFAULTS,  # noqa: E402
                                               VIT_SHAPE_FLAGS, ArgumentError, Domain, FlagParser, add_trainer_flags,
                                               check_domains, check_tokenizer, resolve_images,
                                               shape_from_checkpoint)
from megatron_prior.training.data import BatchStream  # noqa: E402
from megatron_prior.training.loop import lr_scheduler  # noqa: E402
from megatron_prior.training.metrics import iteration_line  # noqa: E402

PROG = "python -m megatron_prior.train_contrastive"
REPORT = "vision_quality.json"
log = logging.getLogger("megatron_prior.train_contrastive")

DOMAINS: dict[str, Domain] = {
    **dict.fromkeys(["text_num_layers", "text_hidden_size", "text_num_attention_heads", "embed_dim",
                     "eval_batch_size", "probe_steps"], AT_LEAST_1),
    "probe_l2": NON_NEGATIVE,
}


def build_parser() -> argparse.ArgumentParser:
    p = FlagParser(prog=PROG, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                description="Pre-train the H-LVLM's vision encoder with CLIP's contrastive loss (symmetric InfoNCE) "
                            "on a preprocessed image-caption prefix, save it as a checkpoint --vit-load reads, and "
                            "report caption retrieval and a colour/shape linear probe on held-out images. "
                            "Flags shared with python -m megatron_prior.train mean the same here.")
    g = p.add_argument_group("vision encoder (the H-LVLM's)")
    add_trainer_flags(g, ["patch_size", "vit_num_layers", "vit_hidden_size", "vit_num_attention_heads", "vit_load",
                          "image_size", "image_aspect"])
    g.add_argument("--freeze-vit", action="store_true",
                   help="train only the text tower and projections against a fixed encoder (LiT): --vit-load's, "
                        "or a random one")
    g = p.add_argument_group("text tower and embedding")
    g.add_argument("--text-num-layers", type=int, default=1, help="transformer layers of the caption encoder")
    g.add_argument("--text-hidden-size", type=int, default=64, help="width of the caption encoder")
    g.add_argument("--text-num-attention-heads", type=int, default=4,
                   help="attention heads of the caption encoder (must divide --text-hidden-size)")
    g.add_argument("--embed-dim", type=int, default=64, help="width of the shared image-text embedding")
    g = p.add_argument_group("training")
    add_trainer_flags(g, ["micro_batch_size", "global_batch_size", "seq_length", "train_iters", "lr", "min_lr",
                          "lr_decay_style", "lr_warmup_iters", "lr_decay_iters", "weight_decay", "adam_beta1",
                          "adam_beta2", "adam_eps", "clip_grad", "init_method_std", "seed"])
    g = p.add_argument_group("data")
    g.add_argument("--data-path", default=None,
                   help="token prefix of the training pairs (tools/preprocess_with_weights.py's --output-prefix "
                        "plus _caption_document, with its .images store), as the LVLM runs read it")
    add_trainer_flags(g, ["tokenizer_model", "tokenizer_type", "special_tokens", "num_workers"])
    g = p.add_argument_group("quality report")
    g.add_argument("--eval-data-path", default=None,
                   help="held-out token prefix (with its .images store): retrieval and the probe's test images")
    g.add_argument("--eval-labels", default=None,
                   help="the generator's JSONL of the held-out pairs (heldout.jsonl, key objects): the probe's labels, "
                        "record i for document i of --eval-data-path")
    g.add_argument("--train-labels", default=None,
                   help="the generator's JSONL of the training pairs (train.jsonl): labels of --data-path's images, "
                        "which the probe is fitted on")
    g.add_argument("--eval-batch-size", type=int, default=256, help="images per forward pass of the report")
    g.add_argument("--probe-l2", type=float, default=1e-3, help="L2 penalty of the probe's logistic regressions")
    g.add_argument("--probe-steps", type=int, default=300, help="L-BFGS iterations of each probe fit")
    g.add_argument("--eval-only", action="store_true",
                   help="train nothing: report on --vit-load's encoder, or a random one (--seed)")
    g.add_argument("--report", default=None, help=f"where the report goes (default: --save/{REPORT})")
    g = p.add_argument_group("checkpointing and logging")
    add_trainer_flags(g, ["save", "log_interval"])
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(**{dest: None for dest in VIT_SHAPE_FLAGS if dest not in ("patch_size",)})
    return p


def _check_prefix(flag: str, prefix: Optional[str]) -> None:
    if prefix is None:
        raise ArgumentError(f"{flag} is required")
    for path in (prefix + ".bin", prefix + ".idx", images_path(prefix)):
        if not os.path.exists(path):
            raise ArgumentError(f"{flag} {prefix}: missing {path}"
                                + (" (preprocess with --image-key)" if path.endswith(".images") else ""))


def validate_args(args: argparse.Namespace) -> argparse.Namespace:
    """Defaults that depend on other flags, and every refusal that needs no model, before any
    dataset or model is built."""
    if launch_info().world_size > 1:
        raise ArgumentError("one process only: data parallelism is not supported by this tool yet")
    check_domains(args, DOMAINS)
    _check_prefix("--data-path", args.data_path)
    if args.tokenizer_model is None:
        raise ArgumentError("--tokenizer-model is required")
    check_tokenizer(args.tokenizer_model, args.tokenizer_type, args.special_tokens)
    # Where the image size comes from: the flag, else --vit-load (it is a ViT shape flag), else the stores.
    size_from = "--image-size" if args.image_size is not None else f"--vit-load {args.vit_load}'s image size"
    if args.vit_load is not None:
        shape_from_checkpoint(args, "--vit-load", VIT_SHAPE_FLAGS)
    for dest, value in VIT_SHAPE_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)
    resolve_images(args, [args.data_path], size_from)
    for size, heads, what in ((args.vit_hidden_size, args.vit_num_attention_heads, "vit"),
                              (args.text_hidden_size, args.text_num_attention_heads, "text")):
        if size % heads:
            raise ArgumentError(f"--{what}-hidden-size {size} is not divisible by --{what}-num-attention-heads {heads}")
    report = [args.eval_data_path, args.eval_labels, args.train_labels]
    if any(x is not None for x in report) and None in report:
        raise ArgumentError("the quality report needs --eval-data-path, --eval-labels and --train-labels together")
    if args.eval_data_path is not None:
        _check_prefix("--eval-data-path", args.eval_data_path)
        resolve_images(args, [args.eval_data_path], size_from, "--eval-data-path")
        for flag, path in (("--eval-labels", args.eval_labels), ("--train-labels", args.train_labels)):
            if not os.path.isfile(path):
                raise ArgumentError(f"{flag} {path}: no such file")
    if args.report is None and args.save is not None:
        args.report = str(Path(args.save) / REPORT)
    if args.eval_only:
        if args.eval_data_path is None:
            raise ArgumentError("--eval-only needs the quality report's flags (--eval-data-path, --eval-labels, "
                                "--train-labels)")
        if args.report is None:
            raise ArgumentError("--eval-only needs --report or --save (where the report goes)")
        return args
    if args.save is None:
        raise ArgumentError("--save is required (the encoder checkpoint)")
    if args.train_iters is None:
        raise ArgumentError("--train-iters is required")
    if args.lr is None:
        raise ArgumentError("--lr is required (Megatron has no default learning rate)")
    if args.min_lr > args.lr:
        raise ArgumentError(f"--min-lr {args.min_lr} is larger than --lr {args.lr}")
    if args.global_batch_size is None:
        args.global_batch_size = args.micro_batch_size
    if args.global_batch_size % args.micro_batch_size:
        raise ArgumentError(f"--global-batch-size {args.global_batch_size} is not divisible by --micro-batch-size "
                            f"{args.micro_batch_size}")
    if args.micro_batch_size < 2:
        raise ArgumentError("--micro-batch-size must be at least 2: a pair's negatives are the micro-batch's others")
    args.num_microbatches = args.global_batch_size // args.micro_batch_size
    if args.lr_decay_iters is None:
        args.lr_decay_iters = args.train_iters
    if args.lr_warmup_iters >= args.lr_decay_iters:
        raise ArgumentError(f"--lr-warmup-iters {args.lr_warmup_iters} must be smaller than --lr-decay-iters "
                            f"{args.lr_decay_iters} (default: --train-iters)")
    if os.path.exists(Path(args.save) / "latest_checkpointed_iteration.txt"):
        raise ArgumentError(f"--save {args.save} already holds a checkpoint; give a new directory")
    return args


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return validate_args(args)
    except ArgumentError as err:
        parser.error(str(err))


# --- the run ------------------------------------------------------------------------------------

@dataclass
class Data:
    tokenizer: object
    train: Optional[CaptionDataset]  # None with --eval-only
    report: Optional[tuple]  # (train images in one epoch, their labels, held-out images, their labels)


def build_data(args: argparse.Namespace) -> Data:
    """The training rows (``train_iters x global batch`` of shuffled epochs) and, for the
    report, both prefixes in one epoch with their labels (checked against the documents here,
    before any training)."""
    tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type, args.special_tokens)
    whole = dict(tokenizer=tokenizer, sequence_length=args.seq_length, image_mean=args.image_mean,
                 image_std=args.image_std, image_size=args.image_size, image_aspect=args.image_aspect)
    train = None if args.eval_only else CaptionDataset.of_prefix(
        args.data_path, num_samples=args.train_iters * args.global_batch_size, seed=args.seed, **whole)
    report = None
    if args.eval_data_path is not None:
        fit, heldout = CaptionDataset.of_prefix(args.data_path, **whole), CaptionDataset.of_prefix(
            args.eval_data_path, **whole)
        report = (fit, read_scene_labels(args.train_labels, fit), heldout, read_scene_labels(args.eval_labels, heldout))
    return Data(tokenizer, train, report)


def build_model(args: argparse.Namespace, tokenizer) -> tuple[ContrastiveModel, str, bool]:
    """The model, where its encoder comes from (said in the report) and whether its text tower
    comes trained (from a checkpoint of this tool)."""
    saved = contrastive.saved_config(args.vit_load) if args.vit_load else None
    if saved is not None:
        if saved.tokenizer_fingerprint not in (None, tokenizer.fingerprint):
            raise ArgumentError(f"--vit-load {args.vit_load}: its text tower was trained with another tokenizer "
                                f"({saved.tokenizer_fingerprint}), not --tokenizer-model {args.tokenizer_model}")
        cfg = saved
    else:
        text = TextTower(vocab_size=tokenizer.vocab_size, seq_length=args.seq_length,
                         num_layers=args.text_num_layers, hidden_size=args.text_hidden_size,
                         num_attention_heads=args.text_num_attention_heads, embed_dim=args.embed_dim)
        cfg = contrastive.model_config(text, tokenizer_fingerprint=tokenizer.fingerprint,
                                       image_aspect=args.image_aspect, **{k: getattr(args, k) for k in VIT_SHAPE_FLAGS})
    model = ContrastiveModel(cfg)
    model.initialize(args.seed, args.init_method_std)
    if saved is not None:
        contrastive.load(model, args.vit_load)
        source = f"--vit-load {args.vit_load} (a contrastive checkpoint, text tower included)"
    elif args.vit_load:
        load_vision_encoder(model, args.vit_load)
        source = f"--vit-load {args.vit_load}"
    else:
        source = f"random initialisation (--seed {args.seed}, --init-method-std {args.init_method_std})"
    log.info("encoder: %s; %s ViT, %d layers of width %d, %dpx images in %dpx patches; text tower %s",
             source, cfg.vision_model_type, cfg.vit_num_layers, cfg.vit_hidden_size, cfg.image_size,
             cfg.patch_size, model.text)
    return model.to(parallel.device()), source, saved is not None


def _optimizer(args: argparse.Namespace, model: ContrastiveModel) -> torch.optim.Optimizer:
    decay, plain = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            # As megatron-core: no weight decay on biases and norms (1-d), nor on the temperature.
            (plain if param.dim() <= 1 or name.endswith(".bias") else decay).append(param)
    return torch.optim.AdamW([{"params": decay}, {"params": plain, "wd_mult": 0.0}], lr=0.0,
                             betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_eps,
                             weight_decay=args.weight_decay)


def train(args: argparse.Namespace, model: ContrastiveModel, data: Data) -> list[dict]:
    """The training loop; returns the logged metrics (one dict per --log-interval)."""
    if args.freeze_vit:
        model.freeze_vision()
    optimizer = _optimizer(args, model)
    scheduler = lr_scheduler(optimizer, args)
    stream = BatchStream(data.train, args.micro_batch_size, args.num_workers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    metrics_path = Path(args.save) / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    log.info("training %s parameters (%s) for %d iterations of %d pairs (%d micro-batches of %d)",
             f"{sum(p.numel() for p in trainable):,}", "text side only, encoder frozen" if args.freeze_vit else "all",
             args.train_iters, args.global_batch_size, args.num_microbatches, args.micro_batch_size)
    logged, window, start = [], [], time.perf_counter()
    model.train()
    with open(metrics_path, "w") as metrics_file:
        for iteration in range(1, args.train_iters + 1):
            optimizer.zero_grad(set_to_none=True)
            for batch in stream.take((iteration - 1) * args.global_batch_size, args.num_microbatches):
                logits = model(batch["images"], batch["labels"], batch["loss_mask"].sum(dim=1).long())
                loss = info_nce(logits)
                (loss / args.num_microbatches).backward()
                target = torch.arange(logits.shape[0], device=logits.device)
                window.append((loss.item(), (logits.argmax(dim=1) == target).float().mean().item()))
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, args.clip_grad if args.clip_grad > 0 else
                                                       float("inf"))
            if not torch.isfinite(grad_norm):
                raise FloatingPointError(f"iteration {iteration}: the gradient norm is {float(grad_norm)}")
            optimizer.step()
            scheduler.step(increment=args.global_batch_size)
            if iteration % args.log_interval == 0 or iteration == args.train_iters:
                elapsed = time.perf_counter() - start
                entry = {"iteration": iteration, "infonce_loss": sum(w[0] for w in window) / len(window),
                         "batch_i2t_accuracy": sum(w[1] for w in window) / len(window),
                         "logit_scale": float(model.logit_scale.exp()), "grad_norm": float(grad_norm),
                         "lr": optimizer.param_groups[0]["lr"],
                         "iteration_time_s": elapsed / (len(window) / args.num_microbatches)}
                log.info(iteration_line(datetime.datetime.now(), iteration, args.train_iters,
                                        iteration * args.global_batch_size, entry["iteration_time_s"], entry["lr"],
                                        args.global_batch_size, {"infonce loss": entry["infonce_loss"]}, 1.0,
                                        entry["grad_norm"],
                                        {"batch image->text accuracy": f"{entry['batch_i2t_accuracy']:.3f}",
                                         "logit scale": f"{entry['logit_scale']:.2f}"}))
                metrics_file.write(json.dumps(entry) + "\n")
                metrics_file.flush()
                logged.append(entry)
                window, start = [], time.perf_counter()
    return logged


def run(args: argparse.Namespace) -> dict:
    """Train (unless --eval-only), save, report; returns the summary (``summary.json`` in --save)."""
    parallel.initialize(seed=args.seed)
    try:
        data = build_data(args)
        model, source, text_trained = build_model(args, data.tokenizer)
        mode = ("evaluated as loaded" if args.eval_only else "text side trained against the frozen encoder (LiT)"
                if args.freeze_vit else "trained contrastively")
        result: dict = {"encoder": source, "mode": mode}
        if not args.eval_only:
            wall, cpu = time.perf_counter(), time.process_time()
            logged = train(args, model, data)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            log.info("trained in %.1f s (%.1f s of CPU time, this process's threads together)", wall, cpu)
            contrastive.save(model, args.save, args.train_iters,
                             {"contrastive_args.json": json.dumps(vars(args), indent=2, sort_keys=True, default=str)})
            log.info("saved the encoder to %s (iteration %d): --vit-load %s reads it", args.save, args.train_iters,
                     args.save)
            result.update(iterations=args.train_iters, first=logged[0], last=logged[-1],
                          train_time_s=wall, train_cpu_time_s=cpu)
        if data.report is not None:
            fit, fit_labels, heldout, heldout_labels = data.report
            report = vision_quality(model, fit, fit_labels, heldout, heldout_labels,
                                    with_text=text_trained or not args.eval_only,
                                    batch_size=args.eval_batch_size, l2=args.probe_l2, steps=args.probe_steps,
                                    progress=not args.no_progress)
            result["quality"] = report
            atomic_write_json(args.report, {**report, "encoder": source, "mode": mode,
                                            "eval_data_path": args.eval_data_path, "data_path": args.data_path})
            log.info("vision quality (encoder from %s, %s): %s; written to %s", source, mode, summary(report),
                     args.report)
        if args.save and not args.eval_only:
            atomic_write_json(Path(args.save) / "summary.json", result)
        return result
    finally:
        parallel.destroy()


def main(argv: Optional[Sequence[str]] = None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    try:
        return run(args)
    # Bad input (a refused checkpoint, damaged data, labels that are not the data's): one line,
    # as a bad flag is.
    except (ValueError, FileNotFoundError) as err:  # CheckpointError, FormatError, BadRecord, ArgumentError
        raise SystemExit(f"{PROG}: error: {err}") from None


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
