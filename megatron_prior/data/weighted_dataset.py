"""A Megatron token dataset opened together with its reference log-probs (and token kinds).

``WeightedIndexedDataset(T)`` validates ``T.bin/.idx``, ``T.logprobs.bin/.idx/.json`` and,
when present, ``T.kinds.bin/.idx`` (see ``formats``), and refuses anything inconsistent
with a ``FormatError`` that names the file and the problem. It is also the low-level
dataset of ``WeightedGPTDataset``: it offers what megatron-core's ``GPTDataset`` uses of an
``IndexedDataset`` (``sequence_lengths``, ``document_indices``, ``get``, ``path_prefix``),
read through megatron-core's own ``IndexedDataset``, plus the flat memory-mapped arrays the
packer works on.
"""

from __future__ import annotations

import os
from typing import Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megatron_prior.data import packing
from megatron_prior.data.formats import (
    TOKEN_DTYPE_CODES,
    FormatError,
    IndexInfo,
    ScoreMetadata,
    kinds_prefix,
    metadata_path,
    read_index,
    scores_prefix,
)
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.files import sha256_file

_CHECK_CHUNK = 1 << 24


def _first_sequence_of(offsets: np.ndarray, element: int) -> int:
    return int(np.searchsorted(offsets, element, side="right") - 1)


def _check_same_structure(tokens: IndexInfo, other: IndexInfo) -> None:
    other_idx = get_idx_path(other.prefix)
    if len(other.sequence_lengths) != len(tokens.sequence_lengths):
        raise FormatError(other_idx, f"{len(other.sequence_lengths)} sequences, but "
                                     f"{get_idx_path(tokens.prefix)} has {len(tokens.sequence_lengths)}")
    differ = np.flatnonzero(other.sequence_lengths != tokens.sequence_lengths)
    if len(differ):
        i = int(differ[0])
        raise FormatError(other_idx, f"sequence lengths differ from {get_idx_path(tokens.prefix)} "
                                     f"({len(differ)} sequences, first {i}: {other.sequence_lengths[i]} "
                                     f"vs {tokens.sequence_lengths[i]})")
    if not np.array_equal(other.document_indices, tokens.document_indices):
        raise FormatError(other_idx, f"document indices differ from {get_idx_path(tokens.prefix)}")


class WeightedIndexedDataset:
    """Tokens + per-token reference log-probs (+ kinds) of one preprocessed corpus.

    Args:
        path_prefix: the token prefix ``T`` (without ``.bin``/``.idx``).
        tokenizer_fingerprint: when given, the scores must have been made with this tokenizer.
        check_values: scan every log-prob for NaN, infinities and positive values (and every
            kind for unknown ids). Done on the first open; a pickled copy (a DataLoader
            worker) re-checks the structure only.
    """

    def __init__(self, path_prefix: str, tokenizer_fingerprint: Optional[str] = None,
                 check_values: bool = True) -> None:
        self.path_prefix = path_prefix
        self._tokenizer_fingerprint = tokenizer_fingerprint
        tokens = read_index(path_prefix, TOKEN_DTYPE_CODES)
        scores = read_index(scores_prefix(path_prefix), {7})
        _check_same_structure(tokens, scores)
        self.metadata = self._check_metadata(tokens, tokenizer_fingerprint)
        kinds = None
        k = kinds_prefix(path_prefix)
        if os.path.exists(get_idx_path(k)) or os.path.exists(get_bin_path(k)):
            kinds = read_index(k, {1})
            _check_same_structure(tokens, kinds)

        self.sequence_offsets = tokens.offsets()
        self.token_array = tokens.data()
        self.logprob_array = scores.data()
        self.kind_array = kinds.data() if kinds is not None else None
        if check_values:
            self._check_values()

        # megatron-core's reader serves get() exactly as GPTDataset expects it.
        self.tokens = IndexedDataset(path_prefix)
        self.logprobs = IndexedDataset(scores.prefix)
        self.kinds = IndexedDataset(kinds.prefix) if kinds is not None else None
        self._scales_cache: dict[tuple, np.ndarray] = {}

    def _check_metadata(self, tokens: IndexInfo, tokenizer_fingerprint: Optional[str]) -> ScoreMetadata:
        path = metadata_path(self.path_prefix)
        meta = ScoreMetadata.load(path)
        idx_path = get_idx_path(self.path_prefix)
        if meta.tokens_idx_sha256 != sha256_file(idx_path):
            raise FormatError(path, f"bound to another token file: its tokens_idx_sha256 does not "
                                    f"match {idx_path}")
        total = int(tokens.sequence_lengths.sum(dtype=np.int64))
        if meta.token_count != total:
            raise FormatError(path, f"token_count {meta.token_count}, but {idx_path} holds {total}")
        if tokenizer_fingerprint is not None and meta.tokenizer_fingerprint != tokenizer_fingerprint:
            raise FormatError(path, f"scored with tokenizer {meta.tokenizer_fingerprint}, not with "
                                    f"the tokenizer in use ({tokenizer_fingerprint})")
        return meta

    def _check_values(self) -> None:
        path = get_bin_path(scores_prefix(self.path_prefix))
        for start in range(0, len(self.logprob_array), _CHECK_CHUNK):
            chunk = np.asarray(self.logprob_array[start:start + _CHECK_CHUNK])
            for problem, bad in (("NaN", np.isnan(chunk)), ("infinite", np.isinf(chunk)),
                                 ("positive (a log-probability is <= 0)", chunk > 0)):
                where = np.flatnonzero(bad)
                if len(where):
                    element = start + int(where[0])
                    raise FormatError(path, f"{problem} log-prob {chunk[where[0]]} at token {element} "
                                            f"(sequence {_first_sequence_of(self.sequence_offsets, element)})")
        if self.kind_array is not None:
            path = get_bin_path(kinds_prefix(self.path_prefix))
            for start in range(0, len(self.kind_array), _CHECK_CHUNK):
                chunk = np.asarray(self.kind_array[start:start + _CHECK_CHUNK])
                where = np.flatnonzero(chunk >= len(KIND_NAMES))
                if len(where):
                    raise FormatError(path, f"unknown kind id {chunk[where[0]]} at token {start + int(where[0])}")

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "tokenizer_fingerprint": self._tokenizer_fingerprint,
                "scales": self._scales_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"], state["tokenizer_fingerprint"], check_values=False)
        self._scales_cache = state["scales"]

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, idx: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens and log-probs of sequence ``idx``."""
        return self.tokens[idx], self.logprobs[idx]

    @property
    def sequence_lengths(self) -> np.ndarray:
        return self.tokens.sequence_lengths

    @property
    def document_indices(self) -> np.ndarray:
        return self.tokens.document_indices

    @property
    def has_kinds(self) -> bool:
        return self.kinds is not None

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> np.ndarray:
        """Tokens of sequence ``idx`` from ``offset`` (megatron-core's ``IndexedDataset.get``)."""
        return self.tokens.get(idx, offset, length)

    def document_scales(self, alpha: float, eod_id: int, mask_eod: bool, pad_id: int) -> np.ndarray:
        """PRIOR's per-sequence normaliser (``packing.document_scales``), computed once per setting."""
        key = (float(alpha), int(eod_id), bool(mask_eod), int(pad_id))
        if key not in self._scales_cache:
            self._scales_cache[key] = packing.document_scales(
                self.token_array, self.logprob_array, self.sequence_offsets, alpha, eod_id, mask_eod, pad_id)
        return self._scales_cache[key]
