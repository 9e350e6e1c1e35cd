"""PRIOR's per-token loss multipliers in torch (DESIGN.md section 1).

``w_i = (1 - p_i) ** alpha`` from the reference LM's log-prob, and per caption
``m_i = n_c * w_i / sum_{j in c} w_j`` over the caption's loss tokens; a caption whose weights
sum to 0 gets ``m_i = 1``, masked tokens get 0. The packer (``megatron_prior.data.packing``)
computes the same thing over whole documents while it builds batches; this version works on
tensors already in a batch (online scoring, tests), normalising over the tokens it is given.
"""

from __future__ import annotations

import torch


def prior_weights(
    ref_logprobs: torch.Tensor,
    document_ids: torch.Tensor,
    loss_mask: torch.Tensor,
    alpha: float = 1.0,
) -> torch.Tensor:
    """PRIOR multipliers ``m`` (float32, shape of ``ref_logprobs``).

    Args:
        ref_logprobs: reference log-probabilities ``log p_ref(t_i | t_<i)`` (<= 0).
        document_ids: integer caption id of each token; tokens with the same id share one
            normaliser wherever they sit in the tensor (a caption cut across rows keeps its
            normaliser).
        loss_mask: 1 where the token counts in the loss, 0 elsewhere.
        alpha: exponent of ``1 - p`` (1 in the paper; above 2 hurts).
    """
    if ref_logprobs.shape != document_ids.shape or ref_logprobs.shape != loss_mask.shape:
        raise ValueError(f"ref_logprobs {tuple(ref_logprobs.shape)}, document_ids {tuple(document_ids.shape)} "
                         f"and loss_mask {tuple(loss_mask.shape)} must have the same shape")
    if document_ids.dtype.is_floating_point:
        raise TypeError(f"document_ids must be integers, got {document_ids.dtype}")
    if alpha < 0:
        raise ValueError(f"alpha must be non-negative, got {alpha}")
    keep = loss_mask.reshape(-1) != 0
    logprobs = ref_logprobs.reshape(-1).double()
    bad = torch.stack([(torch.isnan(logprobs) & keep).sum(), (logprobs > 0).sum()]).tolist()
    if bad[0]:
        raise ValueError(f"ref_logprobs holds {bad[0]} NaN value(s) at loss tokens")
    if bad[1]:
        raise ValueError(f"ref_logprobs holds {bad[1]} value(s) > 0 (log-probabilities must be <= 0)")
    # float64 throughout, as the packer computes, so both round to the same float32.
    w = torch.where(keep, (1.0 - torch.exp(logprobs)).clamp_(min=0.0).pow_(alpha), 0.0)
    _, doc = torch.unique(document_ids.reshape(-1), return_inverse=True)
    n_docs = int(doc.max()) + 1 if doc.numel() else 0
    sums = torch.zeros(n_docs, dtype=torch.float64, device=w.device).index_add_(0, doc, w)
    counts = torch.zeros(n_docs, dtype=torch.float64, device=w.device).index_add_(0, doc, keep.double())
    positive = sums > 0
    scale = torch.where(positive, counts / torch.where(positive, sums, 1.0), 1.0)
    m = torch.where(positive[doc], scale[doc] * w, 1.0)
    return torch.where(keep, m, 0.0).to(torch.float32).view(ref_logprobs.shape)
