#!/usr/bin/env python
"""Tokenize JSONL and score every token with a reference LM, in Megatron's indexed format.

For each --json-keys KEY it writes, beside Megatron's usual {output_prefix}_{KEY}_document
.bin/.idx (stock megatron-core reads them):

  *.logprobs.bin/.idx   float32, log p_ref(t_i | t_<i) for every token
  *.logprobs.json       what binds them: tokenizer, reference model, counts, and the size
                        and sha256 of every file here (a replaced or half-written one is refused)
  *.kinds.bin/.idx      uint8 token kinds, with --kinds-key
  *.images              the images, resized, memory-mapped, with --image-key
  *.verified.json       hashes already checked, by file stat (opening skips re-hashing them)

The reference is a text-only GPT saved by megatron-prior's training (--reference-type gpt
--reference-load DIR; it sees each document after an EOD, in windows of its sequence
length) or the corpus's own unigram frequencies (--reference-type unigram).

A bad record (invalid JSON or UTF-8, JSON nested too deeply or with a number too long,
missing or empty key, a lone surrogate in a text, an image that is unreadable, not a
regular file or over PIL's decompression-bomb limit, a bad kind span) stops the run with file:line: reason; --skip-bad-records skips, counts and lists
them in {output_prefix}_bad_records.log. Outputs are written under temporary names and
renamed at the end, so an interrupted run leaves nothing that opens; temporary files of a
killed run are removed by the next run onto the same prefix.

Example:
  python tools/preprocess_with_weights.py --input captions.jsonl --json-keys caption \\
      --tokenizer-model tok.model --append-eod --output-prefix data/demo \\
      --reference-type gpt --reference-load runs/reference --image-key image --image-size 32 \\
      --kinds-key kinds --workers 4
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron-core warns on import that Transformer Engine and Apex are missing; this tool uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior.preprocess import run  # noqa: E402
from megatron_prior.tokenizer import TOKENIZER_TYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one JSON object per line")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys of the texts to tokenize, one output dataset each (default: text)")
    group.add_argument("--image-key", help="key of an image path (relative to the JSONL's folder, or absolute); "
                                           "writes the image store beside the tokens")
    group.add_argument("--image-size", type=int, nargs="+", metavar="N",
                       help="resize images to N x N, or to H W (needed with --image-key)")
    group.add_argument("--kinds-key", help="key of the token-kind spans [[char_start, char_end, kind], ...]")
    group.add_argument("--skip-bad-records", action="store_true",
                       help="skip bad records (counted and listed in {output_prefix}_bad_records.log) "
                            "instead of stopping at the first")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                       help="inferred from --tokenizer-model when omitted")
    group.add_argument("--tokenizer-model", required=True, help="SentencePiece .model or HuggingFace tokenizer.json")
    group.add_argument("--append-eod", action="store_true", help="append the <eod> token to every document")

    group = parser.add_argument_group("reference model")
    group.add_argument("--reference-type", choices=["gpt", "unigram"], required=True,
                       help="gpt: a trained text-only reference LM; unigram: token frequencies of the input")
    group.add_argument("--reference-load", help="checkpoint directory of the reference GPT (--reference-type gpt)")
    group.add_argument("--reference-window", type=int,
                       help="tokens of context per scoring window (default: the model's seq_length, the text "
                            "length it was trained on)")
    group.add_argument("--score-batch-tokens", type=int, default=16384,
                       help="padded tokens per scoring batch (default: 16384)")
    group.add_argument("--score-chunk-tokens", type=int, default=1 << 18,
                       help="tokens gathered before a scoring pass; sorting by length happens within it "
                            "(default: 262144)")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the output files")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="processes for parsing, tokenizing and images")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress reports")
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.reference_type == "gpt" and not args.reference_load:
        parser.error("--reference-type gpt needs --reference-load DIR")
    if args.reference_type == "unigram" and args.reference_load:
        parser.error("--reference-load is for --reference-type gpt")
    if args.image_key:
        if not args.image_size or len(args.image_size) > 2 or min(args.image_size) < 1:
            parser.error("--image-key needs --image-size N (square) or --image-size H W")
        args.image_size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
    elif args.image_size:
        parser.error("--image-size is for --image-key")
    for key in args.json_keys:
        # A key names output files ({output_prefix}_{key}_document.*): "k/../../x" would write
        # outside the output folder.
        if not key or key in (".", "..") or "/" in key or os.sep in key or "\0" in key:
            parser.error(f"--json-keys {key!r}: a key names output files, so it must be a plain file name "
                         "(not empty, '.' or '..', no '/')")
    if (args.image_key or args.kinds_key) and len(args.json_keys) != 1:
        parser.error("--image-key and --kinds-key refer to one caption: give exactly one --json-keys")
    for path in args.input:
        if not os.path.exists(path):
            parser.error(f"--input {path}: no such file")
    if args.workers < 1 or args.log_interval < 1:
        parser.error("--workers and --log-interval must be at least 1")
    return args


def main(argv=None) -> int:
    parser = build_parser()
    args = validate_args(parser, parser.parse_args(argv))
    try:
        return run(args)
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
