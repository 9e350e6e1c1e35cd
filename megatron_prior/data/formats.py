"""On-disk formats of the per-token companions of a Megatron token file, and their writer.

For a token prefix ``T`` (``T.bin``/``T.idx``, megatron-core's MMIDIDX, written by its own
``IndexedDatasetBuilder``):

- ``T.logprobs.bin/.idx``: float32 MMIDIDX (dtype code 7) with the same sequence lengths
  and document indices, holding ``log p_ref(t_i | t_<i)`` per token;
- ``T.logprobs.json``: what binds them (format version, what the values are, the tokenizer
  fingerprint, the reference model, the sha256 of ``T.idx``, the token count);
- ``T.kinds.bin/.idx`` (optional): uint8 MMIDIDX of token kind ids (``kinds.KIND_NAMES``).

The companions' ``.idx`` files are written by megatron-core's own ``_IndexWriter`` from the
token builder's lengths and document indices, so stock ``IndexedDataset`` reads all three.
Everything is written under temporary names and renamed when complete, the token ``.idx``
last, so an interrupted run leaves nothing that looks finished.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import (
    DType,
    IndexedDatasetBuilder,
    _IndexReader,
    _IndexWriter,
    get_bin_path,
    get_idx_path,
)

from megatron_prior.files import sha256_file

FORMAT_VERSION = 1
LOGPROB_VALUES = "log p_ref(t_i | t_<i)"
INDEX_HEADER = b"MMIDIDX\x00\x00"
# magic (9) + version (8) + dtype code (1) + sequence count (8) + document count (8)
INDEX_HEADER_SIZE = 34
TOKEN_DTYPE_CODES = {1, 2, 3, 4, 5, 8}  # the integer codes of megatron-core's DType


class FormatError(ValueError):
    """A dataset file that is missing, damaged, or bound to something else."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def __reduce__(self):
        return FormatError, (self.path, self.problem)


def scores_prefix(prefix: str) -> str:
    return prefix + ".logprobs"


def kinds_prefix(prefix: str) -> str:
    return prefix + ".kinds"


def metadata_path(prefix: str) -> str:
    return prefix + ".logprobs.json"


@dataclass
class IndexInfo:
    """A validated MMIDIDX pair: the index arrays (memory-mapped) and the flat data."""

    prefix: str
    dtype: np.dtype
    sequence_lengths: np.ndarray  # int32 [n]
    sequence_pointers: np.ndarray  # int64 [n], bytes
    document_indices: np.ndarray  # int64 [d + 1]
    reader: _IndexReader = field(repr=False)  # owns the memory map the arrays view

    def offsets(self) -> np.ndarray:
        """Element offset of each sequence in the flat data, plus the end: int64 [n + 1]."""
        out = np.empty(len(self.sequence_lengths) + 1, dtype=np.int64)
        out[0] = 0
        np.cumsum(self.sequence_lengths, dtype=np.int64, out=out[1:])
        return out

    def data(self) -> np.ndarray:
        """The whole ``.bin`` as one memory-mapped 1-D array."""
        path = get_bin_path(self.prefix)
        if os.path.getsize(path) == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(path, dtype=self.dtype, mode="r")


