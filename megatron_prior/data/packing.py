"""Packing token rows and PRIOR loss-weight rows for a batch: the numpy reference.

The C++ extension ``megatron_prior._packer`` (``csrc/packer.cpp``) does the same work in one
call with the GIL released and rows split over threads; this module holds the reference
semantics it is tested against, and serves as the fallback when the extension is not built
(said once, on import).

Semantics:

- ``w_i`` from the token's per-token scores by a ``Weighting``: PRIOR's ``(1 - exp(logprob_i))
  ** alpha`` (the reference log-prob), MI's ``max(a_i - b_i, floor)`` (image-conditioned minus
  reference log-prob) or CAL's ``clamp(a_i, 1, 5)`` (logit with the image minus without);
- ``m_i = n_doc * w_i / sum_{j in doc} w_j`` over the loss tokens of the *whole* document,
  so a caption cut across two samples keeps its normaliser; a document whose weights sum
  to zero gets ``m_i = 1``.
- Loss tokens: every token but pad and, with ``mask_eod``, the token after an EOD (what
  megatron-core's ``eod_mask_loss`` masks: predicting a new document from the previous
  one). Every document counts as preceded by EOD, so with ``mask_eod`` its first token is
  never a loss token; on corpora whose documents end in EOD (``--append-eod``) this is
  exactly megatron-core's loss mask. Non-loss tokens get ``m_i = 0``.
- Samples are cut as megatron-core's GPTDataset cuts them: sample ``s`` runs from
  ``sample_index[s]`` to ``sample_index[s + 1]`` plus one extra token; short samples are
  padded with ``pad_id``. Weight ``j`` belongs to label ``j``, i.e. token ``j + 1``.
- Sample packing (``--pack-samples``) fills rows with whole samples by ``pack_rows``: a
  next-fit pass in sample order (a row takes samples while their costs fit its budget, then
  the next row starts), so every rank and every resumed run derives the same rows from the
  same order. A packed GPT row is handed to ``pack_batch`` as a sample of its own: a
  ``sample_index`` pair from its first document's start to its last document's end.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

log = logging.getLogger(__name__)

try:
    from megatron_prior import _packer as _ext
except ImportError as _err:  # pragma: no cover - exercised only where the build is missing
    _ext = None
    log.warning("megatron_prior._packer (C++) is not built (%s); packing uses the numpy reference", _err)

if _ext is not None and "minus" not in (_ext.pack_batch.__doc__ or ""):
    # A build from before the weightings (its functions take PRIOR's alpha only): calling it
    # with the new arguments would raise an opaque TypeError in the middle of a batch.
    log.warning("megatron_prior._packer (%s) was built from older sources without the mi/cal weightings; "
                "packing uses the numpy reference until it is rebuilt (make setup, or python setup.py "
                "build_ext --inplace)", _ext.__file__)
    _ext = None

HAVE_EXTENSION = _ext is not None


# CAL's clamp of the logit difference (Xiao et al. 2024, "Seeing the Image"): [1, 5].
CAL_RANGE = (1.0, 5.0)
# The weightings the packer computes, and what each reads: its name -> (scores, minus) sidecar
# names (``formats.SIDECARS``); ``minus`` None where one score suffices.
WEIGHTING_SCORES: dict[str, tuple[str, Optional[str]]] = {
    "prior": ("logprobs", None),
    "mi": ("imglogprobs", "logprobs"),
    "cal": ("imgdelta", None),
}
_MODE_PRIOR, _MODE_CLAMP = 0, 1  # the C++ packer's modes


@dataclass(frozen=True)
class Weighting:
    """How a token's weight ``w_i`` (before the per-caption normalisation) comes from its scores.

    - ``prior``: ``(1 - exp(a)) ** alpha``, ``a = log p_ref(t_i | t_<i)``;
    - ``mi``: ``max(a - b, floor)``, ``a = log p(t_i | v, t_<i)`` (an image-conditioned scorer),
      ``b = log p_ref(t_i | t_<i)``: the pointwise mutual information of token and image, floored
      (``floor > 0``) so that a token the image does not explain keeps a small weight and an
      image-blind scorer gives every token the same one;
    - ``cal``: ``clamp(a, 1, 5)``, ``a = logit(t_i | v, t_<i) - logit(t_i | t_<i)`` (the same
      scorer with the image removed).

    ``WEIGHTING_SCORES`` names the per-token score files each reads.
    """

    name: str = "prior"
    alpha: float = 1.0
    floor: float = 0.1

    def __post_init__(self) -> None:
        if self.name not in WEIGHTING_SCORES:
            raise ValueError(f"unknown weighting {self.name!r}; known: {', '.join(WEIGHTING_SCORES)}")
        check_alpha(self.alpha)
        if not (math.isfinite(self.floor) and self.floor > 0):
            raise ValueError(f"the MI floor must be a finite number > 0, got {float(self.floor)!r}")

    @property
    def clamp(self) -> tuple[float, float]:
        """``(low, high)`` of a clamped weighting (mi, cal)."""
        return (self.floor, math.inf) if self.name == "mi" else CAL_RANGE

    def key(self) -> tuple:
        """What the weights depend on (alpha only for prior, the floor only for mi)."""
        return (self.name, float(self.alpha) if self.name == "prior" else None,
                float(self.floor) if self.name == "mi" else None)

    def extension_args(self) -> tuple[int, float, float, float]:
        """``(mode, alpha, low, high)`` for the C++ packer."""
        if self.name == "prior":
            return _MODE_PRIOR, float(self.alpha), 0.0, math.inf
        return (_MODE_CLAMP, 1.0, *self.clamp)


WeightingLike = Union[Weighting, float]


def as_weighting(weighting: WeightingLike) -> Weighting:
    """A ``Weighting``; a bare number is PRIOR's alpha (the packer's original argument)."""
    return weighting if isinstance(weighting, Weighting) else Weighting("prior", alpha=weighting)


def default_threads() -> int:
    return min(8, os.cpu_count() or 1)


def check_alpha(alpha: float) -> None:
    """PRIOR's exponent must be a finite number >= 0 (NaN would silently weigh every token 1)."""
    if not (math.isfinite(alpha) and alpha >= 0):
        raise ValueError(f"alpha must be a finite number >= 0, got {float(alpha)!r}")


