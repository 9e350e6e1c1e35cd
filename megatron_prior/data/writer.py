"""The writers of a PRIOR dataset: tokens, log-probs, kinds and images, committed as one set;
and image-conditioned scores added to such a set afterwards.

Every file is streamed to a temporary name beside its final one (``files.temp_path``) and
renamed into place only when all are complete, after the metadata binding them by content
hash was written (``formats``). A write that stops half-way through the renames therefore
leaves a set that refuses to open, never a mix of two datasets that opens. Leaving a writer
by an exception removes its temporary files; those of a killed writer are removed by the
next write onto the same prefix.

Both writers are one mechanism (``_SetWriter``): per-token float32 sidecars streamed by
``_FloatSidecar`` (the reference log-probs; the image scores), their ``.idx`` written from the
token files' structure, and one commit (``_SetWriter._commit``). ``WeightedDatasetWriter`` writes
a whole dataset; ``ImageScoreWriter`` adds ``T.imglogprobs`` and ``T.imgdelta`` to a finished
one, binding them in a new metadata that keeps every other file's binding as it was.
"""

from __future__ import annotations

import os
from typing import Callable, Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, _IndexWriter, get_bin_path

from megatron_prior.data.formats import (
    FORMAT_VERSION,
    IMAGE_SCORE_ROLES,
    IMAGE_SCORE_VALUES,
    FormatError,
    ScoreMetadata,
    all_files,
    dataset_files,
    metadata_path,
    record_verified,
    verify_files,
)
from megatron_prior.data.images import DEFAULT_ASPECT, AnyImageStore, image_store_writer
from megatron_prior.files import remove_stale_temps, sha256_file, temp_path

# Rename order: the metadata, then companions, the token files last (stock megatron-core only
# looks at those); the content hashes make any prefix of this order refuse to open.
_COMMIT_ORDER = ("images", "kinds.bin", "kinds.idx") + IMAGE_SCORE_ROLES + (
    "logprobs.bin", "logprobs.idx", "tokens.bin", "tokens.idx")


class _FloatSidecar:
    """One float32 value per token, streamed to the temporary ``.bin`` of sidecar ``name``; its
    ``.idx`` (megatron-core's ``_IndexWriter``) holds the token files' lengths and documents."""

    def __init__(self, name: str, temps: dict[str, str]) -> None:
        self.name, self._temps = name, temps
        self.file = open(temps[f"{name}.bin"], "wb")
        self.written = 0

    def write(self, values: np.ndarray) -> None:
        self.file.write(np.asarray(values, dtype=np.float32).tobytes())
        self.written += len(values)

    def copy_from(self, path: str, count: int) -> None:
        """Append a finished sidecar's ``.bin`` of ``count`` values."""
        with open(path, "rb") as f:
            while block := f.read(1 << 24):
                self.file.write(block)
        self.written += count

    def finish(self, lengths: np.ndarray, document_indices: np.ndarray) -> None:
        self.file.close()
        with _IndexWriter(self._temps[f"{self.name}.idx"], np.float32) as writer:
            writer.write(lengths, None, document_indices)


class _SetWriter:
    """Temporary files of some roles of ``prefix`` and their commit (see the module docstring)."""

    def __init__(self, prefix: str, roles: list[str]) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        remove_stale_temps(all_files(prefix))
        finals = dataset_files(prefix)
        self._finals = {role: finals[role] for role in roles}
        self._temps = {role: temp_path(final) for role, final in self._finals.items()}
        self._meta_temp = temp_path(metadata_path(prefix))
        self._handles: list = []

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def _sidecar(self, name: str) -> _FloatSidecar:
        sidecar = _FloatSidecar(name, self._temps)
        self._handles.append(sidecar.file)
        return sidecar

    def _commit(self, meta: ScoreMetadata, digests: dict[str, str]) -> None:
        """Bind ``meta`` and rename the temporaries into place; ``digests`` are the sha256 of
        every file ``meta`` binds (seeding the verified-hash cache)."""
        meta.save(self._meta_temp)
        os.replace(self._meta_temp, metadata_path(self.prefix))
        # Companions of an earlier write that this set does not have would be refused as
        # unbound leftovers; until the metadata above is in place they are still the old set's.
        for role, final in dataset_files(self.prefix).items():
            if role not in meta.files and os.path.lexists(final):
                os.remove(final)
        for role in _COMMIT_ORDER:
            if role in self._temps:
                os.replace(self._temps[role], self._finals[role])
        self._temps = {}
        record_verified(self.prefix, digests)

    def _hash_temps(self) -> dict[str, str]:
        return {role: sha256_file(path) for role, path in self._temps.items()}

    def abort(self) -> None:
        """Close and remove every temporary file (a no-op once committed)."""
        for handle in self._handles:
            if not handle.closed:
                handle.close()
        for path in list(self._temps.values()) + [self._meta_temp]:
            if os.path.exists(path):
                os.remove(path)
        self._temps = {}


