#!/usr/bin/env python
"""Merge preprocessed shards (tokens, log-probs, kinds, images) into one dataset.

Every shard is validated first (as training would open it) and all must agree: token
dtype, tokenizer, reference model, and whether they carry kinds and images (of one store
kind, size and aspect). Image-conditioned scores (tools/score_with_images.py) are not
merged: score the merged dataset.
Tokens are concatenated by megatron-core's own IndexedDatasetBuilder.add_index (as
Megatron's merge_datasets.py does); the log-probs, kinds and images follow in the same
order, and the new metadata binds the scores to the merged token file. Outputs are written
under temporary names and renamed when complete.

Example:
  python tools/merge_weighted_datasets.py --input data/shard0_caption_document \\
      data/shard1_caption_document --output-prefix data/all_caption_document
  python tools/merge_weighted_datasets.py --input data/shards/ --output-prefix data/all
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import warnings
from typing import Optional

# megatron-core warns on import that Transformer Engine and Apex are missing; this tool uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior.data import FormatError, WeightedDatasetWriter, WeightedIndexedDataset  # noqa: E402
from megatron_prior.data.formats import all_files  # noqa: E402
from megatron_prior.data.images import AnyImageStore  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", nargs="+", required=True,
                        help="token prefixes of the shards (T for T.bin/T.idx), in order; or one folder, "
                             "whose datasets (found by their .logprobs.json) merge in name order")
    parser.add_argument("--output-prefix", required=True, help="token prefix of the merged dataset")
    return parser


def shard_prefixes(inputs: list[str]) -> list[str]:
    if len(inputs) == 1 and os.path.isdir(inputs[0]):
        found = sorted(glob.glob(os.path.join(inputs[0], "*.logprobs.json")))
        if not found:
            raise ValueError(f"--input {inputs[0]}: no *.logprobs.json in this folder")
        return [path[: -len(".logprobs.json")] for path in found]
    return list(inputs)


def _check_output_is_no_input(prefixes: list[str], output_prefix: str) -> None:
    """Refuse an output whose files are (after resolving ``.``, ``..`` and links) an input's."""
    inputs = {os.path.realpath(path): prefix for prefix in prefixes for path in all_files(prefix)}
    for path in all_files(output_prefix):
        if os.path.realpath(path) in inputs:
            raise ValueError(f"--output-prefix {output_prefix} would overwrite {path}, a file of the input "
                             f"{inputs[os.path.realpath(path)]}")


def merge(prefixes: list[str], output_prefix: str) -> dict:
    _check_output_is_no_input(prefixes, output_prefix)
    shards = [WeightedIndexedDataset(p) for p in prefixes]
    first = shards[0]
    stores: list[Optional[AnyImageStore]] = [s.open_images() if s.has_images else None for s in shards]

    def layout(store: Optional[AnyImageStore]) -> Optional[tuple]:
        return (store.kind, store.shape[1:], store.aspect) if store is not None else None

    for prefix, shard, store in zip(prefixes[1:], shards[1:], stores[1:]):
        checks = [
            ("token dtype", shard.token_array.dtype, first.token_array.dtype),
            ("tokenizer", shard.metadata.tokenizer_fingerprint, first.metadata.tokenizer_fingerprint),
            ("reference model", shard.metadata.reference, first.metadata.reference),
            ("kinds", shard.has_kinds, first.has_kinds),
            ("images (store, shape, aspect)", layout(store), layout(stores[0])),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                raise FormatError(prefix, f"{what} {mine} differs from {prefixes[0]}'s {theirs}")

    scored = [p for p, s in zip(prefixes, shards) if s.metadata.has_image_scores]
    if scored:
        # They are bound to the scorer that made them and cheap to make again: the merged
        # dataset is scored as a whole rather than stitched from the shards' sidecars.
        print(f"note: the image-conditioned scores of {', '.join(scored)} are not merged; add them to "
              f"{output_prefix} with tools/score_with_images.py (--loss mi and cal read them)", file=sys.stderr)
    image_size = stores[0].shape[1:3] if stores[0] is not None else None
    with WeightedDatasetWriter(output_prefix, first.token_array.dtype.type, with_kinds=first.has_kinds,
                               image_size=image_size, image_store=stores[0].kind if stores[0] else "raw",
                               image_aspect=stores[0].aspect if stores[0] else None) as writer:
        for prefix, store in zip(prefixes, stores):
            writer.add_shard(prefix, store)
        notes = {"merged_from": [{"prefix": p, "tokens_sha256": s.metadata.files["tokens.bin"]["sha256"],
                                  "token_count": s.metadata.token_count} for p, s in zip(prefixes, shards)]}
        meta = writer.finalize(first.metadata.tokenizer_fingerprint, first.metadata.reference, notes)
    # Open the result as training will, so a bad merge fails here and not in a job.
    merged = WeightedIndexedDataset(output_prefix, tokenizer_fingerprint=meta.tokenizer_fingerprint)
    return {"documents": len(merged), "tokens": meta.token_count, "shards": len(shards)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = merge(shard_prefixes(args.input), args.output_prefix)
    except (ValueError, OSError) as err:  # FormatError included: names the file and the problem
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"merged {summary['shards']} shards into {args.output_prefix}: {summary['documents']} documents, "
          f"{summary['tokens']} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
