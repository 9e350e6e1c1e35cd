"""One forward step per architecture, in the form megatron-core's pipeline schedules call.

Every architecture ends in the same loss: the model returns the unreduced per-token
cross-entropy, and the ``--loss`` loss_func (ntp, prior) weighs it with the batch's
``loss_mask`` / ``loss_weights`` and logs it per token kind (``token_kinds``). For the vision-language models those text-aligned tensors
are first expanded to the combined (image + text) sequence, so image positions carry no loss.
"""

from __future__ import annotations

from functools import partial
from typing import Callable, Iterator

import torch

from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.loss.loss_func import make_loss_func
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.layout import expand_to_combined

# Text-aligned batch entries the loss reads; expanded over the image positions for the LVLMs.
_LOSS_KEYS = ("loss_mask", "loss_weights", "token_kinds")


def combined_seq_length(model_config: ModelConfig, seq_length: int) -> int:
    """Positions the language model sees: text, plus the image stream minus its placeholder."""
    if model_config.arch == "gpt":
        return seq_length
    return model_config.image_sequence_length - 1 + seq_length


def _loss_view(batch: dict, model_config: ModelConfig) -> dict:
    if model_config.arch == "gpt":
        return batch
    n = model_config.image_sequence_length
    return {k: expand_to_combined(v, n, fill=0) for k, v in batch.items() if k in _LOSS_KEYS}


def make_forward_step(model_config: ModelConfig, loss: str, check_loss_inputs: bool = False) -> Callable:
    """``forward_step(data_iterator, model) -> (output, loss_func bound to the batch)`` for the
    ``--loss`` named ``loss``; ``check_loss_inputs`` also checks the batch's values in the loss."""
    arch = model_config.arch
    loss_func = make_loss_func(loss, kind_names=KIND_NAMES, validate=check_loss_inputs)

    def forward_step(data_iterator: Iterator[dict], model: torch.nn.Module):
        batch = next(data_iterator)
        if arch == "gpt":
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        elif arch == "hlvlm":
            # LLaVAModel also returns its own combined loss mask; ours (from the same layout
            # rule) keeps the first caption token, which LLaVA's masks with the image.
            output, _ = model(batch["images"], batch["tokens"], batch["position_ids"], None,
                              labels=batch["labels"], loss_mask=batch["loss_mask"])
        elif arch == "ulvlm":
            output = model(batch["images"], batch["tokens"], None, None, labels=batch["labels"])
        else:
            raise ValueError(f"unknown architecture {arch!r}")
        return output, partial(loss_func, _loss_view(batch, model_config))

    return forward_step