def read_index(prefix: str, expected_dtype_codes: Optional[set[int]] = None) -> IndexInfo:
    """Open and validate ``prefix.idx``/``prefix.bin`` (header, sizes, pointers, documents)."""
    idx_path, bin_path = get_idx_path(prefix), get_bin_path(prefix)
    for path in (idx_path, bin_path):
        if not os.path.isfile(path):
            raise FormatError(path, "missing file")
    size = os.path.getsize(idx_path)
    if size < INDEX_HEADER_SIZE:
        raise FormatError(idx_path, f"truncated: {size} bytes, shorter than the {INDEX_HEADER_SIZE}-byte header")
    with open(idx_path, "rb") as f:
        header = f.read(INDEX_HEADER_SIZE)
    if header[:9] != INDEX_HEADER:
        raise FormatError(idx_path, f"not an MMIDIDX index (magic {header[:9]!r})")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", header[9:])
    if version != 1:
        raise FormatError(idx_path, f"index version {version}, expected 1")
    if code not in {d.value for d in DType}:
        raise FormatError(idx_path, f"unknown dtype code {code}")
    if expected_dtype_codes is not None and code not in expected_dtype_codes:
        names = ", ".join(f"{c} ({DType(c).name})" for c in sorted(expected_dtype_codes))
        raise FormatError(idx_path, f"dtype code {code} ({DType(code).name}), expected {names}")
    expected = INDEX_HEADER_SIZE + 12 * n_seq + 8 * n_doc
    if size != expected:
        raise FormatError(idx_path, f"{size} bytes, expected {expected} for {n_seq} sequences and "
                                    f"{n_doc} document indices (truncated or not a plain token index)")
    index = _IndexReader(idx_path, multimodal=False)
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
    dtype = np.dtype(DType.dtype_from_code(code))
    if (lengths < 0).any():
        raise FormatError(idx_path, "negative sequence length")
    total = int(lengths.sum(dtype=np.int64))
    expected_pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * dtype.itemsize
    if n_seq and not np.array_equal(pointers, expected_pointers):
        raise FormatError(idx_path, "sequence pointers are not contiguous")
    if n_doc == 0 or docs[0] != 0 or docs[-1] != n_seq or (np.diff(docs) < 0).any():
        raise FormatError(idx_path, f"document indices do not run monotonically from 0 to {n_seq}")
    bin_size = os.path.getsize(bin_path)
    if bin_size != total * dtype.itemsize:
        raise FormatError(bin_path, f"{bin_size} bytes, expected {total * dtype.itemsize} "
                                    f"({total} x {dtype.name}) from {idx_path}")
    return IndexInfo(prefix, dtype, lengths, pointers, docs, index)


@dataclass
class ScoreMetadata:
    """The contents of ``T.logprobs.json``."""

    tokenizer_fingerprint: str
    reference: dict  # {"type": "gpt", "path": ..., "checkpoint_sha256": ...} or {"type": "unigram"}
    tokens_idx_sha256: str
    token_count: int
    sequence_count: int
    document_count: int
    format_version: int = FORMAT_VERSION
    values: str = LOGPROB_VALUES
    dtype: str = "float32"
    notes: dict = field(default_factory=dict)

    @classmethod
    def load(cls, path: str) -> "ScoreMetadata":
        if not os.path.isfile(path):
            raise FormatError(path, "missing file")
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FormatError(path, f"not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise FormatError(path, "metadata must be a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise FormatError(path, f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION}")
        if data.get("values") != LOGPROB_VALUES or data.get("dtype") != "float32":
            raise FormatError(path, f"values {data.get('values')!r} ({data.get('dtype')}), "
                                    f"expected {LOGPROB_VALUES!r} (float32)")
        types = {"tokenizer_fingerprint": str, "reference": dict, "tokens_idx_sha256": str,
                 "token_count": int, "sequence_count": int, "document_count": int}
        for key, kind in types.items():
            if not isinstance(data.get(key), kind):
                raise FormatError(path, f"{key!r} missing or not a {kind.__name__}")
        if "type" not in data["reference"]:
            raise FormatError(path, "'reference' has no 'type'")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str) -> None:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(asdict(self), f, indent=2, sort_keys=True)
            f.write("\n")


class AtomicFiles:
    """Files written under temporary names, renamed in registration order on commit."""

    def __init__(self) -> None:
        self._pairs: list[tuple[str, str]] = []

    def temp(self, final: str) -> str:
        tmp = f"{final}.tmp{os.getpid()}"
        self._pairs.append((tmp, final))
        return tmp

    def commit(self) -> None:
        for tmp, final in self._pairs:
            os.replace(tmp, final)
        self._pairs = []

    def abort(self) -> None:
        for tmp, _ in self._pairs:
            if os.path.exists(tmp):
                os.remove(tmp)
        self._pairs = []


