#!/usr/bin/env python
"""Merge preprocessed shards (tokens, log-probs, kinds, images) into one dataset.

Every shard is validated first (as training would open it) and all must agree: token
dtype, tokenizer, reference model, and whether they carry kinds and images (of one size).
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


def merge(prefixes: list[str], output_prefix: str) -> dict:
    from megatron_prior.data import FormatError, ImageStore, WeightedIndexedDataset
    from megatron_prior.data.formats import AtomicFiles, WeightedDatasetWriter
    from megatron_prior.data.images import ImageStoreWriter, images_path

    if output_prefix in prefixes:
        raise ValueError(f"--output-prefix {output_prefix} is one of the inputs")
    shards = [WeightedIndexedDataset(p) for p in prefixes]
    first = shards[0]
    stores: list[Optional[ImageStore]] = [
        ImageStore(images_path(p), expected_count=len(s)) if os.path.exists(images_path(p)) else None
        for p, s in zip(prefixes, shards)
    ]
    for prefix, shard, store in zip(prefixes[1:], shards[1:], stores[1:]):
        checks = [
            ("token dtype", shard.token_array.dtype, first.token_array.dtype),
            ("tokenizer", shard.metadata.tokenizer_fingerprint, first.metadata.tokenizer_fingerprint),
            ("reference model", shard.metadata.reference, first.metadata.reference),
            ("kinds", shard.has_kinds, first.has_kinds),
            ("images", store.shape[1:] if store else None, stores[0].shape[1:] if stores[0] else None),
        ]
        for what, mine, theirs in checks:
            if mine != theirs:
                raise FormatError(prefix, f"{what} {mine} differs from {prefixes[0]}'s {theirs}")

    with WeightedDatasetWriter(output_prefix, first.token_array.dtype.type, with_kinds=first.has_kinds) as writer:
        image_writer = None
        if stores[0] is not None:
            files = AtomicFiles()
            _, height, width, _ = stores[0].shape
            image_writer = ImageStoreWriter(images_path(output_prefix), height, width, files)
            writer.attach(files)
        for prefix, store in zip(prefixes, stores):
            writer.add_shard(prefix, with_kinds=first.has_kinds)
            if image_writer is not None:
                image_writer.add_store(store)
        if image_writer is not None:
            image_writer.close()
        notes = {"merged_from": [{"prefix": p, "tokens_idx_sha256": s.metadata.tokens_idx_sha256,
                                  "token_count": s.metadata.token_count} for p, s in zip(prefixes, shards)]}
        meta = writer.finalize(first.metadata.tokenizer_fingerprint, first.metadata.reference, notes)
    # Open the result as training will, so a bad merge fails here and not in a job.
    merged = WeightedIndexedDataset(output_prefix, tokenizer_fingerprint=meta.tokenizer_fingerprint)
    return {"documents": len(merged), "tokens": meta.token_count, "shards": len(shards)}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")
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