def check_pad_value(pad_value: float, dtype: np.dtype) -> None:
    """The pad value must be a value of ``dtype``: not NaN, and for integers integral and in range."""
    pad_value, dtype = float(pad_value), np.dtype(dtype)
    ok = not math.isnan(pad_value)
    if ok and dtype.kind in "iu":
        info = np.iinfo(dtype)
        ok = pad_value == math.floor(pad_value) and info.min <= pad_value <= info.max
    if not ok:
        raise ValueError(f"pad_value {pad_value!r} is not a value of dtype {dtype}")


def check_costs(costs: np.ndarray, budget: int) -> None:
    """Every cost must fit one row: ``0 <= cost <= budget`` (a longer sample is cut by its caller)."""
    if budget < 1:
        raise ValueError(f"budget must be positive, got {budget}")
    bad = np.flatnonzero((costs < 0) | (costs > budget))
    if len(bad):
        i = int(bad[0])
        raise ValueError(f"item {i} costs {int(costs[i])}, outside [0, {budget}]")


def pack_rows_numpy(costs: np.ndarray, budget: int) -> np.ndarray:
    """Row starts of a next-fit fill (the reference of the C++ ``pack_rows``)."""
    costs = np.asarray(costs, dtype=np.int64)
    check_costs(costs, budget)
    starts, used = [0], 0
    for i, cost in enumerate(costs.tolist()):
        if used + cost > budget:
            starts.append(i)
            used = 0
        used += cost
    if len(costs):
        starts.append(len(costs))
    return np.asarray(starts, dtype=np.int64)


