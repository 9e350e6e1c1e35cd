"""The writer of a PRIOR dataset: tokens, log-probs, kinds and images, committed as one set.

Every file is streamed to a temporary name beside its final one (``files.temp_path``) and
renamed into place only when all are complete, after the metadata binding them by content
hash was written (``formats``). A write that stops half-way through the renames therefore
leaves a set that refuses to open, never a mix of two datasets that opens. Leaving the writer
by an exception removes its temporary files; those of a killed writer are removed by the
next write onto the same prefix.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexWriter, get_bin_path

from megatron_prior.data.formats import (
    FORMAT_VERSION,
    ScoreMetadata,
    all_files,
    dataset_files,
    metadata_path,
    record_verified,
)
from megatron_prior.data.images import DEFAULT_ASPECT, AnyImageStore, image_store_writer
from megatron_prior.files import remove_stale_temps, sha256_file, temp_path

# Rename order: the metadata, then companions, the token files last (stock megatron-core only
# looks at those); the content hashes make any prefix of this order refuse to open.
_COMMIT_ORDER = ("images", "kinds.bin", "kinds.idx", "logprobs.bin", "logprobs.idx", "tokens.bin", "tokens.idx")


class WeightedDatasetWriter:
    """Writes ``T.bin/.idx`` (through megatron-core's builder) and its companions.

    One sequence per document, as megatron's ``preprocess_data.py`` writes without sentence
    splitting. Log-probs are given per document, or all at the end through
    ``fill_logprobs`` (for references that need the whole corpus first, like the unigram).
    ``image_size`` (H, W) adds an image store, one image per document: ``image_store`` ``raw``
    takes decoded uint8 ``[H, W, 3]`` arrays, ``encoded`` the image files' bytes, decoded to
    H x W per ``image_aspect`` when read (``images``). Use as a context manager: leaving it by
    an exception removes every temporary file.
    """

    def __init__(self, prefix: str, token_dtype: type, with_kinds: bool = False,
                 image_size: Optional[tuple[int, int]] = None, image_store: str = "raw",
                 image_aspect: Optional[str] = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        remove_stale_temps(all_files(prefix))
        roles = ["tokens.bin", "tokens.idx", "logprobs.bin", "logprobs.idx"]
        roles += ["kinds.bin", "kinds.idx"] if with_kinds else []
        roles += ["images"] if image_size else []
        finals = dataset_files(prefix)
        self._finals = {role: finals[role] for role in roles}
        self._temps = {role: temp_path(final) for role, final in self._finals.items()}
        self._meta_temp = temp_path(metadata_path(prefix))
        self._handles: list = []
        self.images = None
        self._kinds_file = None
        try:
            self.builder = IndexedDatasetBuilder(self._temps["tokens.bin"], dtype=token_dtype)
            self._handles.append(self.builder.data_file)
            self._lp_file = open(self._temps["logprobs.bin"], "wb")
            self._handles.append(self._lp_file)
            if with_kinds:
                self._kinds_file = open(self._temps["kinds.bin"], "wb")
                self._handles.append(self._kinds_file)
            if image_size:
                aspect = image_aspect if image_aspect or image_store == "raw" else DEFAULT_ASPECT
                self.images = image_store_writer(self._temps["images"], image_store, *image_size, aspect)
                self._handles.append(self.images._file)
        except BaseException:
            self.abort()
            raise
        self._logprobs_written = 0
        self.token_count = 0

    def __enter__(self) -> "WeightedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_document(self, tokens: np.ndarray, logprobs: Optional[np.ndarray] = None,
                     kinds: Optional[np.ndarray] = None, image: Optional[np.ndarray | bytes] = None) -> None:
        n = len(tokens)
        tokens = np.asarray(tokens)
        if n:
            # megatron-core's builder casts without a check: an id past the dtype would wrap.
            limits, low, high = np.iinfo(self.builder.dtype), int(tokens.min()), int(tokens.max())
            if low < limits.min or high > limits.max:
                raise ValueError(f"{get_bin_path(self.prefix)}: token id {high if high > limits.max else low} does "
                                 f"not fit the token file's {np.dtype(self.builder.dtype).name}: the tokenizer's "
                                 "ids must come from the vocabulary the dtype was chosen for")
        if logprobs is not None:
            if len(logprobs) != n or self._logprobs_written != self.token_count:
                raise ValueError("log-probs must come with every document, one per token")
            self._lp_file.write(np.asarray(logprobs, dtype=np.float32).tobytes())
            self._logprobs_written += n
        if (kinds is not None) != (self._kinds_file is not None):
            raise ValueError("kinds must be given for every document iff the writer has kinds")
        if (image is not None) != (self.images is not None):
            raise ValueError("an image must be given for every document iff the writer has images")
        if kinds is not None:
            if len(kinds) != n:
                raise ValueError(f"{len(kinds)} kinds for {n} tokens")
            self._kinds_file.write(np.asarray(kinds, dtype=np.uint8).tobytes())
        if image is not None:
            self.images.add(image)
        self.builder.add_document(tokens, [n])
        self.token_count += n

    def add_shard(self, prefix: str, images: Optional[AnyImageStore] = None) -> None:
        """Append a whole finished dataset (tokens via megatron-core's ``add_index``)."""
        if (images is not None) != (self.images is not None):
            raise ValueError(f"{prefix}: images must come with every shard iff the writer has images")
        self.builder.add_index(prefix)
        shard = dataset_files(prefix)
        for role, dst in [("logprobs.bin", self._lp_file)] + ([("kinds.bin", self._kinds_file)]
                                                             if self._kinds_file is not None else []):
            with open(shard[role], "rb") as f:
                while block := f.read(1 << 24):
                    dst.write(block)
        if images is not None:
            self.images.add_store(images)
        self.token_count = int(np.sum(self.builder.sequence_lengths, dtype=np.int64))
        self._logprobs_written = self.token_count

    def fill_logprobs(self, score: Callable[[np.ndarray], np.ndarray], chunk: int = 1 << 24) -> None:
        """Write every log-prob at once, ``score`` mapping a flat token chunk to its log-probs."""
        if self._logprobs_written:
            raise ValueError("log-probs were already written per document")
        self.builder.data_file.flush()
        if self.token_count:
            tokens = np.memmap(self._temps["tokens.bin"], dtype=self.builder.dtype, mode="r")
            for start in range(0, self.token_count, chunk):
                self._lp_file.write(np.asarray(score(tokens[start:start + chunk]), np.float32).tobytes())
            del tokens
        self._logprobs_written = self.token_count

    def finalize(self, tokenizer_fingerprint: str, reference: dict, notes: Optional[dict] = None) -> ScoreMetadata:
        """Close every file, bind them in the metadata and rename the set into place."""
        try:
            return self._finalize(tokenizer_fingerprint, reference, notes)
        except BaseException:
            self.abort()
            raise

    def _finalize(self, tokenizer_fingerprint: str, reference: dict, notes: Optional[dict]) -> ScoreMetadata:
        if self._logprobs_written != self.token_count:
            raise ValueError(f"{self._logprobs_written} log-probs for {self.token_count} tokens")
        if self.images is not None and self.images.count != len(self.builder.sequence_lengths):
            raise ValueError(f"{self.images.count} images for {len(self.builder.sequence_lengths)} documents")
        self.builder.finalize(self._temps["tokens.idx"])
        self._lp_file.close()
        lengths, docs = self.builder.sequence_lengths, self.builder.document_indices
        with _IndexWriter(self._temps["logprobs.idx"], np.float32) as writer:
            writer.write(lengths, None, docs)
        if self._kinds_file is not None:
            self._kinds_file.close()
            with _IndexWriter(self._temps["kinds.idx"], np.uint8) as writer:
                writer.write(lengths, None, docs)
        if self.images is not None:
            self.images.close()
        digests = {role: sha256_file(path) for role, path in self._temps.items()}
        files = {role: {"size": os.path.getsize(self._temps[role]), "sha256": digest}
                 for role, digest in digests.items()}
        if self.images is not None:
            files["images"].update(self.images.binding())
        meta = ScoreMetadata(
            tokenizer_fingerprint=tokenizer_fingerprint,
            reference=reference,
            files=files,
            token_count=self.token_count,
            sequence_count=len(lengths),
            document_count=len(docs) - 1,
            format_version=FORMAT_VERSION,
            notes=notes or {},
        )
        meta.save(self._meta_temp)
        os.replace(self._meta_temp, metadata_path(self.prefix))
        # Companions of an earlier write that this set does not have would be refused as
        # unbound leftovers; until the metadata above is in place they are still the old set's.
        for role, final in dataset_files(self.prefix).items():
            if role not in self._finals and os.path.lexists(final):
                os.remove(final)
        for role in _COMMIT_ORDER:
            if role in self._temps:
                os.replace(self._temps[role], self._finals[role])
        self._temps = {}
        record_verified(self.prefix, digests)
        return meta

    def abort(self) -> None:
        """Close and remove every temporary file (a no-op once committed)."""
        for handle in self._handles:
            if not handle.closed:
                handle.close()
        for path in list(self._temps.values()) + [self._meta_temp]:
            if os.path.exists(path):
                os.remove(path)
        self._temps = {}
