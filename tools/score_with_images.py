#!/usr/bin/env python
"""Add image-conditioned token scores to a preprocessed dataset, for --loss mi and --loss cal.

An image-conditioned scorer, a vision-language checkpoint trained here (an H-LVLM or U-LVLM,
typically an NTP run), reads every caption of --data-path with its image, laid out as training
lays it out, and writes two float32 sidecars beside the tokens:

  *.imglogprobs.bin/.idx   log p(t_i | image, t_<i)                       (--loss mi, with the
                                                                           reference log-probs)
  *.imgdelta.bin/.idx      logit(t_i | image, t_<i) - logit(t_i | t_<i)   (--loss cal: the same
                           model's language model on the text alone, the <image> placeholder
                           read as a token)

The dataset's metadata ({prefix}.logprobs.json) is rewritten to bind them, by size and sha256,
with the scorer's checkpoint (path, content hash): written under temporary names, the metadata
renamed first, then the sidecars, as tools/preprocess_with_weights.py commits. A dataset changed
while it was being scored is refused; scoring again replaces earlier image scores.

Example:
  python tools/score_with_images.py --data-path data/train_caption_document \\
      --load runs/ulvlm_ntp --tokenizer-model data/tokenizer.model --micro-batch-size 64

One process at tensor-parallel size 1 (on the GPU when there is one): the scores are one forward
pass with the image and one without per batch of captions, an evaluation's cost.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from typing import Optional, Sequence

# megatron-core warns on import that Transformer Engine and Apex are missing; scoring uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior import parallel  # noqa: E402
from megatron_prior.checkpoint import CheckpointError, resolve_iteration  # noqa: E402
from megatron_prior.data.formats import ScoreMetadata, metadata_path  # noqa: E402
from megatron_prior.eval.lvlm_scoring import describe_scorer, load_scorer, score_dataset  # noqa: E402
from megatron_prior.tokenizer import SPECIAL_TOKENS_HELP, TOKENIZER_TYPES, parse_special_tokens  # noqa: E402

log = logging.getLogger("megatron_prior.score_with_images")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/score_with_images.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data-path", required=True,
                   help="token prefix of a dataset written by tools/preprocess_with_weights.py with images "
                        "(--image-key): PREFIX.bin/.idx, PREFIX.logprobs.*, PREFIX.images")
    p.add_argument("--load", required=True,
                   help="checkpoint directory of a vision-language model (--model hlvlm or ulvlm; its --save)")
    p.add_argument("--iteration", type=int, default=None, help="checkpoint iteration (none given: the latest)")
    p.add_argument("--tokenizer-model", required=True,
                   help="the tokenizer of the data and the model (SentencePiece .model, HuggingFace directory or "
                        "tokenizer.json)")
    p.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES, default=None,
                   help="as in training (default: from --tokenizer-model's name)")
    p.add_argument("--special-tokens", type=parse_special_tokens, default=None, help=SPECIAL_TOKENS_HELP)
    p.add_argument("--micro-batch-size", type=int, default=64, help="captions per forward pass")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> ScoreMetadata:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.micro_batch_size < 1:
        parser.error(f"--micro-batch-size must be >= 1, got {args.micro_batch_size}")
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    start = time.perf_counter()
    try:
        ScoreMetadata.load(metadata_path(args.data_path))  # a missing or foreign dataset, before the model loads
        iteration = args.iteration if args.iteration is not None else resolve_iteration(args.load)
        if iteration is None:
            raise SystemExit(f"tools/score_with_images.py: --load {args.load} holds no checkpoint")
        parallel.initialize()
        try:
            scorer = load_scorer(args.load, args.tokenizer_model, args.micro_batch_size, iteration,
                                 args.tokenizer_type, args.special_tokens)
            log.info("scoring %s with %s (iteration %d, %s)", args.data_path, args.load, iteration,
                     scorer.config.arch)
            meta = score_dataset(scorer, args.data_path, describe_scorer(args.load, scorer.config, iteration),
                                 progress=not args.no_progress)
        finally:
            parallel.destroy()
    except CheckpointError as err:
        raise SystemExit(f"tools/score_with_images.py: --load {err}") from None
    except (FileNotFoundError, ValueError) as err:  # FormatError included: names the file and the problem
        raise SystemExit(f"tools/score_with_images.py: {err}") from None
    log.info("wrote %s.imglogprobs and %s.imgdelta (%d tokens, %d captions) in %.1f s", args.data_path,
             args.data_path, meta.token_count, meta.document_count, time.perf_counter() - start)
    return meta


if __name__ == "__main__":
    main(sys.argv[1:])
