#!/usr/bin/env python
"""Tokenize image-caption data and score every token with a reference LM, in Megatron's indexed format.

Inputs (--input-format, told apart by the file names when auto): JSONL (one object per line,
texts under --json-keys), the LLaVA-Pretrain JSON (the caption is the first "gpt" turn, the
human prompt is dropped), a COCO captions JSON (one record per annotation, or the first per
image), or webdataset tar shards (brace patterns and globs: data/{00000..00099}.tar; an image
member jpg/jpeg/png/webp and a txt or json caption member per sample). Image paths are
relative to --image-root, by default the folder of the file naming them.

For each --json-keys KEY it writes, beside Megatron's usual {output_prefix}_{KEY}_document
.bin/.idx (stock megatron-core reads them):

  *.logprobs.bin/.idx   float32, log p_ref(t_i | t_<i) for every token
  *.logprobs.json       what binds them: tokenizer, reference model, counts, and the size
                        and sha256 of every file here (a replaced or half-written one is refused)
  *.kinds.bin/.idx      uint8 token kinds, with --kinds-key
  *.images              the images: the files' bytes as given (--image-store encoded, decoded
                        to --image-size per --image-aspect when batches are made; training may
                        ask for another size or rule), or decoded pixels (--image-store raw)
  *.verified.json       hashes already checked, by file stat (opening skips re-hashing them)

The reference is a text-only GPT saved by megatron-prior's training (--reference-type gpt
--reference-load CKPT), a Hugging Face causal LM in a local directory (--reference-type hf
--reference-load DIR: Llama, Qwen2, SmolLM2, GPT-2, ... whatever AutoModelForCausalLM loads
from config.json + *.safetensors; bfloat16 on a GPU, float32 on the CPU), or the corpus's own
unigram frequencies (--reference-type unigram). Both language models score by one rule: a
document's first token given one start token (the tokenizer's BOS if it has one, else its
EOS), each later token given the document before it, in windows of --reference-window tokens.

The tokenizer is a SentencePiece model from tools/train_tokenizer.py or a Hugging Face one
(--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR, as save_pretrained writes it):
its EOS ends documents, and the image markers are added when it lacks them (--special-tokens
names other tokens). An HF reference must have the data's tokenizer: pass its directory as
--tokenizer-model.

Under torchrun (torchrun --nproc-per-node N tools/preprocess_with_weights.py ...) or srun, the
ranks share the input chunk by chunk, each scores its share on its own device, and rank 0
writes the one dataset, byte for byte what a single process writes. If a rank fails, all exit
1, rank 0 names the rank and its error and removes the ranks' parts ({output_prefix}.ranks/),
and a dataset already at the prefix is kept.

A bad record (invalid JSON or UTF-8, JSON nested too deeply or with a number too long,
missing or empty caption, a lone surrogate in a text, an image that is unreadable, not a
regular file, damaged or over PIL's decompression-bomb limit, a bad kind span, a damaged tar
shard) stops the run with file:record: reason; --skip-bad-records skips, counts and lists
them in {output_prefix}_bad_records.log. Outputs are written under temporary names and
renamed at the end, so an interrupted run leaves nothing that opens; temporary files of a
killed run are removed by the next run onto the same prefix.

Examples:
  python tools/preprocess_with_weights.py --input captions.jsonl --json-keys caption \\
      --tokenizer-model tok.model --append-eod --output-prefix data/demo \\
      --reference-type gpt --reference-load runs/reference --image-key image --image-size 32 \\
      --kinds-key kinds --workers 4
  torchrun --nproc-per-node 8 tools/preprocess_with_weights.py \\
      --input blip_laion_cc_sbu_558k.json --image-root LLaVA-Pretrain/images --json-keys caption \\
      --tokenizer-model tok.model --append-eod --output-prefix data/llava --image-size 336 \\
      --reference-type gpt --reference-load runs/reference --workers 4
  python tools/preprocess_with_weights.py --input captions.jsonl --json-keys caption \\
      --tokenizer-type HuggingFaceTokenizer --tokenizer-model models/SmolLM2-135M --append-eod \\
      --output-prefix data/train --reference-type hf --reference-load models/SmolLM2-135M
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings

# megatron-core warns on import that Transformer Engine and Apex are missing; this tool uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior.data.images import ASPECTS, DEFAULT_ASPECT  # noqa: E402
from megatron_prior.data.sources import CAPTIONS_PER_IMAGE, FORMATS, detect_format, expand_inputs  # noqa: E402
from megatron_prior.preprocess import run  # noqa: E402
from megatron_prior.scoring import REFERENCE_TYPES  # noqa: E402
from megatron_prior.tokenizer import SPECIAL_TOKENS_HELP, TOKENIZER_TYPES, parse_special_tokens  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True,
                       help="input files: JSONL, a LLaVA or COCO JSON, or webdataset tar shards (brace patterns "
                            "such as data/{00000..00099}.tar and globs are expanded)")
    group.add_argument("--input-format", choices=("auto",) + FORMATS, default="auto",
                       help="auto (default): .jsonl is jsonl, .tar is wds, a .json list is llava and a .json object "
                            "coco")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys of the texts to tokenize, one output dataset each (default: text); for llava, "
                            "coco and a wds txt member, the one key the caption is stored under (names the output)")
    group.add_argument("--image-key", help="JSONL: key of an image path (relative to --image-root, or absolute); "
                                           "writes the image store beside the tokens")
    group.add_argument("--image-root", help="folder that relative image paths are under (default: the folder of "
                                            "the JSONL/JSON file naming them)")
    group.add_argument("--coco-captions-per-image", choices=CAPTIONS_PER_IMAGE, default="all",
                       help="coco: all (default) makes one record per annotation (the image is stored once); first "
                            "keeps each image's first caption")
    group.add_argument("--image-size", type=int, nargs="+", metavar="N",
                       help="images are fitted to N x N, or to H W (needed with images); for an encoded store the "
                            "size training reads them at unless its --image-size says otherwise, for a raw one fixed")
    group.add_argument("--image-aspect", choices=ASPECTS, default=DEFAULT_ASPECT,
                       help="how an image meets --image-size: pad (default; LLaVA's pad to square with CLIP's mean "
                            "colour), crop (resize to cover, centre crop) or stretch; recorded like --image-size "
                            "(the trainer's --image-aspect overrides it for an encoded store)")
    group.add_argument("--image-store", choices=("encoded", "raw"), default="encoded",
                       help="encoded (default): the image files' bytes (JPEG, PNG, WebP), decoded when batches are "
                            "made; raw: pixels decoded and fitted now (any format PIL reads; H x W x 3 bytes each)")
    group.add_argument("--kinds-key", help="key of the token-kind spans [[char_start, char_end, kind], ...]")
    group.add_argument("--skip-bad-records", action="store_true",
                       help="skip bad records (counted and listed in {output_prefix}_bad_records.log) "
                            "instead of stopping at the first")

    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                       help="inferred from --tokenizer-model when omitted")
    group.add_argument("--tokenizer-model", required=True,
                       help="SentencePiece .model, or a HuggingFace tokenizer: a local directory as save_pretrained "
                            "writes it (tokenizer.json + tokenizer_config.json) or a bare tokenizer.json")
    group.add_argument("--special-tokens", type=parse_special_tokens, default=None, help=SPECIAL_TOKENS_HELP)
    group.add_argument("--append-eod", action="store_true", help="append the <eod> token to every document")

    group = parser.add_argument_group("reference model")
    group.add_argument("--reference-type", choices=REFERENCE_TYPES, required=True,
                       help="gpt: a text-only reference LM trained here; hf: a Hugging Face causal LM "
                            "(AutoModelForCausalLM); unigram: token frequencies of the input")
    group.add_argument("--reference-load",
                       help="the reference: checkpoint directory of the GPT (--reference-type gpt) or local "
                            "save_pretrained directory of the HF model (--reference-type hf; a hub id must be "
                            "downloaded first)")
    group.add_argument("--reference-window", type=int,
                       help="tokens of context per scoring window (default: gpt, the model's seq_length, the text "
                            "length it was trained on; hf, its max_position_embeddings, at most "
                            "--score-batch-tokens)")
    group.add_argument("--score-batch-tokens", type=int, default=16384,
                       help="padded tokens per scoring batch (default: 16384)")
    group.add_argument("--chunk-records", type=int, default=2048,
                       help="records per chunk (default: 2048): a chunk is one worker task and one scoring pass "
                            "(sorted by length within it), and the unit dealt to ranks")

    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="path prefix of the output files")

    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1,
                       help="processes per rank for parsing, tokenizing and reading images")
    group.add_argument("--log-interval", type=int, default=1000, help="documents between progress reports")
    return parser


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.reference_type in ("gpt", "hf") and not args.reference_load:
        parser.error(f"--reference-type {args.reference_type} needs --reference-load DIR")
    if args.reference_type == "unigram" and args.reference_load:
        parser.error("--reference-load is for --reference-type gpt or hf")
    try:
        paths = expand_inputs(args.input)
        if args.input_format == "auto":
            args.input_format = detect_format(paths)
    except (ValueError, OSError) as err:
        parser.error(str(err))
    if args.input_format != "jsonl" and args.image_key:
        parser.error(f"--image-key is for JSONL; --input-format {args.input_format} names its images itself")
    if args.input_format in ("llava", "coco") and args.kinds_key:
        parser.error(f"--kinds-key reads JSON records (jsonl, or wds json members), not --input-format "
                     f"{args.input_format}")
    images = args.image_key or args.input_format != "jsonl"
    if images:
        if not args.image_size or len(args.image_size) > 2 or min(args.image_size) < 1:
            which = "--image-key" if args.image_key else f"--input-format {args.input_format}"
            parser.error(f"{which} needs --image-size N (square) or --image-size H W")
        args.image_size = tuple(args.image_size * 2 if len(args.image_size) == 1 else args.image_size)
    elif args.image_size:
        parser.error("--image-size is for --image-key")
    for key in args.json_keys:
        # A key names output files ({output_prefix}_{key}_document.*): "k/../../x" would write
        # outside the output folder.
        if not key or key in (".", "..") or "/" in key or os.sep in key or "\0" in key:
            parser.error(f"--json-keys {key!r}: a key names output files, so it must be a plain file name "
                         "(not empty, '.' or '..', no '/')")
    if (images or args.kinds_key) and len(args.json_keys) != 1:
        parser.error("images and --kinds-key refer to one caption: give exactly one --json-keys")
    if args.workers < 1 or args.log_interval < 1 or args.chunk_records < 1:
        parser.error("--workers, --log-interval and --chunk-records must be at least 1")
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
