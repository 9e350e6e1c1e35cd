#!/usr/bin/env python
"""Train a SentencePiece tokenizer on the texts of JSONL files.

The model gets the special pieces megatron-prior's models use: <eod> (end of document),
<pad>, <image> (the H-LVLM image placeholder) and <img_start> <img_row> <img_end> (the
U-LVLM image markers). They are control symbols: text that happens to contain "<image>"
is tokenized as ordinary characters and can never produce them.

Example:
    python tools/train_tokenizer.py --input captions.jsonl --json-keys caption \\
        --vocab-size 2000 --output-prefix data/tok      # writes data/tok.model, data/tok.vocab
"""

from __future__ import annotations

import argparse
import os
import sys

import sentencepiece

from megatron_prior.data.records import iter_texts
from megatron_prior.files import remove_stale_temps, temp_path
from megatron_prior.tokenizer import SPECIAL_PIECES, load_tokenizer


def get_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True, help="JSONL file(s), one object per line")
    parser.add_argument("--json-keys", nargs="+", default=["text"],
                        help="keys whose string values are training text (default: text)")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="vocabulary size, special pieces included; a corpus too small for it "
                             "gets the largest vocabulary it supports")
    parser.add_argument("--output-prefix", required=True, help="writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--model-type", choices=["unigram", "bpe"], default="unigram",
                        help="SentencePiece algorithm (default: unigram)")
    parser.add_argument("--character-coverage", type=float, default=1.0,
                        help="share of characters the vocabulary must cover (default: 1.0; "
                             "0.9995 suits languages with large alphabets)")
    parser.add_argument("--byte-fallback", action="store_true",
                        help="add the 256 byte pieces so no text maps to <unk>")
    parser.add_argument("--input-sentence-size", type=int, default=0,
                        help="train on a random sample of this many texts (default: 0 = all)")
    return parser.parse_args(argv)


def train(args: argparse.Namespace) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(args.output_prefix)), exist_ok=True)
    remove_stale_temps([args.output_prefix])
    tmp_prefix = temp_path(args.output_prefix)
    # <pad> and <eod> take SentencePiece's own pad/eos slots; the rest are control symbols.
    control = [piece for name, piece in SPECIAL_PIECES.items() if name not in ("eod", "pad")]
    # Validate every record first: an exception raised inside SentencePiece's iterator
    # surfaces as an opaque RuntimeError.
    count = sum(1 for _ in iter_texts(args.input, args.json_keys))
    if count == 0:
        raise ValueError(f"{', '.join(args.input)}: no texts under keys {args.json_keys}")
    texts = iter_texts(args.input, args.json_keys)
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=texts,
            model_prefix=tmp_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            byte_fallback=args.byte_fallback,
            input_sentence_size=args.input_sentence_size,
            shuffle_input_sentence=args.input_sentence_size > 0,
            unk_id=0,
            pad_id=1, pad_piece=SPECIAL_PIECES["pad"],
            eos_id=2, eos_piece=SPECIAL_PIECES["eod"],
            bos_id=-1,
            control_symbols=control,
            hard_vocab_limit=False,
            minloglevel=2,
        )
        for ext in (".vocab", ".model"):  # the .model last: it is what marks a finished run
            os.replace(tmp_prefix + ext, args.output_prefix + ext)
    finally:
        for ext in (".model", ".vocab"):
            if os.path.exists(tmp_prefix + ext):
                os.remove(tmp_prefix + ext)
    return args.output_prefix + ".model"


def main(argv=None) -> int:
    args = get_args(argv)
    try:
        path = train(args)
    except ValueError as err:  # BadRecord included: file:line: reason
        print(f"error: {err}", file=sys.stderr)
        return 1
    tok = load_tokenizer(path, "SentencePieceTokenizer")
    print(f"wrote {path}: vocab size {tok.vocab_size}, eod {tok.eod}, pad {tok.pad}, "
          f"image {tok.image_token_id}, fingerprint {tok.fingerprint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
