"""``python -m megatron_prior.eval.run``: evaluate trained H-LVLM or U-LVLM checkpoints.

    python -m megatron_prior.eval.run --load runs/ulvlm_prior/ --tokenizer-model data/tokenizer.model \\
        --data-path data/heldout_caption_document --probe data/probe.jsonl --output runs/ulvlm_prior/eval.json

writes ``eval.json``: held-out cross-entropy per token kind (``heldout_ce_grounded``,
``heldout_ce_template``, ``heldout_ce_unrelated``, ``heldout_ce_other``, and ``heldout_ce``
over all caption tokens, with ``heldout_tokens_<kind>`` counts), the
POPE-style probe accuracy (``probe_accuracy`` over all items and ``probe_accuracy_<split>``
for random, popular, adversarial), plus what was evaluated (``load``, ``iteration``,
``arch``, ``data_path``, ``probe``). The scaling-law sweeps read ``probe_accuracy`` from it.

With ``--all-checkpoints`` every checkpoint the run saved (``--save-interval``) is evaluated in
one process, in training order: ``checkpoints`` lists ``{"iteration": N, "metrics": {...}}``
for each, and the top-level numbers are those of the last (the latest), as without the flag.

Several runs on the same data go in one process (``--load A B --output A/eval.json
B/eval.json``): each run's eval.json is exactly what a process of its own writes, and the
interpreter, megatron-core and the probe items are loaded once (about 10 s of CPU each here).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import warnings
from typing import Optional, Sequence

# megatron-core warns on import that Transformer Engine and Apex are missing; scoring uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior import parallel  # noqa: E402
from megatron_prior.checkpoint import (  # noqa: E402
    CheckpointError,
    checkpoint_dir,
    checkpoint_iterations,
    read_model_config,
    resolve_iteration,
)
from megatron_prior.data.images import ASPECTS, DEFAULT_ASPECT, stored_images  # noqa: E402
from megatron_prior.eval.lvlm_scoring import evaluate, load_scorer  # noqa: E402
from megatron_prior.eval.probe import load_probe_items  # noqa: E402
from megatron_prior.files import atomic_write_json  # noqa: E402
from megatron_prior.models.arch import ARCHS  # noqa: E402
from megatron_prior.tokenizer import SPECIAL_TOKENS_HELP, TOKENIZER_TYPES, parse_special_tokens  # noqa: E402

log = logging.getLogger("megatron_prior.eval")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_prior.eval.run",
        description="Evaluate a trained vision-language model ("
                    + " or ".join(a.display_name for a in ARCHS.values() if a.needs_images)
                    + "): held-out loss by token kind on a preprocessed corpus (tokens + .kinds + .images, as "
                    "tools/preprocess_with_weights.py writes them) and the POPE-style probe (a probe.jsonl of the "
                    "demo generator). Writes eval.json.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--load", required=True, nargs="+",
                   help="checkpoint directory of the run (its --save); several runs are evaluated in turn, each "
                        "into its own --output")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (default: the latest)")
    which.add_argument("--all-checkpoints", action="store_true",
                       help="evaluate every checkpoint under --load up to the latest, in training order (the "
                            "results along training); the top-level numbers are the latest's")
    p.add_argument("--tokenizer-model", required=True,
                   help="the tokenizer the model was trained with (SentencePiece .model, HuggingFace directory or "
                        "tokenizer.json)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="as in training (default: from --tokenizer-model's name)")
    p.add_argument("--special-tokens", type=parse_special_tokens, default=None,
                   help=SPECIAL_TOKENS_HELP)
    p.add_argument("--data-path", default=None,
                   help="held-out token prefix with .kinds and .images companions (per-kind losses)")
    p.add_argument("--probe", default=None, help="probe.jsonl (POPE-style items; image paths relative to it)")
    p.add_argument("--image-aspect", choices=ASPECTS, default=None,
                   help="how probe images are fitted to the model's size (default: the rule it was trained with; "
                        "for a checkpoint that does not record it, the rule --data-path's images were stored with, "
                        "else pad). Held-out data are always read at the trained size and rule")
    p.add_argument("--micro-batch-size", type=int, default=64, help="captions per forward pass")
    p.add_argument("--output", required=True, nargs="+", help="eval.json to write, one per --load")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p


def _probe_aspect(args: argparse.Namespace, load: str, iteration: int) -> str:
    """How probe images are fitted: --image-aspect, else the rule the checkpoint was trained with,
    else (a checkpoint that predates recording it) the rule of --data-path's image store."""
    trained = read_model_config(checkpoint_dir(load, iteration)).image_aspect
    if args.image_aspect or trained:
        return args.image_aspect or trained
    return DEFAULT_ASPECT if args.data_path is None else stored_images(args.data_path).aspect


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Evaluate each ``--load`` into its ``--output``; returns the last run's result."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.data_path is None and args.probe is None:
        parser.error("nothing to evaluate: give --data-path, --probe or both")
    if args.micro_batch_size < 1:
        parser.error("--micro-batch-size must be >= 1")
    if len(args.output) != len(args.load):
        parser.error(f"{len(args.load)} --load directories but {len(args.output)} --output files: give one each")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    try:
        items = load_probe_items(args.probe) if args.probe else None
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"megatron_prior.eval.run: {err}") from None
    parallel.initialize()
    try:
        for load, output in zip(args.load, args.output):
            result = _evaluate_run(load, output, args, items)
    finally:
        parallel.destroy()
    return result


def _evaluate_run(load: str, output: str, args: argparse.Namespace, items) -> dict:
    try:
        if args.all_checkpoints:
            iterations = checkpoint_iterations(load)
        else:
            latest = args.iteration if args.iteration is not None else resolve_iteration(load)
            iterations = [] if latest is None else [latest]
        if not iterations:
            raise SystemExit(f"megatron_prior.eval.run: --load {load} holds no checkpoint")
        start = time.perf_counter()
        checkpoints = []
        for iteration in iterations:
            # The model is rebuilt for each: loading weights into a model in use is the
            # trainer's business, and building one costs little beside the evaluation.
            scorer = load_scorer(load, args.tokenizer_model, args.micro_batch_size, iteration,
                                 args.tokenizer_type, args.special_tokens, _probe_aspect(args, load, iteration))
            metrics = evaluate(scorer, args.data_path, items, progress=not args.no_progress)
            log.info("%s iteration %d: %s", load, iteration, _shown(metrics))
            checkpoints.append({"iteration": int(iteration), "metrics": metrics})
    except CheckpointError as err:
        raise SystemExit(f"megatron_prior.eval.run: --load {err}") from None
    except (FileNotFoundError, ValueError) as err:  # a missing, broken or other tokenizer (the message names it)
        raise SystemExit(f"megatron_prior.eval.run: {err}") from None
    result = dict(checkpoints[-1]["metrics"])
    result.update(load=str(load), iteration=checkpoints[-1]["iteration"], arch=scorer.config.arch,
                  data_path=args.data_path, probe=args.probe, wall_time_s=time.perf_counter() - start)
    if args.all_checkpoints:
        result["checkpoints"] = checkpoints
    atomic_write_json(output, result)
    log.info("wrote %s: %s", output, _shown(result))
    return result


def _shown(metrics: dict) -> str:
    return json.dumps({k: round(v, 4) for k, v in metrics.items()
                       if isinstance(v, float) and k.startswith(("heldout_ce", "probe_accuracy"))})


if __name__ == "__main__":
    main(sys.argv[1:])
