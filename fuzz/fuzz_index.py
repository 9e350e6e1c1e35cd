"""MMIDIDX index reader (``formats.read_index``): ``.idx`` and ``.bin`` of one prefix.

Flags choose the dtypes the caller admits (tokens, float32 scores, or any). Whatever the
reader accepts must be consistent: the offsets end where the data ends, every pointer and
document index lies inside.
"""

from __future__ import annotations

import os
from typing import Callable

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import Corpus
from megatron_prior.data.formats import TOKEN_DTYPE_CODES, FormatError, kinds_prefix, read_index, scores_prefix

ERRORS = (FormatError,)
DTYPE_CODES = (TOKEN_DTYPE_CODES, {7}, None)  # by flags % 3


def _read(prefix: str) -> list[bytes]:
    return [open(path, "rb").read() for path in (get_idx_path(prefix), get_bin_path(prefix))]


def seeds(corpus: Corpus) -> list[bytes]:
    return [pack(flags, _read(prefix)) for flags, prefix in (
        (0, corpus.data), (1, scores_prefix(corpus.data)), (2, kinds_prefix(corpus.data)))]


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    prefix = os.path.join(workdir, "t")
    paths = (get_idx_path(prefix), get_bin_path(prefix))

    def one(data: bytes) -> None:
        flags, parts = unpack(data, 2)
        write_files(paths, parts)
        info = read_index(prefix, DTYPE_CODES[flags % 3])
        offsets, flat = info.offsets(), info.data()
        n = len(info.sequence_lengths)
        assert offsets[-1] == len(flat) and len(info.sequence_pointers) == n
        assert info.document_indices[0] == 0 and info.document_indices[-1] == n
        if n:  # megatron-core's reader, which the datasets use after this check, sees the same data
            stock = IndexedDataset(prefix)  # held: its items view its memory map, closed when it goes
            assert np.array_equal(stock[n - 1], flat[offsets[-2]:offsets[-1]])

    return one
