"""On-disk formats of a PRIOR dataset, how its files are bound together, and their checks.

For a token prefix ``T`` (``T.bin``/``T.idx``, megatron-core's MMIDIDX, written by its own
``IndexedDatasetBuilder``):

- ``T.logprobs.bin/.idx``: float32 MMIDIDX (dtype code 7) with the same sequence lengths
  and document indices, holding ``log p_ref(t_i | t_<i)`` per token;
- ``T.kinds.bin/.idx`` (optional): uint8 MMIDIDX of token kind ids (``kinds.KIND_NAMES``);
- ``T.images`` (optional): the image store of ``images.py`` (encoded image bytes, or decoded
  pixels in the older raw store), image ``i`` for document ``i``;
- ``T.imglogprobs.bin/.idx`` and ``T.imgdelta.bin/.idx`` (optional, both or neither): float32
  MMIDIDX like the log-probs, from an image-conditioned scorer (a vision-language checkpoint,
  ``tools/score_with_images.py``): ``log p(t_i | v, t_<i)`` and ``logit(t_i | v, t_<i) -
  logit(t_i | t_<i)`` (the same model with the image removed), read by ``--loss mi`` and
  ``--loss cal``; the metadata's ``image_scorer`` says which model made them;
- ``T.logprobs.json``: what binds them: format version, what the values are, the tokenizer
  fingerprint, the reference model, the counts, and the size and sha256 of *every* file
  above (``files``), so a file replaced, reordered or left over from another write onto the
  same prefix is refused, whatever its size. A companion file on disk that the metadata does
  not bind is refused too.

Hashing a large dataset on every open would cost minutes per job start (and per rank), so a
verified hash is remembered in ``T.verified.json`` together with the file's
``(device, inode, size, mtime_ns, ctime_ns)``: a file whose stat is unchanged is the file
that was hashed (writing to it moves mtime and ctime, replacing it moves the inode, and no
ordinary tool can set ctime back), so it is not read again. The writer seeds that cache at
commit, so only a dataset copied or touched since is hashed on its first open. The cache is a
hint: a missing, damaged or unwritable one only costs a full hash.

The companions' ``.idx`` files are written by megatron-core's own ``_IndexWriter`` from the
token builder's lengths and document indices, so stock ``IndexedDataset`` reads all three.
``formats`` also holds the header checks shared by the MMIDIDX and image-store readers.
"""

from __future__ import annotations

import logging
import os
import struct
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, _IndexReader, get_bin_path, get_idx_path

from megatron_prior.files import atomic_write_json, parse_json, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
LOGPROB_VALUES = "log p_ref(t_i | t_<i)"
# The image-conditioned scores, by sidecar name (``T.<name>.bin/.idx``): what each holds.
IMAGE_SCORE_VALUES = {"imglogprobs": "log p(t_i | v, t_<i)",
                      "imgdelta": "logit(t_i | v, t_<i) - logit(t_i | t_<i)"}
INDEX_HEADER = b"MMIDIDX\x00\x00"
# magic (9), then version (8), dtype code (1), sequence count (8), document count (8)
INDEX_HEADER_SIZE = 34
_INDEX_FIELDS = struct.Struct("<QBQQ")
TOKEN_DTYPE_CODES = {1, 2, 3, 4, 5, 8}  # the integer codes of megatron-core's DType
# Every file a dataset may have, by role; the metadata binds each one present.
REQUIRED_ROLES = ("tokens.bin", "tokens.idx", "logprobs.bin", "logprobs.idx")
IMAGE_SCORE_ROLES = tuple(f"{name}.{ext}" for name in IMAGE_SCORE_VALUES for ext in ("bin", "idx"))
OPTIONAL_ROLES = ("kinds.bin", "kinds.idx", "images") + IMAGE_SCORE_ROLES
_SHA256_HEX = set("0123456789abcdef")
# How an image store fits images to its size (``images.ASPECTS``, which imports this module).
IMAGE_ASPECTS = ("pad", "crop", "stretch")


