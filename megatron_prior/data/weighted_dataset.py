"""A Megatron token dataset opened together with its reference log-probs (and token kinds).

``WeightedIndexedDataset(T)`` validates ``T.bin/.idx``, ``T.logprobs.bin/.idx/.json`` and,
when the metadata binds them, ``T.kinds.bin/.idx``, ``T.images`` and the image-conditioned
scores ``T.imglogprobs.bin/.idx`` and ``T.imgdelta.bin/.idx`` (see ``formats``): their
structure, their content hashes, and, on the first open, their values (log-probs, kinds, image
scores, and token ids against the tokenizer's vocabulary). Anything inconsistent is refused with a
``FormatError`` that names the file and the problem. It is also the low-level
dataset of ``WeightedGPTDataset``: it offers what megatron-core's ``GPTDataset`` uses of an
``IndexedDataset`` (``sequence_lengths``, ``document_indices``, ``get``, ``path_prefix``),
read through megatron-core's own ``IndexedDataset``, plus the flat memory-mapped arrays the
packer works on.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDataset, get_bin_path, get_idx_path

from megatron_prior.data import packing
from megatron_prior.data.formats import (
    IMAGE_SCORE_VALUES,
    TOKEN_DTYPE_CODES,
    FormatError,
    IndexInfo,
    ScoreMetadata,
    images_path,
    kinds_prefix,
    metadata_path,
    read_index,
    scores_prefix,
    sidecar_prefix,
    verify_files,
)
from megatron_prior.data.images import AnyImageStore, open_image_store
from megatron_prior.data.kinds import KIND_NAMES

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
    """Tokens + per-token reference log-probs (+ kinds, + images) of one preprocessed corpus.

    Args:
        path_prefix: the token prefix ``T`` (without ``.bin``/``.idx``).
        tokenizer_fingerprint: when given, the scores must have been made with this tokenizer.
        vocab_size: when given, every token id must lie in ``[0, vocab_size)``.
        check_values: scan every log-prob for NaN, infinities and positive values, every kind
            for unknown ids, and every token id against ``vocab_size``. Done on the first
            open; a pickled copy (a DataLoader worker) re-checks the structure, and the files'
            stat against the one verified, only.
    """

    def __init__(self, path_prefix: str, tokenizer_fingerprint: Optional[str] = None,
                 vocab_size: Optional[int] = None, check_values: bool = True,
                 _verified: Optional[dict] = None) -> None:
        self.path_prefix = path_prefix
        self._tokenizer_fingerprint, self._vocab_size = tokenizer_fingerprint, vocab_size
        tokens = read_index(path_prefix, TOKEN_DTYPE_CODES)
        if vocab_size is not None and vocab_size - 1 > np.iinfo(tokens.dtype).max:
            raise FormatError(get_bin_path(path_prefix), f"{tokens.dtype.name} token ids cannot hold the {vocab_size} "
                                                         "ids of the tokenizer in use: the data were made with "
                                                         "another tokenizer")
        scores = read_index(scores_prefix(path_prefix), {7})
        _check_same_structure(tokens, scores)
        self.metadata = self._check_metadata(tokens, tokenizer_fingerprint)
        kinds = None
        if "kinds.bin" in self.metadata.files:
            kinds = read_index(kinds_prefix(path_prefix), {1})
            _check_same_structure(tokens, kinds)
        image_scores = {}
        if self.metadata.has_image_scores:
            for name in IMAGE_SCORE_VALUES:
                image_scores[name] = read_index(sidecar_prefix(path_prefix, name), {7})
                _check_same_structure(tokens, image_scores[name])
        self._image_shape = self.metadata.files.get("images")
        if self._image_shape is not None:
            self.open_images()  # the header against the metadata, before any hashing
        self._verified = verify_files(path_prefix, self.metadata, _verified)

        self.sequence_offsets = tokens.offsets()
        self.token_array = tokens.data()
        self.logprob_array = scores.data()
        self.kind_array = kinds.data() if kinds is not None else None
        # Per-token float32 scores by sidecar name: what the weightings read (packing.WEIGHTING_SCORES).
        self.score_arrays = {"logprobs": self.logprob_array,
                             **{name: info.data() for name, info in image_scores.items()}}
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
        counts = {"token_count": int(tokens.sequence_lengths.sum(dtype=np.int64)),
                  "sequence_count": len(tokens.sequence_lengths),
                  "document_count": len(tokens.document_indices) - 1}
        for key, actual in counts.items():
            if getattr(meta, key) != actual:
                raise FormatError(path, f"{key} {getattr(meta, key)}, but {idx_path} holds {actual}")
        if tokenizer_fingerprint is not None and meta.tokenizer_fingerprint != tokenizer_fingerprint:
            raise FormatError(path, f"scored with tokenizer {meta.tokenizer_fingerprint}, not with "
                                    f"the tokenizer in use ({tokenizer_fingerprint})")
        return meta

    def _scan(self, array: np.ndarray, path: str, problems: Callable[[np.ndarray], list]) -> None:
        """Raise at the first element that ``problems(chunk)`` flags (a list of (what, mask,
        why)), in chunks of the memory map, so a corpus of any size is read once in bounded
        memory."""
        for start in range(0, len(array), _CHECK_CHUNK):
            chunk = np.asarray(array[start:start + _CHECK_CHUNK])
            for what, bad, why in problems(chunk):
                where = np.flatnonzero(bad)
                if len(where):
                    element = start + int(where[0])
                    raise FormatError(path, f"{what} {chunk[where[0]]} at token {element} (sequence "
                                            f"{_first_sequence_of(self.sequence_offsets, element)}){why}")

    def _check_values(self) -> None:
        self._scan(self.logprob_array, get_bin_path(scores_prefix(self.path_prefix)), lambda c: [
            ("NaN log-prob", np.isnan(c), ""), ("infinite log-prob", np.isinf(c), ""),
            ("positive log-prob", c > 0, ": a log-probability is <= 0")])
        for name, array in self.score_arrays.items():
            if name != "logprobs":  # log-probs (<= 0) and logit differences: finite
                self._scan(array, get_bin_path(sidecar_prefix(self.path_prefix, name)), lambda c, name=name: [
                    (f"NaN {name} score", np.isnan(c), ""), (f"infinite {name} score", np.isinf(c), "")]
                    + ([("positive log-prob", c > 0, ": a log-probability is <= 0")] if name == "imglogprobs" else []))
        if self.kind_array is not None:
            self._scan(self.kind_array, get_bin_path(kinds_prefix(self.path_prefix)),
                       lambda c: [("unknown kind id", c >= len(KIND_NAMES), "")])
        if self._vocab_size is not None:
            vocab = self._vocab_size
            self._scan(self.token_array, get_bin_path(self.path_prefix), lambda c: [
                ("token id", (c < 0) | (c >= vocab), f" outside the tokenizer's vocabulary [0, {vocab})")])

    @property
    def has_images(self) -> bool:
        return self._image_shape is not None

    def open_images(self) -> AnyImageStore:
        """The image store the metadata binds (image ``i`` for sequence ``i``), raw or encoded."""
        path = images_path(self.path_prefix)
        if self._image_shape is None:
            raise FormatError(path, f"missing file ({metadata_path(self.path_prefix)} binds no images: "
                                    "preprocess with --image-key)")
        return open_image_store(path, expected=self._image_shape)

    def __getstate__(self) -> dict:
        return {"path_prefix": self.path_prefix, "tokenizer_fingerprint": self._tokenizer_fingerprint,
                "vocab_size": self._vocab_size, "verified": self._verified, "scales": self._scales_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path_prefix"], state["tokenizer_fingerprint"], state["vocab_size"],
                      check_values=False, _verified=state["verified"])
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

    def weighting_scores(self, weighting: packing.WeightingLike) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """The flat per-token ``(scores, minus)`` arrays ``weighting`` reads (``minus`` None for one);
        image scores this dataset lacks are refused naming its metadata and the tool that adds them."""
        weighting = packing.as_weighting(weighting)
        names = packing.WEIGHTING_SCORES[weighting.name]
        missing = [n for n in names if n is not None and n not in self.score_arrays]
        if missing:
            raise FormatError(metadata_path(self.path_prefix),
                              f"binds no image-conditioned scores ({', '.join(missing)}), which weighting "
                              f"{weighting.name!r} reads: add them with tools/score_with_images.py --data-path "
                              f"{self.path_prefix} --load LVLM_CHECKPOINT --tokenizer-model ...")
        return self.score_arrays[names[0]], None if names[1] is None else self.score_arrays[names[1]]

    def token_weights(self, sequence: int, weighting: packing.WeightingLike,
                      length: Optional[int] = None) -> np.ndarray:
        """``packing.token_weights`` of the first ``length`` tokens of sequence ``sequence``
        (before the per-caption normalisation: ``document_scales``)."""
        scores, minus = self.weighting_scores(weighting)
        lo = int(self.sequence_offsets[sequence])
        hi = int(self.sequence_offsets[sequence + 1]) if length is None else lo + length
        return packing.token_weights(scores[lo:hi], weighting, None if minus is None else minus[lo:hi])

    def document_scales(self, weighting: packing.WeightingLike, eod_id: int, mask_eod: bool,
                        pad_id: int) -> np.ndarray:
        """The per-sequence normaliser of ``weighting`` (a number: PRIOR's alpha;
        ``packing.document_scales``), computed once per setting."""
        weighting = packing.as_weighting(weighting)
        key = (weighting.key(), int(eod_id), bool(mask_eod), int(pad_id))
        if key not in self._scales_cache:
            scores, minus = self.weighting_scores(weighting)
            self._scales_cache[key] = packing.document_scales(
                self.token_array, scores, self.sequence_offsets, weighting, eod_id, mask_eod, pad_id, minus=minus)
        return self._scales_cache[key]
