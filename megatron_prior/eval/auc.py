"""ROC AUC by ranks (the Mann-Whitney U statistic), with ties counted as half.

Used to ask how well the reference LM's weights separate grounded tokens from template
tokens: AUC 1 means every grounded token gets a larger weight than every template token.
"""

from __future__ import annotations

import numpy as np
import torch

from megatron_prior.data.kinds import KIND_IDS


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of the ranks they span."""
    values = np.asarray(values, dtype=np.float64)
    order = np.argsort(values, kind="mergesort")
    sorted_vals = values[order]
    # Boundaries of runs of equal values in sorted order.
    starts = np.flatnonzero(np.r_[True, sorted_vals[1:] != sorted_vals[:-1]])
    ends = np.r_[starts[1:], len(values)]
    run_rank = (starts + 1 + ends) / 2.0  # mean of ranks starts+1 .. ends
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(run_rank, ends - starts)
    return ranks


def roc_auc(scores, labels) -> float:
    """P(score of a random positive > score of a random negative) + 0.5 P(equal).

    ``labels`` are booleans (or 0/1); both classes must be present and scores must be finite.
    """
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1)
    if scores.shape != labels.shape:
        raise ValueError(f"scores {scores.shape} and labels {labels.shape} must have one length")
    if not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0/1 or booleans")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite")
    labels = labels.astype(bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"ROC AUC needs both classes, got {n_pos} positives and {n_neg} negatives")
    rank_sum = average_ranks(scores)[labels].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def kind_separation_auc(weights: torch.Tensor | np.ndarray, kinds: torch.Tensor | np.ndarray,
                        mask: torch.Tensor | np.ndarray | None = None, positive: str = "grounded",
                        negative: str = "template") -> float:
    """AUC of ``weights`` separating tokens of kind ``positive`` from kind ``negative``
    (other kinds and masked tokens are left out)."""
    for name in (positive, negative):
        if name not in KIND_IDS:
            raise ValueError(f"unknown token kind {name!r} (known: {', '.join(KIND_IDS)})")
    w = torch.as_tensor(weights).reshape(-1).to(torch.float64).numpy()
    k = torch.as_tensor(kinds).reshape(-1).to(torch.int64).numpy()
    if w.shape != k.shape:
        raise ValueError(f"weights {w.shape} and kinds {k.shape} must have one length")
    keep = np.isin(k, (KIND_IDS[positive], KIND_IDS[negative]))
    if mask is not None:
        m = torch.as_tensor(mask).reshape(-1).numpy()
        if m.shape != k.shape:
            raise ValueError(f"mask {m.shape} and kinds {k.shape} must have one length")
        keep &= m != 0
    return roc_auc(w[keep], k[keep] == KIND_IDS[positive])