def token_weights(scores: np.ndarray, weighting: WeightingLike, minus: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-token weights in float64 (``Weighting``): PRIOR's ``(1 - p) ** alpha`` from reference
    log-probs (``-expm1``: exact near p = 1), or ``clamp(scores - minus, low, high)``."""
    weighting = as_weighting(weighting)
    a = np.asarray(scores, dtype=np.float64)
    if weighting.name == "prior":
        return np.maximum(0.0, -np.expm1(a)) ** weighting.alpha
    if minus is not None:
        a = a - np.asarray(minus, dtype=np.float64)
    return np.clip(a, *weighting.clamp)


def _check_minus(weighting: Weighting, scores: np.ndarray, minus: Optional[np.ndarray]) -> None:
    wanted = WEIGHTING_SCORES[weighting.name][1] is not None
    if (minus is not None) != wanted:
        raise ValueError(f"weighting {weighting.name!r} {'needs' if wanted else 'takes no'} second scores (minus)")
    if minus is not None and len(minus) != len(scores):
        raise ValueError(f"scores and minus differ in length ({len(scores)} vs {len(minus)})")


def loss_token_mask(tokens: np.ndarray, previous: np.ndarray, eod_id: int, mask_eod: bool, pad_id: int) -> np.ndarray:
    """Which tokens are loss tokens, given each token's predecessor (EOD at document starts)."""
    keep = np.asarray(tokens, dtype=np.int64) != pad_id
    if mask_eod:
        keep &= np.asarray(previous, dtype=np.int64) != eod_id
    return keep


def _previous_tokens(tokens: np.ndarray, doc_start: int, lo: int, hi: int, eod_id: int) -> np.ndarray:
    prev = np.empty(hi - lo, dtype=np.int64)
    if hi > lo:
        prev[0] = eod_id if lo == doc_start else tokens[lo - 1]
        prev[1:] = tokens[lo:hi - 1]
    return prev


def document_scales_numpy(tokens, logprobs, doc_offsets, alpha, eod_id, mask_eod, pad_id, minus=None) -> np.ndarray:
    """``n_doc / sum w`` per document, or -1 where the weights sum to zero (fallback m = 1);
    ``alpha`` a ``WeightingLike``, ``logprobs`` (and ``minus``) the scores it reads."""
    weighting = as_weighting(alpha)
    _check_minus(weighting, logprobs, minus)
    doc_offsets = np.asarray(doc_offsets, dtype=np.int64)
    n_docs = len(doc_offsets) - 1
    lo, hi = int(doc_offsets[0]), int(doc_offsets[-1])
    tokens = np.asarray(tokens[lo:hi], dtype=np.int64)
    previous = np.concatenate([[eod_id], tokens[:-1]]) if len(tokens) else tokens
    starts = (doc_offsets[:-1] - lo)[np.diff(doc_offsets) > 0]
    previous[starts] = eod_id
    keep = loss_token_mask(tokens, previous, eod_id, mask_eod, pad_id)
    w = np.where(keep, token_weights(logprobs[lo:hi], weighting, None if minus is None else minus[lo:hi]), 0.0)
    doc_of_token = np.repeat(np.arange(n_docs), np.diff(doc_offsets))
    sums = np.bincount(doc_of_token, weights=w, minlength=n_docs)
    counts = np.bincount(doc_of_token, weights=keep, minlength=n_docs)
    scales = np.full(n_docs, -1.0)
    positive = sums > 0
    scales[positive] = counts[positive] / sums[positive]
    return scales


def _sample_pieces(doc_offsets, document_index, sample_index, s):
    """(doc, lo, hi) of each piece of sample ``s``, in order."""
    (beg_doc, beg_off), (end_doc, end_off) = sample_index[s], sample_index[s + 1]
    for k in range(int(beg_doc), int(end_doc) + 1):
        doc = int(document_index[k])
        lo = int(doc_offsets[doc]) + (int(beg_off) if k == beg_doc else 0)
        hi = int(doc_offsets[doc]) + int(end_off) + 1 if k == end_doc else int(doc_offsets[doc + 1])
        yield doc, lo, hi


def pack_batch_numpy(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples,
                     seq_len, alpha, eod_id, mask_eod, pad_id, minus=None):
    """Token rows ``[b, seq_len + 1]`` (int64) and weight rows ``[b, seq_len]`` (float32)."""
    weighting = as_weighting(alpha)
    _check_minus(weighting, logprobs, minus)
    out_tokens = np.full((len(samples), seq_len + 1), pad_id, dtype=np.int64)
    out_weights = np.zeros((len(samples), seq_len), dtype=np.float32)
    for row, s in enumerate(samples):
        parts_tok, parts_m = [], []
        for doc, lo, hi in _sample_pieces(doc_offsets, document_index, sample_index, s):
            t = np.asarray(tokens[lo:hi], dtype=np.int64)
            if scales[doc] < 0:
                m = np.ones(len(t))
            else:
                m = scales[doc] * token_weights(logprobs[lo:hi], weighting, None if minus is None else minus[lo:hi])
            previous = _previous_tokens(tokens, int(doc_offsets[doc]), lo, hi, eod_id)
            m[~loss_token_mask(t, previous, eod_id, mask_eod, pad_id)] = 0.0
            parts_tok.append(t)
            parts_m.append(m)
        t = np.concatenate(parts_tok)[: seq_len + 1]
        m = np.concatenate(parts_m)[: seq_len + 1]
        out_tokens[row, : len(t)] = t
        out_weights[row, : len(m) - 1] = m[1:]
    return out_tokens, out_weights


def pack_values_numpy(values, doc_offsets, document_index, sample_index, samples, seq_len, pad_value):
    """Rows ``[b, seq_len + 1]`` of any per-token array, cut like the token rows."""
    check_pad_value(pad_value, values.dtype)
    out = np.full((len(samples), seq_len + 1), pad_value, dtype=values.dtype)
    for row, s in enumerate(samples):
        v = np.concatenate([values[lo:hi] for _, lo, hi in _sample_pieces(doc_offsets, document_index,
                                                                          sample_index, s)])[: seq_len + 1]
        out[row, : len(v)] = v
    return out


def document_scales(tokens, logprobs, doc_offsets, alpha: WeightingLike, eod_id: int, mask_eod: bool, pad_id: int,
                    num_threads: Optional[int] = None, minus: Optional[np.ndarray] = None) -> np.ndarray:
    """Per-document normaliser (C++ when built, threaded over documents). ``alpha`` is the
    ``Weighting`` (a number: PRIOR's alpha), ``logprobs`` its scores and ``minus`` its second
    scores where it reads two (MI: the reference log-probs)."""
    weighting = as_weighting(alpha)
    if _ext is None:
        return document_scales_numpy(tokens, logprobs, doc_offsets, weighting, eod_id, mask_eod, pad_id, minus)
    _check_minus(weighting, logprobs, minus)
    mode, a, low, high = weighting.extension_args()
    return _ext.document_scales(tokens, logprobs, np.ascontiguousarray(doc_offsets, dtype=np.int64),
                                a, int(eod_id), bool(mask_eod), int(pad_id),
                                num_threads or default_threads(), mode, low, high, minus)


def pack_batch(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples, seq_len: int,
               alpha: WeightingLike, eod_id: int, mask_eod: bool, pad_id: int,
               num_threads: Optional[int] = None, minus: Optional[np.ndarray] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fill a batch (C++ when built, threaded over rows).

    ``tokens`` (uint8/uint16/int32/int64) and ``logprobs`` (float32: the scores the weighting
    ``alpha`` reads, ``minus`` its second ones) are the flat corpus (memory maps, never copied);
    ``document_index`` and ``sample_index`` are megatron-core's (int32 or int64); ``samples``
    are rows of ``sample_index`` (already shuffled).
    """
    weighting = as_weighting(alpha)
    samples = np.ascontiguousarray(samples, dtype=np.int64)
    scales = np.ascontiguousarray(scales, dtype=np.float64)
    if _ext is None:
        return pack_batch_numpy(tokens, logprobs, doc_offsets, scales, document_index, sample_index,
                                samples, seq_len, weighting, eod_id, mask_eod, pad_id, minus)
    _check_minus(weighting, logprobs, minus)
    mode, a, low, high = weighting.extension_args()
    return _ext.pack_batch(tokens, logprobs, doc_offsets, scales, document_index, sample_index, samples,
                           int(seq_len), a, int(eod_id), bool(mask_eod), int(pad_id),
                           num_threads or default_threads(), mode, low, high, minus)


def pack_values(values, doc_offsets, document_index, sample_index, samples, seq_len: int, pad_value: float,
                num_threads: Optional[int] = None) -> np.ndarray:
    """Rows of a per-token array (token kinds, raw log-probs) aligned with ``pack_batch``'s tokens."""
    samples = np.ascontiguousarray(samples, dtype=np.int64)
    if _ext is None:
        return pack_values_numpy(values, doc_offsets, document_index, sample_index, samples, seq_len, pad_value)
    return _ext.pack_values(values, doc_offsets, document_index, sample_index, samples, int(seq_len),
                            float(pad_value), num_threads or default_threads())


def pack_rows(costs: np.ndarray, budget: int) -> np.ndarray:
    """Rows of whole items, in order: int64 ``starts`` ``[r + 1]``, row ``k`` holding items
    ``starts[k]:starts[k + 1]`` whose costs sum to at most ``budget`` (C++ when built).

    Next-fit: an item that does not fit the current row starts the next one, so a row is
    never revisited and the fill is one pass. ``pack_rows([3, 4, 2, 5, 6], 7) == [0, 2, 4, 5]``.
    """
    costs = np.ascontiguousarray(costs, dtype=np.int64)
    if _ext is None:
        return pack_rows_numpy(costs, budget)
    return _ext.pack_rows(costs, int(budget))


def shuffled_rows(items: np.ndarray, wanted: Optional[int], seed: int, costs: Optional[np.ndarray] = None,
                  budget: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rows drawn from epochs of ``items``: ``(order, starts)``, row ``k`` holding
    ``order[starts[k]:starts[k + 1]]``.

    Each epoch is one permutation of ``items`` by ``numpy.random.RandomState(seed)``, drawn
    in turn. Without ``costs`` every item is a row of its own; with ``costs`` (one per item,
    aligned with ``items``) each epoch is packed by ``pack_rows`` under ``budget`` (rows do not
    straddle epochs). Epochs are drawn until there are ``wanted`` rows (``None``: one epoch)
    and the rows are cut there, so the first rows do not depend on ``wanted``.
    """
    items = np.asarray(items)
    n = len(items)
    if n == 0 and wanted:
        raise ValueError(f"no samples to fill {wanted} rows from")
    if n == 0 or wanted == 0:
        return items[:0], np.zeros(1, dtype=np.int64)
    rng = np.random.RandomState(seed)
    orders, starts, rows, taken = [], [np.zeros(1, dtype=np.int64)], 0, 0
    while (wanted is None and not orders) or (wanted is not None and rows < wanted):
        perm = rng.permutation(n)
        epoch_starts = np.arange(n + 1, dtype=np.int64) if costs is None else pack_rows(costs[perm], budget)
        orders.append(items[perm])
        starts.append(epoch_starts[1:] + taken)
        rows += len(epoch_starts) - 1
        taken += n
    starts = np.concatenate(starts)
    if wanted is not None:
        starts = starts[:wanted + 1]
    order = np.concatenate(orders)[:starts[-1]]
    return order, starts
