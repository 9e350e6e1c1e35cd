"""Packing token rows and PRIOR loss-weight rows for a batch: the numpy reference.

The C++ extension ``megatron_prior._packer`` (``csrc/packer.cpp``) does the same work in one
call with the GIL released; this module holds the reference semantics it is tested
against, and serves as the fallback when the extension is not built (said once, on import).

Semantics (DESIGN.md section 1 and 5):

- ``w_i = (1 - exp(logprob_i)) ** alpha``
- ``m_i = n_doc * w_i / sum_{j in doc} w_j`` over the loss tokens of the *whole* document,
  so a caption cut across two samples keeps its normaliser; a document whose weights sum
  to zero gets ``m_i = 1``; masked tokens (EOD when ``mask_eod``, pad) get 0 and do not
  count in ``n_doc``.
- Samples are cut as megatron-core's GPTDataset cuts them: sample ``s`` runs from
  ``sample_index[s]`` to ``sample_index[s + 1]`` plus one extra token; short samples are
  padded with ``pad_id``. Weight ``j`` belongs to label ``j``, i.e. token ``j + 1``.
"""

from __future__ import annotations

import logging
import os

import numpy as np

log = logging.getLogger(__name__)

try:
    from megatron_prior import _packer as _ext
except ImportError as _err:  # pragma: no cover - exercised only where the build is missing
    _ext = None
    log.warning("megatron_prior._packer (C++) is not built (%s); packing uses the numpy reference", _err)

HAVE_EXTENSION = _ext is not None


def token_weights(logprobs: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - p) ** alpha`` in float64 from reference log-probs."""
    return np.maximum(0.0, 1.0 - np.exp(logprobs.astype(np.float64))) ** alpha


def _masked(tokens: np.ndarray, eod_id: int, mask_eod: bool, pad_id: int) -> np.ndarray:
    masked = tokens.astype(np.int64) == pad_id
    if mask_eod:
        masked |= tokens.astype(np.int64) == eod_id
    return masked


def document_scales_numpy(tokens, logprobs, doc_offsets, alpha, eod_id, mask_eod, pad_id) -> np.ndarray:
    """``n_doc / sum w`` per document, or -1 where the weights sum to zero (fallback m = 1)."""
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    n_docs = len(doc_offsets) - 1
    keep = ~_masked(np.asarray(tokens), eod_id, mask_eod, pad_id)
    w = np.where(keep, token_weights(np.asarray(logprobs), alpha), 0.0)
    doc_of_token = np.repeat(np.arange(n_docs), np.diff(doc_offsets))
    start = doc_offsets[0]
    sums = np.bincount(doc_of_token, weights=w[start:doc_offsets[-1]], minlength=n_docs)
    counts = np.bincount(doc_of_token, weights=keep[start:doc_offsets[-1]], minlength=n_docs)
    scales = np.full(n_docs, -1.0)
    positive = sums > 0
    scales[positive] = counts[positive] / sums[positive]
    return scales


def pack_batch_numpy(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples,
                     seq_len, alpha, eod_id, mask_eod, pad_id):
    """Token rows ``[b, seq_len + 1]`` (int64) and weight rows ``[b, seq_len]`` (float32)."""
    out_tokens = np.full((len(samples), seq_len + 1), pad_id, dtype=np.int64)
    out_weights = np.zeros((len(samples), seq_len), dtype=np.float32)
    for row, s in enumerate(samples):
        (beg_doc, beg_off), (end_doc, end_off) = sample_index[s], sample_index[s + 1]
        parts_tok, parts_m = [], []
        for k in range(beg_doc, end_doc + 1):
            doc = document_index[k]
            lo = doc_offsets[doc] + (beg_off if k == beg_doc else 0)
            hi = doc_offsets[doc] + end_off + 1 if k == end_doc else doc_offsets[doc + 1]
            t = np.asarray(tokens[lo:hi], dtype=np.int64)
            if scales[doc] < 0:
                m = np.ones(len(t))
            else:
                m = scales[doc] * token_weights(np.asarray(logprobs[lo:hi]), alpha)
            m[_masked(t, eod_id, mask_eod, pad_id)] = 0.0
            parts_tok.append(t)
            parts_m.append(m)
        t = np.concatenate(parts_tok)[: seq_len + 1]
        m = np.concatenate(parts_m)[: seq_len + 1]
        out_tokens[row, : len(t)] = t
        out_weights[row, : len(m) - 1] = m[1:]
    return out_tokens, out_weights


def document_scales(tokens, logprobs, doc_offsets, alpha, eod_id, mask_eod, pad_id) -> np.ndarray:
    """Per-document normaliser (C++ when built)."""
    if _ext is None:
        return document_scales_numpy(tokens, logprobs, doc_offsets, alpha, eod_id, mask_eod, pad_id)
    return _ext.document_scales(tokens, np.ascontiguousarray(logprobs, dtype=np.float32),
                                np.ascontiguousarray(doc_offsets, dtype=np.int64),
                                float(alpha), int(eod_id), bool(mask_eod), int(pad_id))


def pack_batch(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples, seq_len,
               alpha, eod_id, mask_eod, pad_id, num_threads: int | None = None):
    """Fill a batch (C++ when built, threaded over rows)."""
    samples = np.ascontiguousarray(samples, dtype=np.int64)
    if _ext is None:
        return pack_batch_numpy(tokens, logprobs, doc_offsets, scales, document_index, sample_index,
                                samples, seq_len, alpha, eod_id, mask_eod, pad_id)
    threads = num_threads if num_threads is not None else min(8, os.cpu_count() or 1)
    return _ext.pack_batch(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples,
                           int(seq_len), float(alpha), int(eod_id), bool(mask_eod), int(pad_id), int(threads))
