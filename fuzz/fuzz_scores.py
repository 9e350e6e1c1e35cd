"""Per-token score reader (``WeightedIndexedDataset``): every file of a dataset at once.

The parts are the files of ``formats.dataset_files`` and the metadata. A mutated file
almost never matches the sha256 the metadata binds, which would stop every input at the
hash check; with flags bit 0 the harness rewrites the metadata's sizes and hashes to the
files' own (when the metadata is a JSON object with ``files``), so the checks behind the
hash (structure across files, values, the image header) are fuzzed too. An opened dataset
is then used as training uses it: items, the image store, PRIOR's per-document scales.
"""

from __future__ import annotations

import json
import os
from typing import Callable

import numpy as np

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import Corpus
from megatron_prior.data.formats import FormatError, dataset_files, metadata_path, verified_path
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.files import sha256_file
from megatron_prior.tokenizer import load_tokenizer

ERRORS = (FormatError,)
ROLES = tuple(dataset_files("")) + ("metadata",)


def _paths(prefix: str) -> list[str]:
    return list(dataset_files(prefix).values()) + [metadata_path(prefix)]


def seeds(corpus: Corpus) -> list[bytes]:
    files = [open(p, "rb").read() if os.path.exists(p) else None for p in _paths(corpus.data)]
    meta = json.loads(files[-1])
    bare = dict(meta, files={k: v for k, v in meta["files"].items() if not k.startswith(("kinds", "images"))})
    without = [None if role.startswith(("kinds", "images")) else f for role, f in zip(ROLES, files)]
    return [pack(0, files), pack(1, files), pack(1, without[:-1] + [json.dumps(bare).encode()])]


def _bind_files_as_they_are(prefix: str) -> None:
    path = metadata_path(prefix)
    try:
        with open(path, "rb") as f:
            meta = json.loads(f.read())
        files = meta["files"]
        for role, file in dataset_files(prefix).items():
            if isinstance(files.get(role), dict) and os.path.isfile(file):
                files[role].update(size=os.path.getsize(file), sha256=sha256_file(file))
        text = json.dumps(meta)
    except (OSError, ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return  # absent, or not an object with 'files': the reader gets it as it is
    with open(path, "w") as f:
        f.write(text)


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    prefix = os.path.join(workdir, "t")
    paths = _paths(prefix)
    tokenizer = load_tokenizer(corpus.tokenizer)
    vocab = tokenizer.vocab_size

    def one(data: bytes) -> None:
        flags, parts = unpack(data, len(paths))
        write_files(paths, parts)
        if os.path.exists(verified_path(prefix)):
            os.remove(verified_path(prefix))
        if flags & 1:
            _bind_files_as_they_are(prefix)
        ds = WeightedIndexedDataset(prefix, tokenizer.fingerprint if flags & 2 else None, vocab)
        n = len(ds)
        assert len(ds.token_array) == len(ds.logprob_array) == ds.sequence_offsets[-1]
        assert np.all(ds.logprob_array <= 0) and np.all((ds.token_array >= 0) & (ds.token_array < vocab))
        if ds.has_kinds:
            assert len(ds.kind_array) == len(ds.token_array) and np.all(ds.kind_array < len(KIND_NAMES))
        for i in {0, n - 1} if n else ():
            tokens, logprobs = ds[i]
            assert len(tokens) == len(logprobs) == ds.sequence_lengths[i]
        if ds.has_images:
            store = ds.open_images()
            assert len(store) == n and (n == 0 or store[n - 1].shape == store.shape[1:])
        scales = ds.document_scales(1.0, tokenizer.eod, True, tokenizer.pad)
        assert len(scales) == n and np.all(np.isfinite(scales))

    return one