class WeightedDatasetWriter(_SetWriter):
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
        roles = ["tokens.bin", "tokens.idx", "logprobs.bin", "logprobs.idx"]
        roles += ["kinds.bin", "kinds.idx"] if with_kinds else []
        roles += ["images"] if image_size else []
        super().__init__(prefix, roles)
        self.images = None
        self._kinds_file = None
        try:
            self.builder = IndexedDatasetBuilder(self._temps["tokens.bin"], dtype=token_dtype)
            self._handles.append(self.builder.data_file)
            self._logprobs = self._sidecar("logprobs")
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
        self.token_count = 0

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
            if len(logprobs) != n or self._logprobs.written != self.token_count:
                raise ValueError("log-probs must come with every document, one per token")
            self._logprobs.write(logprobs)
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
        count = int(np.sum(self.builder.sequence_lengths, dtype=np.int64)) - self.token_count
        self._logprobs.copy_from(shard["logprobs.bin"], count)
        if self._kinds_file is not None:
            with open(shard["kinds.bin"], "rb") as f:
                while block := f.read(1 << 24):
                    self._kinds_file.write(block)
        if images is not None:
            self.images.add_store(images)
        self.token_count += count

    def fill_logprobs(self, score: Callable[[np.ndarray], np.ndarray], chunk: int = 1 << 24) -> None:
        """Write every log-prob at once, ``score`` mapping a flat token chunk to its log-probs."""
        if self._logprobs.written:
            raise ValueError("log-probs were already written per document")
        self.builder.data_file.flush()
        if self.token_count:
            tokens = np.memmap(self._temps["tokens.bin"], dtype=self.builder.dtype, mode="r")
            for start in range(0, self.token_count, chunk):
                self._logprobs.write(score(tokens[start:start + chunk]))
            del tokens

    def finalize(self, tokenizer_fingerprint: str, reference: dict, notes: Optional[dict] = None) -> ScoreMetadata:
        """Close every file, bind them in the metadata and rename the set into place."""
        try:
            return self._finalize(tokenizer_fingerprint, reference, notes)
        except BaseException:
            self.abort()
            raise

    def _finalize(self, tokenizer_fingerprint: str, reference: dict, notes: Optional[dict]) -> ScoreMetadata:
        if self._logprobs.written != self.token_count:
            raise ValueError(f"{self._logprobs.written} log-probs for {self.token_count} tokens")
        if self.images is not None and self.images.count != len(self.builder.sequence_lengths):
            raise ValueError(f"{self.images.count} images for {len(self.builder.sequence_lengths)} documents")
        self.builder.finalize(self._temps["tokens.idx"])
        lengths, docs = self.builder.sequence_lengths, self.builder.document_indices
        self._logprobs.finish(lengths, docs)
        if self._kinds_file is not None:
            self._kinds_file.close()
            with _IndexWriter(self._temps["kinds.idx"], np.uint8) as writer:
                writer.write(lengths, None, docs)
        if self.images is not None:
            self.images.close()
        digests = self._hash_temps()
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
        self._commit(meta, digests)
        return meta


class ImageScoreWriter(_SetWriter):
    """Adds the image-conditioned scores (``T.imglogprobs``, ``T.imgdelta``: ``formats``) to the
    finished dataset ``prefix`` whose metadata is ``metadata`` and token structure
    ``lengths``/``document_indices`` (one sequence per document); scores already there are replaced.

    Give each document's scores in order (``add_document``), then ``finalize(image_scorer)``:
    the dataset's files are verified once more against ``metadata`` (a dataset rewritten while
    it was being scored is refused, naming the file), and a new metadata binding them as before
    plus the new sidecars is committed. Use as a context manager, as ``WeightedDatasetWriter``.
    """

    def __init__(self, prefix: str, metadata: ScoreMetadata, lengths: np.ndarray,
                 document_indices: np.ndarray) -> None:
        super().__init__(prefix, list(IMAGE_SCORE_ROLES))
        self.metadata = metadata
        self._lengths, self._documents = np.asarray(lengths), np.asarray(document_indices)
        self._documents_written = 0
        try:
            self._sidecars = {name: self._sidecar(name) for name in IMAGE_SCORE_VALUES}
        except BaseException:
            self.abort()
            raise

    def add_document(self, scores: dict[str, np.ndarray]) -> None:
        """The next document's scores, one array per ``IMAGE_SCORE_VALUES`` name, one value per token."""
        d = self._documents_written
        if d >= len(self._lengths):
            raise ValueError(f"{self.prefix}: more documents than its {len(self._lengths)}")
        if sorted(scores) != sorted(self._sidecars):
            raise ValueError(f"scores must be given for {sorted(self._sidecars)}, got {sorted(scores)}")
        for name, values in scores.items():
            if len(values) != self._lengths[d]:
                raise ValueError(f"{self.prefix}: document {d} has {self._lengths[d]} tokens, {name} gives "
                                 f"{len(values)} values")
            self._sidecars[name].write(values)
        self._documents_written += 1

    def finalize(self, image_scorer: dict) -> ScoreMetadata:
        """Bind the new sidecars (``image_scorer`` describes the model that made them) and commit."""
        try:
            return self._finalize(image_scorer)
        except BaseException:
            self.abort()
            raise

    def _finalize(self, image_scorer: dict) -> ScoreMetadata:
        if self._documents_written != len(self._lengths):
            raise ValueError(f"{self.prefix}: scores for {self._documents_written} of {len(self._lengths)} documents")
        current = ScoreMetadata.load(metadata_path(self.prefix))
        keep = {role: entry for role, entry in self.metadata.files.items() if role not in IMAGE_SCORE_ROLES}
        if {role: e for role, e in current.files.items() if role not in IMAGE_SCORE_ROLES} != keep:
            raise FormatError(metadata_path(self.prefix), "the dataset was rewritten while it was being scored: "
                                                           "score it again")
        verify_files(self.prefix, current)
        for sidecar in self._sidecars.values():
            sidecar.finish(self._lengths, self._documents)
        digests = self._hash_temps()
        files = {**keep, **{role: {"size": os.path.getsize(self._temps[role]), "sha256": digest}
                            for role, digest in digests.items()}}
        meta = ScoreMetadata(**{**self.metadata.__dict__, "files": files,
                                "image_scorer": {**image_scorer, "values": dict(IMAGE_SCORE_VALUES)}})
        self._commit(meta, {**{role: e["sha256"] for role, e in keep.items()}, **digests})
        return meta