class FormatError(ValueError):
    """A dataset file that is missing, damaged, or bound to something else."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path, self.problem = path, problem

    def __reduce__(self):
        return FormatError, (self.path, self.problem)


def sidecar_prefix(prefix: str, name: str) -> str:
    """The MMIDIDX prefix of a per-token companion (``logprobs``, ``kinds``, ``imglogprobs``, ...)."""
    return f"{prefix}.{name}"


def scores_prefix(prefix: str) -> str:
    return sidecar_prefix(prefix, "logprobs")


def kinds_prefix(prefix: str) -> str:
    return prefix + ".kinds"


def metadata_path(prefix: str) -> str:
    return prefix + ".logprobs.json"


def images_path(prefix: str) -> str:
    return prefix + ".images"


def verified_path(prefix: str) -> str:
    """The cache of verified hashes (see the module docstring)."""
    return prefix + ".verified.json"


def dataset_files(prefix: str) -> dict[str, str]:
    """Role -> path of every file the metadata of ``prefix`` may bind."""
    return {
        "tokens.bin": get_bin_path(prefix), "tokens.idx": get_idx_path(prefix),
        "logprobs.bin": get_bin_path(scores_prefix(prefix)), "logprobs.idx": get_idx_path(scores_prefix(prefix)),
        "kinds.bin": get_bin_path(kinds_prefix(prefix)), "kinds.idx": get_idx_path(kinds_prefix(prefix)),
        "images": images_path(prefix),
        **{f"{name}.{ext}": path(sidecar_prefix(prefix, name)) for name in IMAGE_SCORE_VALUES
           for ext, path in (("bin", get_bin_path), ("idx", get_idx_path))},
    }


def all_files(prefix: str) -> list[str]:
    """Every path a write of ``prefix`` creates or replaces (bound files and the metadata)."""
    return list(dataset_files(prefix).values()) + [metadata_path(prefix)]


def read_header(path: str, magic: bytes, fields: struct.Struct, header_size: int, what: str) -> tuple[int, tuple]:
    """(file size, header fields after ``magic``) of a regular file that starts with ``magic``."""
    if not os.path.exists(path):
        raise FormatError(path, "missing file")
    if not os.path.isfile(path):
        raise FormatError(path, "not a regular file")
    size = os.path.getsize(path)
    if size < header_size:
        raise FormatError(path, f"truncated: {size} bytes, shorter than the {header_size}-byte header")
    with open(path, "rb") as f:
        header = f.read(len(magic) + fields.size)
    if header[:len(magic)] != magic:
        raise FormatError(path, f"not {what} (magic {header[:len(magic)]!r})")
    return size, fields.unpack(header[len(magic):])


def check_header(path: str, what: str, version: int, expected_version: int, code: int,
                 dtype_codes: set[int], size: int, expected_size: int, holding: str) -> np.dtype:
    """The checks every header here shares: version, dtype code, and the file size the header
    implies (``holding`` says what for); returns the dtype."""
    if version != expected_version:
        raise FormatError(path, f"{what} version {version}, expected {expected_version}")
    if code not in dtype_codes:
        names = ", ".join(f"{c} ({DType(c).name})" for c in sorted(dtype_codes))
        known = f" ({DType(code).name})" if code in {d.value for d in DType} else " (unknown)"
        raise FormatError(path, f"dtype code {code}{known}, expected {names}")
    if size != expected_size:
        raise FormatError(path, f"{size} bytes, expected {expected_size} for {holding} (truncated or unfinished)")
    return np.dtype(DType.dtype_from_code(code))


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
    size, (version, code, n_seq, n_doc) = read_header(idx_path, INDEX_HEADER, _INDEX_FIELDS, INDEX_HEADER_SIZE,
                                                      "an MMIDIDX index")
    if not os.path.isfile(bin_path):
        raise FormatError(bin_path, "missing file" if not os.path.exists(bin_path) else "not a regular file")
    dtype = check_header(idx_path, "index", version, 1, code, expected_dtype_codes or {d.value for d in DType},
                         size, INDEX_HEADER_SIZE + 12 * n_seq + 8 * n_doc,
                         f"{n_seq} sequences and {n_doc} document indices")
    index = _IndexReader(idx_path, multimodal=False)
    lengths, pointers, docs = index.sequence_lengths, index.sequence_pointers, index.document_indices
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


def _natural(data: dict, key: str) -> bool:
    value = data.get(key)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_files(path: str, files: object) -> dict:
    """The ``files`` entry of the metadata: role -> {"size", "sha256"} (+ image shape)."""
    if not isinstance(files, dict):
        raise FormatError(path, "'files' missing or not an object")
    unknown = sorted(set(files) - set(REQUIRED_ROLES) - set(OPTIONAL_ROLES))
    if unknown:
        raise FormatError(path, f"'files' binds unknown roles {unknown}")
    missing = [role for role in REQUIRED_ROLES if role not in files]
    image_scores = {role in files for role in IMAGE_SCORE_ROLES}
    if missing or ("kinds.bin" in files) != ("kinds.idx" in files) or len(image_scores) != 1:
        raise FormatError(path, f"'files' must bind {list(REQUIRED_ROLES)}, both or neither of the kinds "
                                f"files and all or none of {list(IMAGE_SCORE_ROLES)}, got {sorted(files)}")
    for role, entry in files.items():
        keys = ("size", "count", "height", "width") if role == "images" else ("size",)
        if (not isinstance(entry, dict) or not all(_natural(entry, k) for k in keys)
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64
                or not set(entry["sha256"]) <= _SHA256_HEX):
            raise FormatError(path, f"'files' entry {role!r} must hold a 64-digit hex 'sha256' and "
                                    f"natural numbers {list(keys)}")
    images = files.get("images", {})
    if images.get("store", "raw") not in ("raw", "encoded") or images.get("aspect", "pad") not in IMAGE_ASPECTS:
        raise FormatError(path, f"'files' entry 'images': store {images.get('store')!r} (expected raw or encoded), "
                                f"aspect {images.get('aspect')!r} (expected one of {', '.join(IMAGE_ASPECTS)})")
    return files


@dataclass
class ScoreMetadata:
    """The contents of ``T.logprobs.json``."""

    tokenizer_fingerprint: str
    reference: dict  # {"type": "gpt", "path": ..., "checkpoint_sha256": ...} or {"type": "unigram"}
    files: dict  # role -> {"size": bytes, "sha256": hex} (+ "count", "height", "width" for images)
    token_count: int
    sequence_count: int
    document_count: int
    format_version: int = FORMAT_VERSION
    values: str = LOGPROB_VALUES
    dtype: str = "float32"
    notes: dict = field(default_factory=dict)
    # The image-conditioned scorer of the imglogprobs/imgdelta sidecars ({"type": arch, "path",
    # "checkpoint_sha256", "values": IMAGE_SCORE_VALUES, ...}); {} when the data have none.
    image_scorer: dict = field(default_factory=dict)

    @property
    def has_image_scores(self) -> bool:
        return IMAGE_SCORE_ROLES[0] in self.files

    @classmethod
    def load(cls, path: str) -> "ScoreMetadata":
        """Read and check ``path``; every problem is a FormatError naming it."""
        if not os.path.exists(path):
            raise FormatError(path, "missing file")
        if not os.path.isfile(path):
            raise FormatError(path, "not a regular file")
        with open(path, "rb") as f:
            raw = f.read()
        try:
            data = parse_json(raw.decode("utf-8"))
        except UnicodeDecodeError as err:
            raise FormatError(path, f"not valid UTF-8 ({err.reason} at byte {err.start})") from None
        except ValueError as err:
            raise FormatError(path, str(err)) from None
        if not isinstance(data, dict):
            raise FormatError(path, "metadata must be a JSON object")
        if data.get("format_version") != FORMAT_VERSION:
            raise FormatError(path, f"format_version {data.get('format_version')!r}, expected {FORMAT_VERSION} "
                                    "(written by another version: preprocess the data again)")
        if data.get("values") != LOGPROB_VALUES or data.get("dtype") != "float32":
            raise FormatError(path, f"values {data.get('values')!r} ({data.get('dtype')!r}), "
                                    f"expected {LOGPROB_VALUES!r} (float32)")
        for key, kind in {"tokenizer_fingerprint": str, "reference": dict, "notes": dict, "image_scorer": dict}.items():
            if not isinstance(data.get(key, {} if key in ("notes", "image_scorer") else None), kind):
                raise FormatError(path, f"{key!r} missing or not a {kind.__name__}")
        for key in ("token_count", "sequence_count", "document_count"):
            if not _natural(data, key):
                raise FormatError(path, f"{key!r} missing or not a natural number")
        if not isinstance(data["reference"].get("type"), str):
            raise FormatError(path, "'reference' has no 'type'")
        files = _check_files(path, data.get("files"))
        scorer = data.get("image_scorer", {})
        if IMAGE_SCORE_ROLES[0] in files:
            if scorer.get("values") != IMAGE_SCORE_VALUES or not isinstance(scorer.get("type"), str):
                raise FormatError(path, f"'image_scorer' must name its 'type' and hold values {IMAGE_SCORE_VALUES}, "
                                        f"got {scorer!r}")
        elif scorer:
            raise FormatError(path, "'image_scorer' describes image scores that 'files' does not bind")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self, path: str) -> None:
        atomic_write_json(path, asdict(self))


def _stat_key(path: str) -> list[int]:
    st = os.stat(path)
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class _VerifiedHashes:
    """The ``T.verified.json`` cache: role -> {"stat": _stat_key, "sha256": hex}."""

    def __init__(self, prefix: str) -> None:
        self.path = verified_path(prefix)
        self.entries: dict = {}
        self.dirty = False
        try:
            with open(self.path, "rb") as f:
                entries = parse_json(f.read())
            self.entries = entries if isinstance(entries, dict) else {}
        except (OSError, ValueError):  # absent or damaged: a cold cache, nothing is trusted
            pass

    def sha256(self, role: str, path: str, expected: str) -> str:
        """The file's sha256: ``expected`` when the cache vouches for it, else read in full (so a
        damaged cache can only cost time, never refuse a good file)."""
        key, entry = _stat_key(path), self.entries.get(role)
        if isinstance(entry, dict) and entry.get("stat") == key and entry.get("sha256") == expected:
            return expected
        digest = sha256_file(path)
        # The stat from before the read: a file changed while it was hashed no longer matches it.
        self.record(role, key, digest)
        return digest

    def record(self, role: str, key: list[int], digest: str) -> None:
        self.entries[role] = {"stat": key, "sha256": digest}
        self.dirty = True

    def save(self) -> None:
        if not self.dirty:
            return
        try:
            atomic_write_json(self.path, self.entries)
        except OSError as err:  # a read-only dataset folder: correct, only slower to open
            log.warning("cannot write %s (%s): each open hashes the dataset files again", self.path,
                        err.strerror or err)
        self.dirty = False


def record_verified(prefix: str, digests: dict[str, str]) -> None:
    """Seed the hash cache with the hashes a writer computed, for its files now in place."""
    cache = _VerifiedHashes(prefix)
    cache.entries = {}
    for role, digest in digests.items():
        cache.record(role, _stat_key(dataset_files(prefix)[role]), digest)
    cache.save()


def verify_files(prefix: str, meta: ScoreMetadata, known: Optional[dict[str, list[int]]] = None
                 ) -> dict[str, list[int]]:
    """Check that every file ``meta`` binds is the one it was written with, and that no companion
    it does not bind lies beside it; returns each bound file's stat key.

    ``known`` holds stat keys verified earlier in this job (a pickled dataset): an unchanged
    stat needs no hash.
    """
    meta_path = metadata_path(prefix)
    paths = dataset_files(prefix)
    for role, path in paths.items():
        if role not in meta.files and os.path.lexists(path):
            raise FormatError(path, f"not bound by {meta_path}: left over from another write onto this prefix "
                                    "(remove it, or write the dataset again)")
    cache = _VerifiedHashes(prefix)
    stats = {}
    for role in [r for r in REQUIRED_ROLES + OPTIONAL_ROLES if r in meta.files]:  # tokens first
        entry, path = meta.files[role], paths[role]
        if not os.path.exists(path):
            raise FormatError(path, f"missing file (bound by {meta_path})")
        if not os.path.isfile(path):
            raise FormatError(path, "not a regular file")
        size = os.path.getsize(path)
        if size != entry["size"]:
            raise FormatError(path, f"{size} bytes, but {meta_path} binds a file of {entry['size']}")
        stats[role] = _stat_key(path)
        if known is not None and known.get(role) == stats[role]:
            continue
        digest = cache.sha256(role, path, entry["sha256"])
        if digest != entry["sha256"]:
            raise FormatError(path, f"content differs from what {meta_path} binds (sha256 {digest[:16]}..., "
                                    f"expected {entry['sha256'][:16]}...): changed or replaced after it was "
                                    "written, or left by a write that did not finish")
    cache.save()
    return stats
