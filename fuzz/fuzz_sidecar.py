"""Sidecar JSON (``ScoreMetadata.load`` and every check that reads it): a fuzzed
``T.logprobs.json`` (and ``T.verified.json``, the hash cache) beside the real, unchanged
files of a dataset, opened as training opens it."""

from __future__ import annotations

import os
import shutil
from typing import Callable

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import Corpus
from megatron_prior.data.formats import FormatError, dataset_files, metadata_path, verified_path
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.tokenizer import load_tokenizer

ERRORS = (FormatError,)


def seeds(corpus: Corpus) -> list[bytes]:
    meta = open(metadata_path(corpus.data), "rb").read()
    cache = open(verified_path(corpus.data), "rb").read()
    return [pack(0, [meta, cache]), pack(0, [meta, None])]


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    prefix = os.path.join(workdir, "t")
    for role, path in dataset_files(corpus.data).items():
        if os.path.exists(path):
            shutil.copyfile(path, dataset_files(prefix)[role])
    tokenizer = load_tokenizer(corpus.tokenizer)

    def one(data: bytes) -> None:
        _, parts = unpack(data, 2)
        write_files([metadata_path(prefix), verified_path(prefix)], parts)
        ds = WeightedIndexedDataset(prefix, tokenizer.fingerprint, tokenizer.vocab_size)
        assert ds.metadata.files.keys() <= dataset_files(prefix).keys()
        assert ds.metadata.sequence_count == len(ds)

    return one