class WeightedDatasetWriter:
    """Writes ``T.bin/.idx`` (through megatron-core's builder) and its companions.

    One sequence per document, as megatron's ``preprocess_data.py`` writes without sentence
    splitting. Log-probs are given per document, or all at the end through
    ``fill_logprobs`` (for references that need the whole corpus first, like the unigram).
    Use as a context manager: leaving it by an exception removes every temporary file.
    """

    def __init__(self, prefix: str, token_dtype: type, with_kinds: bool = False,
                 files: Optional[AtomicFiles] = None) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
        self.prefix = prefix
        self.files = files or AtomicFiles()
        self._extra_commits: list[AtomicFiles] = []
        self._lp_bin = self.files.temp(get_bin_path(scores_prefix(prefix)))
        self._lp_idx = self.files.temp(get_idx_path(scores_prefix(prefix)))
        self._kinds_bin = self._kinds_idx = None
        if with_kinds:
            self._kinds_bin = self.files.temp(get_bin_path(kinds_prefix(prefix)))
            self._kinds_idx = self.files.temp(get_idx_path(kinds_prefix(prefix)))
        self._meta = self.files.temp(metadata_path(prefix))
        # The token files go last: their presence is what says "finished" to megatron-core.
        self._tok_bin = self.files.temp(get_bin_path(prefix))
        self._tok_idx = self.files.temp(get_idx_path(prefix))
        self.builder = IndexedDatasetBuilder(self._tok_bin, dtype=token_dtype)
        self._lp_file = open(self._lp_bin, "wb")
        self._kinds_file = open(self._kinds_bin, "wb") if with_kinds else None
        self._logprobs_written = 0
        self.token_count = 0

    def __enter__(self) -> "WeightedDatasetWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()

    def add_document(self, tokens: np.ndarray, logprobs: Optional[np.ndarray] = None,
                     kinds: Optional[np.ndarray] = None) -> None:
        n = len(tokens)
        if logprobs is not None:
            if len(logprobs) != n or self._logprobs_written != self.token_count:
                raise ValueError("log-probs must come with every document, one per token")
            self._lp_file.write(np.asarray(logprobs, dtype=np.float32).tobytes())
            self._logprobs_written += n
        if (kinds is not None) != (self._kinds_file is not None):
            raise ValueError("kinds must be given for every document iff the writer has kinds")
        if kinds is not None:
            if len(kinds) != n:
                raise ValueError(f"{len(kinds)} kinds for {n} tokens")
            self._kinds_file.write(np.asarray(kinds, dtype=np.uint8).tobytes())
        self.builder.add_document(np.asarray(tokens), [n])
        self.token_count += n

    def add_shard(self, prefix: str, with_kinds: bool) -> None:
        """Append a whole finished dataset (tokens via megatron-core's ``add_index``)."""
        self.builder.add_index(prefix)
        for src, dst in [(get_bin_path(scores_prefix(prefix)), self._lp_file)] + (
            [(get_bin_path(kinds_prefix(prefix)), self._kinds_file)] if with_kinds else []
        ):
            with open(src, "rb") as f:
                while block := f.read(1 << 24):
                    dst.write(block)
        self.token_count = int(np.sum(self.builder.sequence_lengths, dtype=np.int64))
        self._logprobs_written = self.token_count

    def fill_logprobs(self, score: Callable[[np.ndarray], np.ndarray], chunk: int = 1 << 24) -> None:
        """Write every log-prob at once, ``score`` mapping a flat token chunk to its log-probs."""
        if self._logprobs_written:
            raise ValueError("log-probs were already written per document")
        self.builder.data_file.flush()
        if self.token_count:
            tokens = np.memmap(self._tok_bin, dtype=self.builder.dtype, mode="r")
            for start in range(0, self.token_count, chunk):
                self._lp_file.write(np.asarray(score(tokens[start:start + chunk]), np.float32).tobytes())
            del tokens
        self._logprobs_written = self.token_count

    def attach(self, files: AtomicFiles) -> None:
        """Commit (and abort) ``files`` together with this dataset, before the token files."""
        self._extra_commits.append(files)

    def finalize(self, tokenizer_fingerprint: str, reference: dict, notes: Optional[dict] = None) -> ScoreMetadata:
        if self._logprobs_written != self.token_count:
            raise ValueError(f"{self._logprobs_written} log-probs for {self.token_count} tokens")
        self.builder.finalize(self._tok_idx)
        self._lp_file.close()
        lengths, docs = self.builder.sequence_lengths, self.builder.document_indices
        with _IndexWriter(self._lp_idx, np.float32) as writer:
            writer.write(lengths, None, docs)
        if self._kinds_file is not None:
            self._kinds_file.close()
            with _IndexWriter(self._kinds_idx, np.uint8) as writer:
                writer.write(lengths, None, docs)
        meta = ScoreMetadata(
            tokenizer_fingerprint=tokenizer_fingerprint,
            reference=reference,
            tokens_idx_sha256=sha256_file(self._tok_idx),
            token_count=self.token_count,
            sequence_count=len(lengths),
            document_count=len(docs) - 1,
            notes=notes or {},
        )
        meta.save(self._meta)
        for extra in self._extra_commits:
            extra.commit()
        self.files.commit()
        return meta

    def abort(self) -> None:
        for handle in (self.builder.data_file, self._lp_file, self._kinds_file):
            if handle is not None and not handle.closed:
                handle.close()
        for extra in self._extra_commits:
            extra.abort()
        self.files.abort()
