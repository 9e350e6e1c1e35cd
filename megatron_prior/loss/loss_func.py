"""The training ``loss_func`` (DESIGN.md section 5), one registry entry per way of weighting tokens.

``make_loss_func(name, **options)`` returns ``loss_func(batch, per_token_ce)`` for the pipeline
schedule's ``forward_step``. It returns ``(loss_sum, num_tokens, logs)`` with
``loss_sum = sum(token weight * ce)`` and ``num_tokens`` an int 0-dim tensor: with megatron-core's
``calculate_per_token_loss=True`` the schedule sums the counts of all micro-batches (in an int
tensor) and ``finalize_model_grads`` divides the gradients by the data-parallel total, so the
gradient does not depend on how the global batch is cut into micro-batches or ranks.

A weighting is registered with ``@register_loss("name")`` on a factory taking the options
and returning ``weigh(batch, ce, mask) -> (token_weights, num_tokens, checks)``, where
``checks`` are ``(count tensor, message)`` pairs of bad values found (read back together with
the common checks, in one host transfer); callers never change.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from megatron_prior.data.kinds import KIND_NAMES

LossFunc = Callable[[dict, torch.Tensor], tuple[torch.Tensor, torch.Tensor, dict]]
Checks = list[tuple[torch.Tensor, str]]
Weigh = Callable[[dict, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, Checks]]

_REGISTRY: dict[str, Callable[..., Weigh]] = {}


def register_loss(name: str) -> Callable[[Callable[..., Weigh]], Callable[..., Weigh]]:
    """Register a factory ``(**options) -> weigh`` under ``name``."""

    def register(factory: Callable[..., Weigh]) -> Callable[..., Weigh]:
        if name in _REGISTRY:
            raise ValueError(f"loss {name!r} is registered twice")
        _REGISTRY[name] = factory
        return factory

    return register


def loss_names() -> tuple[str, ...]:
    """The registered loss names (for ``--loss`` choices)."""
    return tuple(sorted(_REGISTRY))


def _batch_tensor(batch: dict, key: str, loss: str, why: str, like: torch.Tensor) -> torch.Tensor:
    if key not in batch:
        raise KeyError(f"loss {loss!r} needs batch[{key!r}] ({why}); the batch has {sorted(batch)}")
    value = batch[key]
    if tuple(value.shape) != tuple(like.shape):
        raise ValueError(f"batch[{key!r}] has shape {tuple(value.shape)}, per_token_ce has {tuple(like.shape)}")
    return value


def _count(mask: torch.Tensor) -> torch.Tensor:
    # The schedule accumulates counts in an int tensor; a 0/1 mask count is exact there.
    return mask.sum().to(torch.int)


@register_loss("ntp")
def _ntp() -> Weigh:
    """Plain next-token prediction: every loss token weighs 1."""
    return lambda batch, ce, mask: (mask, _count(mask), [])


@register_loss("prior")
def _prior() -> Weigh:
    """PRIOR: ``m = batch["loss_weights"]`` (the packer's per-caption normalised weights)."""

    def weigh(batch: dict, ce: torch.Tensor, mask: torch.Tensor):
        m = _batch_tensor(batch, "loss_weights", "prior", "PRIOR multipliers from the packer", ce).float()
        checks = [(torch.isnan(m).sum(), "batch['loss_weights'] holds {} NaN value(s)"),
                  (torch.isinf(m).sum(), "batch['loss_weights'] holds {} infinite value(s)"),
                  ((m < 0).sum(), "batch['loss_weights'] holds {} negative value(s)")]
        return m * mask, _count(mask), checks

    return weigh


@register_loss("rho1")
def _rho1(ratio: float = 0.6) -> Weigh:
    """Rho-1: train only on the top ``ratio`` of the micro-batch's loss tokens by excess loss
    ``ce - (-log p_ref)`` (needs ``batch["ref_logprobs"]``); the count is the number selected.
    The selection is per micro-batch, so unlike ntp/prior the result depends on micro-batching."""
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"rho1 ratio must be in (0, 1], got {ratio}")

    def weigh(batch: dict, ce: torch.Tensor, mask: torch.Tensor):
        ref = _batch_tensor(batch, "ref_logprobs", "rho1", "reference log-probs", ce).float()
        keep = mask.reshape(-1) != 0
        excess = torch.where(keep, ce.detach().reshape(-1) + ref.reshape(-1), -math.inf)
        order = torch.sort(excess, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        # ceil keeps at least one token whenever there is one; no host sync needed.
        k = torch.ceil(keep.sum() * ratio)
        selected = ((rank < k) & keep).view(mask.shape).to(ce.dtype)
        checks = [((torch.isnan(ref) & (mask != 0)).sum(),
                   "batch['ref_logprobs'] holds {} NaN value(s) at loss tokens")]
        return selected, _count(selected), checks

    return weigh


def make_loss_func(name: str, *, validate: bool = True, **options) -> LossFunc:
    """``loss_func(batch, per_token_ce [b, s] fp32) -> (loss_sum, num_tokens, logs)``.

    ``logs`` holds ``[sum, count]`` pairs (summed over micro-batches and data-parallel ranks
    by the training loop): ``"lm loss"`` (the weighted loss and the count it is divided by),
    ``"ntp loss"`` (unweighted, over all loss tokens) and, when the batch has
    ``token_kinds``, ``"loss/<kind>"`` for every kind of ``KIND_NAMES`` (count 0 where absent,
    so every micro-batch logs the same keys). ``validate`` checks that the mask is 0/1, the
    kinds are known and the mode's inputs are sane (PRIOR weights finite and non-negative,
    Rho-1 reference log-probs not NaN), in one host read-back per call (a device sync on a GPU).
    """
    if name not in _REGISTRY:
        raise ValueError(f"unknown loss {name!r}; registered: {', '.join(loss_names())}")
    try:
        weigh = _REGISTRY[name](**options)
    except TypeError as err:
        raise TypeError(f"bad options for loss {name!r}: {err}") from err

    def loss_func(batch: dict, per_token_ce: torch.Tensor):
        if "loss_mask" not in batch:
            raise KeyError(f"loss {name!r} needs batch['loss_mask']; the batch has {sorted(batch)}")
        mask = batch["loss_mask"]
        if tuple(mask.shape) != tuple(per_token_ce.shape):
            raise ValueError(f"batch['loss_mask'] has shape {tuple(mask.shape)}, per_token_ce has "
                             f"{tuple(per_token_ce.shape)}")
        kinds = batch.get("token_kinds")
        if kinds is not None and tuple(kinds.shape) != tuple(per_token_ce.shape):
            raise ValueError(f"batch['token_kinds'] has shape {tuple(kinds.shape)}, per_token_ce has "
                             f"{tuple(per_token_ce.shape)}")
        ce = per_token_ce.float()
        token_weights, num_tokens, checks = weigh(batch, ce, mask.to(ce.dtype))
        if validate:
            _raise_on_bad_values(_common_checks(mask, kinds) + checks)
        mask = mask.to(ce.dtype)
        loss_sum = (ce * token_weights).sum()
        masked_ce = (ce * mask).detach()
        mask_count = mask.sum()
        logs = {
            "lm loss": torch.stack([loss_sum.detach(), num_tokens.to(ce.dtype)]),
            "ntp loss": torch.stack([masked_ce.sum(), mask_count]),
        }
        if kinds is not None:
            idx = kinds.reshape(-1).long()
            sums = torch.zeros(len(KIND_NAMES), dtype=ce.dtype, device=ce.device)
            sums.index_add_(0, idx, masked_ce.reshape(-1))
            counts = torch.zeros_like(sums).index_add_(0, idx, mask.reshape(-1))
            for k, kind in enumerate(KIND_NAMES):
                logs[f"loss/{kind}"] = torch.stack([sums[k], counts[k]])
        return loss_sum, num_tokens, logs

    return loss_func


def _common_checks(mask: torch.Tensor, kinds) -> Checks:
    checks = [(((mask != 0) & (mask != 1)).sum(),
               "batch['loss_mask'] holds {} value(s) other than 0 and 1; the token count would not be "
               "integral (fractional weights belong in batch['loss_weights'])")]
    if kinds is not None:
        checks.append((((kinds.long() < 0) | (kinds.long() >= len(KIND_NAMES))).sum(),
                       f"batch['token_kinds'] holds {{}} id(s) outside 0..{len(KIND_NAMES) - 1} "
                       f"({', '.join(KIND_NAMES)})"))
    return checks


def _raise_on_bad_values(checks: Checks) -> None:
    counts = torch.stack([count for count, _ in checks]).tolist()
    for count, (_, message) in zip(counts, checks):
        if count:
            raise ValueError(message.format(count))
