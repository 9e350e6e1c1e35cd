"""The forward step megatron-core's pipeline schedules call, for any architecture.

The architecture's ``forward_loss`` (``megatron_prior.models.arch``) turns the batch into the
unreduced per-token cross-entropy, and the ``--loss`` loss_func (``megatron_prior.loss.LOSSES``)
weighs it with the batch's ``loss_mask`` / ``loss_weights`` (Rho-1: ``ref_logprobs``) and logs it
per token kind (``token_kinds``). For an
architecture with image input those text-aligned tensors are first expanded to the combined
(image + text) sequence, so image positions carry no loss.
"""

from __future__ import annotations

import contextlib
from functools import partial
from typing import Callable, Iterator

import torch

from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.loss.loss_func import make_loss_func
from megatron_prior.models.arch import get_arch
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.layout import expand_to_combined
from megatron_prior.models.packed import log_position_counts, packed_inputs

# Text-aligned batch entries the loss reads; expanded over the image positions.
_LOSS_KEYS = ("loss_mask", "loss_weights", "token_kinds", "ref_logprobs")


def loss_view(batch: dict, model_config: ModelConfig) -> dict:
    """The batch entries the loss reads, aligned with the model's combined sequence."""
    if not model_config.image_offset:
        return batch
    n = model_config.image_sequence_length
    image_mask = batch["tokens"] == model_config.image_token_id
    return {k: expand_to_combined(v, n, fill=0, image_mask=image_mask) for k, v in batch.items() if k in _LOSS_KEYS}


def make_forward_step(model_config: ModelConfig, loss: str, check_loss_inputs: bool = False,
                      pack_samples: bool = False, rho1_ratio: float = 1.0) -> Callable:
    """``forward_step(data_iterator, model) -> (output, loss_func bound to the batch)`` for the
    ``--loss`` named ``loss``; ``check_loss_inputs`` also checks the batch's values in the loss;
    ``pack_samples``: the batches are packed rows (``megatron_prior.models.packed``);
    ``rho1_ratio``: ``--rho1-ratio``."""
    arch = get_arch(model_config.arch)
    loss_func = make_loss_func(loss, kind_names=KIND_NAMES, validate=check_loss_inputs, rho1_ratio=rho1_ratio)

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        with packed_inputs(model, batch, model_config) if pack_samples else contextlib.nullcontext({}) as extra:
            output = arch.forward_loss(model, {**batch, **extra})
        return output, log_position_counts(partial(loss_func, loss_view(batch, model_config)), batch, model_config)

    return forward_step
