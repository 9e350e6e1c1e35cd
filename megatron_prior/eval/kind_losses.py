"""Held-out loss by token kind (grounded, template, unrelated, other).

Sums and counts are kept as a ``[len(KIND_NAMES), 2]`` float64 tensor so that batches (and
data-parallel ranks, by an all-reduce) can be added before the means are taken: a mean of
batch means would weigh a short batch like a long one.
"""

from __future__ import annotations

import torch

from megatron_prior.data.kinds import KIND_NAMES


def kind_loss_sums(per_token_ce: torch.Tensor, kinds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[K, 2]`` float64: per kind id, the sum of ``per_token_ce`` over unmasked tokens and
    their count. The three inputs have one shape; ``mask`` is 0/1; masked positions may hold
    anything (even NaN), unmasked ones must be finite."""
    if not (per_token_ce.shape == kinds.shape == mask.shape):
        raise ValueError(f"per_token_ce {tuple(per_token_ce.shape)}, kinds {tuple(kinds.shape)} and mask "
                         f"{tuple(mask.shape)} must have one shape")
    if kinds.is_floating_point():
        raise ValueError(f"kinds must be integer ids, got {kinds.dtype}")
    keep = mask.reshape(-1)
    if not bool(((keep == 0) | (keep == 1)).all()):
        raise ValueError("mask must hold only 0 and 1")
    keep = keep.bool()
    ce = per_token_ce.reshape(-1)[keep].to(torch.float64)
    ids = kinds.reshape(-1)[keep].to(torch.int64)
    if ids.numel() and (ids.min() < 0 or ids.max() >= len(KIND_NAMES)):
        raise ValueError(f"kind ids must lie in [0, {len(KIND_NAMES) - 1}] ({', '.join(KIND_NAMES)}), "
                         f"got {int(ids.min())}..{int(ids.max())}")
    if not bool(torch.isfinite(ce).all()):
        raise ValueError("per-token cross-entropy is not finite at an unmasked position")
    sums = torch.zeros(len(KIND_NAMES), 2, dtype=torch.float64)
    sums[:, 0].index_add_(0, ids, ce)
    sums[:, 1].index_add_(0, ids, torch.ones_like(ce))
    return sums


def kind_mean_losses(sums: torch.Tensor) -> dict[str, float]:
    """``{kind name: mean CE}`` from accumulated ``kind_loss_sums``; kinds never seen are left out."""
    if sums.shape != (len(KIND_NAMES), 2):
        raise ValueError(f"sums must have shape ({len(KIND_NAMES)}, 2), got {tuple(sums.shape)}")
    return {name: float(sums[k, 0] / sums[k, 1]) for k, name in enumerate(KIND_NAMES) if sums[k, 1] > 0}

