"""Route a GPTModel's language-model loss through megatron-prior's cross-entropy.

megatron-core's GPTModel computes logits with its output layer, then the per-token loss with
``compute_language_model_loss``. ``install_loss_head`` swaps in, on one model instance:

- the vocab-parallel cross-entropy of ``megatron_prior.loss.cross_entropy`` (in-place
  backward, no fp32 softmax kept beside the logits), and
- with ``fused_linear_ce``, the fused output projection + cross-entropy: while a forward with
  labels runs, the output layer hands its input and weight on instead of logits, and the loss
  is computed chunk by chunk without materialising them. Without labels (inference) the
  output layer computes logits as usual.

Only instance attributes change, so parameter names and checkpoints stay megatron-core's.
The weighting (PRIOR multipliers, masks) is applied afterwards by the training loss_func.
Shapes and dtypes are checked on every call (metadata, free); the label values only with
``check_inputs`` (``--check-loss-inputs``), since reading them back stalls the GPU once per
micro-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from megatron.core.models.gpt import GPTModel

from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
from megatron_prior.loss.fused_linear_ce import fused_linear_weighted_cross_entropy


@dataclass
class _DeferredLogits:
    hidden: torch.Tensor
    weight: torch.Tensor
    sequence_parallel: bool


def _labels_given(args: tuple, kwargs: dict) -> bool:
    # GPTModel.forward(input_ids, position_ids, attention_mask, decoder_input, labels, ...)
    return kwargs.get("labels") is not None or (len(args) > 4 and args[4] is not None)


def install_loss_head(model: GPTModel, fused_linear_ce: bool = False, check_inputs: bool = False) -> None:
    if not model.post_process:
        return

    def compute_language_model_loss(labels: torch.Tensor, logits) -> torch.Tensor:
        # Ignored positions (LLaVA's -100, image positions) carry loss_mask 0 downstream;
        # any in-vocabulary id keeps the kernel's range check meaningful for the rest.
        target = labels.transpose(0, 1).clamp(min=0).contiguous()
        if isinstance(logits, _DeferredLogits):
            loss = fused_linear_weighted_cross_entropy(logits.hidden, logits.weight, target,
                                                       sequence_parallel=logits.sequence_parallel,
                                                       validate=check_inputs)
        else:
            loss = vocab_parallel_weighted_cross_entropy(logits, target, validate=check_inputs)
        return loss.transpose(0, 1).contiguous()

    model.compute_language_model_loss = compute_language_model_loss
    if not fused_linear_ce:
        return

    output_layer = model.output_layer
    plain_forward = output_layer.forward
    state = {"labels": False}

    def remember_labels(module, args, kwargs):
        state["labels"] = _labels_given(args, kwargs)

    def forward(hidden_states, weight=None, runtime_gather_output=None):
        if not state["labels"]:
            return plain_forward(hidden_states, weight=weight, runtime_gather_output=runtime_gather_output)
        w = weight if weight is not None else output_layer.weight
        return _DeferredLogits(hidden_states, w, output_layer.sequence_parallel), None

    model.register_forward_pre_hook(remember_labels, with_kwargs=True)
    output_layer.forward = forward
