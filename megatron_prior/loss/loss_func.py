"""The training ``loss_func``: how each ``--loss`` weighs the per-token cross-entropy.

- ``ntp``: every loss token weighs 1;
- ``prior``, ``mi``, ``cal``: the data pipeline's per-caption normalised multipliers
  (``batch["loss_weights"]``; how each is made is the packer's, ``data/packing.py``);
- ``rho1`` (Rho-1, Lin et al. 2024): the ``ratio`` fraction of the micro-batch's loss tokens with
  the largest excess loss ``ce - (-log p_ref)`` (``batch["ref_logprobs"]``, the model's CE
  detached) weigh 1, the others 0, and the loss is the mean CE over the kept tokens.

``make_loss_func(name)`` returns ``loss_func(batch, per_token_ce)`` for the pipeline
schedule's ``forward_step``. It returns ``(loss_sum, num_tokens, logs)`` with
``loss_sum = sum(token weight * ce)`` and ``num_tokens`` an int 0-dim tensor: with megatron-core's
``calculate_per_token_loss=True`` the schedule sums the counts of all micro-batches (in an int
tensor) and ``finalize_model_grads`` divides the gradients by the data-parallel total, so the
gradient does not depend on how the global batch is cut into micro-batches or ranks.

Nothing here reads a value back to the host unless ``validate`` asks for it: on a GPU a read-back
waits for every queued kernel, once per micro-batch. The data are validated where they are
loaded; ``validate`` (``--check-loss-inputs``) is the debugging net behind that.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from megatron_prior.loss import LOSSES, PACKED_WEIGHT_LOSSES

LossFunc = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]
Checks = list[tuple[torch.Tensor, str]]


# Rho-1's kept count is ceil(ratio * n); ratio * n is first lowered by this much, so that its
# float rounding (relative 1e-16, n below 1e9 tokens a micro-batch) never keeps one token more.
_RHO1_ROUNDING = 1e-6


def check_rho1_ratio(ratio: float) -> None:
    if not (0.0 < ratio <= 1.0):  # NaN fails too
        raise ValueError(f"the Rho-1 ratio must lie in (0, 1], got {ratio!r}")


def rho1_selection(ce: torch.Tensor, ref_logprobs: torch.Tensor, mask: torch.Tensor, ratio: float) -> torch.Tensor:
    """Rho-1's kept tokens: 1.0 for the ``k = ceil(ratio * n)`` of the ``n`` loss tokens
    (``mask``) with the largest excess loss ``ce + ref_logprobs`` (``L_model - L_ref``), ties to
    the earlier position, 0.0 elsewhere; ``ce`` is read detached.

    No value is read back to the host (the count stays a tensor), and the result depends only on
    the values given: ranks that hold the same per-token CE (tensor-parallel ranks after the
    vocab-parallel cross-entropy) keep the same tokens.
    """
    check_rho1_ratio(ratio)
    keep = mask.reshape(-1) > 0
    excess = (ce.detach().double() + ref_logprobs.double()).reshape(-1)
    order = torch.sort(torch.where(keep, excess, -torch.inf), descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    k = torch.ceil(keep.sum(dtype=torch.float64) * ratio - _RHO1_ROUNDING)
    return ((rank < k) & keep).to(mask.dtype).reshape(mask.shape)


def make_loss_func(name: str, *, kind_names: Sequence[str] = (), validate: bool = False,
                   rho1_ratio: float = 1.0) -> LossFunc:
    """``loss_func(batch, per_token_ce [b, s] fp32) -> (loss_sum, num_tokens, logs)``.

    ``logs`` holds ``[sum, count]`` pairs (summed over micro-batches and data-parallel ranks
    by the training loop), under the keys every log of the project uses: ``"weighted_ce"``
    (the loss trained on: token weight x CE, and the token count it is divided by, the loss
    tokens, or Rho-1's kept ones; equal to ``"ce"`` for ntp), ``"ce"`` (unweighted CE over all
    loss tokens) and, when ``kind_names`` are
    given and the batch has ``token_kinds`` (ids into ``kind_names``), ``"ce_<kind>"`` for every
    kind (count 0 where absent, so every micro-batch logs the same keys).

    Missing batch entries and mismatched shapes are always refused (no values are read).
    ``validate`` also checks the values: the mask is 0/1, the kind ids are in range and PRIOR
    weights are finite and non-negative (Rho-1's reference log-probs finite and <= 0), in one host
    read-back per call (a device sync on a GPU). ``rho1_ratio`` is Rho-1's kept fraction.

    Rho-1 selects per call, i.e. per micro-batch on each data-parallel rank (Rho-1 selects per
    batch): its loss, unlike the others, depends on how the global batch is cut into micro-batches
    and ranks. The schedule sums the kept counts over micro-batches and data-parallel ranks and
    divides by that sum, so the gradient is that of the mean CE over all kept tokens.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    if name == "rho1":
        check_rho1_ratio(rho1_ratio)
    kind_names = tuple(kind_names)

    def loss_func(batch: dict, per_token_ce: torch.Tensor):
        mask = _batch_tensor(batch, "loss_mask", name, "1 where a token carries loss", per_token_ce)
        kinds = None
        if kind_names and "token_kinds" in batch:
            kinds = _batch_tensor(batch, "token_kinds", name, "token kind ids", per_token_ce)
        checks = _common_checks(mask, kinds, kind_names) if validate else []
        ce = per_token_ce.float()
        mask = mask.to(ce.dtype)
        if name in PACKED_WEIGHT_LOSSES:
            m = _batch_tensor(batch, "loss_weights", name, f"{name} multipliers from the packer", ce).float()
            if validate:
                checks += [(torch.isnan(m).sum(), "batch['loss_weights'] holds {} NaN value(s)"),
                           (torch.isinf(m).sum(), "batch['loss_weights'] holds {} infinite value(s)"),
                           ((m < 0).sum(), "batch['loss_weights'] holds {} negative value(s)")]
            token_weights = m * mask
        elif name == "rho1":
            ref = _batch_tensor(batch, "ref_logprobs", name, "reference log-prob per label", ce).float()
            if validate:
                checks += [((~torch.isfinite(ref)).sum(), "batch['ref_logprobs'] holds {} NaN or infinite value(s)"),
                           ((ref > 0).sum(), "batch['ref_logprobs'] holds {} positive value(s)")]
            token_weights = rho1_selection(ce, ref, mask, rho1_ratio)
        else:
            token_weights = mask
        if checks:
            _raise_on_bad_values(checks)
        # The schedule accumulates counts in an int tensor; a 0/1 count is exact there: the loss
        # tokens, or Rho-1's kept ones (the loss is the mean over those).
        num_tokens = (token_weights if name == "rho1" else mask).sum().to(torch.int)
        loss_sum = (ce * token_weights).sum()
        masked_ce = (ce * mask).detach()
        mask_count = mask.sum()
        logs = {
            "weighted_ce": torch.stack([loss_sum.detach(), num_tokens.to(ce.dtype)]),
            "ce": torch.stack([masked_ce.sum(), mask_count]),
        }
        if kinds is not None:
            idx = kinds.reshape(-1).long()
            sums = torch.zeros(len(kind_names), dtype=ce.dtype, device=ce.device)
            sums.index_add_(0, idx, masked_ce.reshape(-1))
            counts = torch.zeros_like(sums).index_add_(0, idx, mask.reshape(-1))
            for k, kind in enumerate(kind_names):
                logs[f"ce_{kind}"] = torch.stack([sums[k], counts[k]])
        return loss_sum, num_tokens, logs

    return loss_func


def _batch_tensor(batch: dict, key: str, loss: str, why: str, like: torch.Tensor) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"loss {loss!r} needs batch[{key!r}] ({why}); the batch has {sorted(batch)}")
    value = batch[key]
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, per_token_ce has {tuple(like.shape)}")
    return value


def _common_checks(mask: torch.Tensor, kinds, kind_names: tuple[str, ...]) -> Checks:
    checks = [(((mask != 0) & (mask != 1)).sum(),
               "batch['loss_mask'] holds {} value(s) other than 0 and 1; the token count would not be "
               "integral (fractional weights belong in batch['loss_weights'])")]
    if kinds is not None:
        checks.append((((kinds.long() < 0) | (kinds.long() >= len(kind_names))).sum(),
                       f"batch['token_kinds'] holds {{}} id(s) outside 0..{len(kind_names) - 1} "
                       f"({', '.join(kind_names)})"))
    return checks


def _raise_on_bad_values(checks: Checks) -> None:
    counts = torch.stack([count for count, _ in checks]).tolist()
    for count, (_, message) in zip(counts, checks):
        if count:
            raise ValueError(message.format(count))
