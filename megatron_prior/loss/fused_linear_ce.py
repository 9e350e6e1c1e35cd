"""The output projection and the weighted cross-entropy in one pass, chunk by chunk over tokens.

``loss = w * CE(hidden @ weight.T, target)`` with ``weight`` the vocab-parallel output layer
``[V/tp, h]``, without ever holding the logits ``[s*b, V/tp]``: forward computes each chunk's
logits, keeps only its log-sum-exp statistics (two all-reduces over the tensor-parallel group
for the whole call) and frees them; backward recomputes each chunk's logits, turns them into
the scaled softmax gradient in place, and from it the chunk's hidden-state gradient and its
share of the weight gradient. The price is one extra matmul (the recompute): the gradient of a
per-token loss depends on each token's incoming gradient, which forward does not know.

Tensor parallelism follows megatron-core's ColumnParallelLinear without sequence parallelism:
the hidden states are replicated on the tensor-parallel ranks, each rank multiplies by its
vocabulary slice, and the hidden-state gradient is all-reduced over the group in backward by
``copy_to_tensor_model_parallel_region`` applied to the input, as that layer does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

from megatron_prior.loss.cross_entropy import (
    GPU_CHUNK_ELEMENTS,
    check_inputs,
    chunk_statistics,
    local_target,
    reduce_statistics,
    smoothing_factor,
    softmax_gradient_,
    token_loss,
    vocab_partition,
)

# Tokens per chunk default to a logits chunk of this many elements. Smaller than the plain
# loss's CPU chunk would be slower (matmuls want rows); this keeps a chunk's fp32 logits at
# 32 MiB, a few percent of what the full bf16 logits of a 4k x 32k micro-batch need.
FUSED_CHUNK_ELEMENTS = min(GPU_CHUNK_ELEMENTS, 1 << 23)


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp32 logits of a chunk: a fresh tensor, so callers may overwrite it."""
    return (h @ weight.t()).float()


class _FusedLinearWeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target, loss_weight, label_smoothing, chunk_size, partition):
        h = hidden.reshape(-1, hidden.shape[-1])
        n = h.shape[0]
        t_local, held = local_target(target.reshape(-1).long(), partition)
        smoothing = smoothing_factor(label_smoothing, partition.vocab_size)
        stats = [torch.empty(n, dtype=torch.float32, device=hidden.device) for _ in range(4 if smoothing else 3)]
        for lo in range(0, n, chunk_size):
            hi = min(n, lo + chunk_size)
            x = _chunk_logits(h[lo:hi], weight)
            for out, value in zip(stats, chunk_statistics(x, True, t_local[lo:hi], held[lo:hi], bool(smoothing))):
                out[lo:hi] = value
            del x
        lse, target_logit, logit_sum = reduce_statistics(*stats[:3], stats[3] if smoothing else None, partition)
        ce = token_loss(lse, target_logit, logit_sum, smoothing, partition.vocab_size)
        w = None if loss_weight is None else loss_weight.reshape(-1).float()
        ctx.save_for_backward(hidden, weight, t_local, held, lse, w,
                              ce if loss_weight is not None and ctx.needs_input_grad[3] else None)
        ctx.smoothing, ctx.vocab_size, ctx.chunk_size = smoothing, partition.vocab_size, chunk_size
        logprob = target_logit - lse
        ctx.mark_non_differentiable(logprob)
        loss = ce if w is None else ce * w
        return loss.view(target.shape), logprob.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob):
        hidden, weight, t_local, held, lse, w, ce = ctx.saved_tensors
        g = grad_loss.reshape(-1).float()
        grad_loss_weight = (g * ce).view(grad_loss.shape) if ce is not None else None
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_h or need_w):
            return None, None, None, grad_loss_weight, None, None, None
        scale = g if w is None else g * w
        h = hidden.reshape(-1, hidden.shape[-1])
        grad_h = torch.empty_like(h) if need_h else None
        # Low-precision weights accumulate their gradient over chunks in fp32, rounding once.
        grad_w = (torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None)
        for lo in range(0, h.shape[0], ctx.chunk_size):
            hi = min(h.shape[0], lo + ctx.chunk_size)
            x = _chunk_logits(h[lo:hi], weight)
            softmax_gradient_(x, lse[lo:hi], t_local[lo:hi], held[lo:hi], scale[lo:hi],
                              ctx.smoothing, ctx.vocab_size)
            d = x.to(weight.dtype)
            del x
            if need_h:
                torch.mm(d, weight, out=grad_h[lo:hi])
            if need_w and weight.dtype == torch.float32:
                grad_w.addmm_(d.t(), h[lo:hi])
            elif need_w:
                # CPU matmuls cannot write a bf16/fp16 product into fp32: add the chunk's product.
                grad_w += d.t() @ h[lo:hi]
        if grad_w is not None and grad_w.dtype != weight.dtype:
            grad_w = grad_w.to(weight.dtype)
        return (grad_h.view(hidden.shape) if need_h else None), grad_w, None, grad_loss_weight, None, None, None


def fused_linear_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_weight: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    label_smoothing: float = 0.0,
    return_logprobs: bool = False,
    validate: bool = True,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token ``loss_weight * CE(hidden @ weight.T, target)`` without materialising the logits.

    Args:
        hidden: ``[s, b, h]`` (any leading shape), the output layer's input as megatron-core's
            ColumnParallelLinear receives it (replicated over the tensor-parallel ranks; with
            sequence parallelism, gather it first).
        weight: this rank's output-layer slice ``[V/tp, h]`` (``output_layer.weight``, or the
            shared embedding weight when embeddings are tied), same dtype as ``hidden``.
        target: token ids ``[s, b]`` in ``[0, V)``.
        loss_weight: per-token multipliers ``[s, b]`` or None.
        chunk_size: tokens per chunk (default: a logits chunk of ``FUSED_CHUNK_ELEMENTS``).
        label_smoothing, return_logprobs, validate: as in ``vocab_parallel_weighted_cross_entropy``.

    Returns:
        The per-token loss (fp32, shape of ``target``), and the target log-prob with
        ``return_logprobs``. Gradients flow to ``hidden`` (all-reduced over the tensor-parallel
        group), ``weight`` and ``loss_weight``.
    """
    if hidden.dim() < 2 or tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden shape {tuple(hidden.shape)} "
                         "(expected hidden [s, b, h] and target [s, b])")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]} "
                         "(expected this rank's output-layer slice [V/tp, h])")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    partition = vocab_partition(weight.shape[0])
    check_inputs(hidden, target, loss_weight, label_smoothing, partition.vocab_size, validate, what="hidden")
    if chunk_size is None:
        chunk_size = max(1, FUSED_CHUNK_ELEMENTS // weight.shape[0])
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if partition.group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=partition.group)
    loss, logprob = _FusedLinearWeightedCrossEntropy.apply(hidden, weight, target, loss_weight,
                                                           float(label_smoothing), chunk_size, partition)
    return (loss, logprob) if return_logprobs else loss

