"""The output projection and the weighted cross-entropy in one pass, chunk by chunk.

``loss = w * CE(hidden @ weight.T, target)`` with ``weight`` the vocab-parallel output layer
``[V/tp, h]``, without ever holding the logits ``[s*b, V/tp]``: forward computes the logits of
a chunk of tokens, keeps only their log-sum-exp statistics (two all-reduces over the
tensor-parallel group for the whole call) and frees them; backward recomputes the logits chunk
by chunk (over tokens, or over the vocabulary when that keeps the accumulated gradient
smaller), turns them into the scaled softmax gradient in place, and from it the hidden-state
and weight gradients. The price is one extra matmul (the recompute): the gradient of a
per-token loss depends on each token's incoming gradient, which forward does not know.

Tensor parallelism follows megatron-core's ColumnParallelLinear: each rank multiplies the
hidden states by its vocabulary slice; the input goes through
``copy_to_tensor_model_parallel_region`` (replicated input, gradient all-reduced over the group)
or, with sequence parallelism, ``gather_from_sequence_parallel_region`` (sequence shards
all-gathered, gradient reduce-scattered), as that layer does.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from megatron_prior.loss.cross_entropy import (
    check_inputs,
    chunk_statistics,
    default_chunk_rows,
    local_target,
    reduce_statistics,
    smoothing_factor,
    softmax_gradient_,
    token_loss,
    vocab_partition,
)

# Default chunks on a GPU: 1/32 of the logits, so that a chunk's fp32 copy and its
# low-precision product stay well under the full logits that the unfused path holds, but at
# least this many elements, so that the chunk matmuls stay large enough to run at full speed.
# On CPU the plain loss's cache-sized chunks win: each chunk's logits stay in cache between
# the matmul and the softmax passes.
FUSED_CHUNK_FRACTION = 32
FUSED_MIN_CHUNK_ELEMENTS = 1 << 22


def default_chunk_size(tokens: int, partition_vocab_size: int, device: torch.device) -> int:
    """Tokens per chunk when the caller does not say."""
    if device.type != "cuda":
        return min(tokens, default_chunk_rows(partition_vocab_size, device))
    return min(tokens, max(-(-tokens // FUSED_CHUNK_FRACTION), -(-FUSED_MIN_CHUNK_ELEMENTS // partition_vocab_size)))


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
        h = hidden.reshape(-1, hidden.shape[-1])
        grad_h, grad_w = _input_gradients(h, weight, t_local, held, lse, g if w is None else g * w,
                                          ctx.smoothing, ctx.vocab_size, ctx.chunk_size * weight.shape[0],
                                          need_h, need_w)
        return (grad_h.view(hidden.shape) if need_h else None), grad_w, None, grad_loss_weight, None, None, None


def _gradient_chunk(h, weight, lse, t_local, held, scale, smoothing, vocab_size) -> torch.Tensor:
    """``scale * d loss / d logits`` for ``h @ weight.T``, in the weight's dtype."""
    x = _chunk_logits(h, weight)
    softmax_gradient_(x, lse, t_local, held, scale, smoothing, vocab_size)
    return x.to(weight.dtype)


def _accumulate_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    if acc.dtype == a.dtype:
        acc.addmm_(a, b)
    else:  # matmuls cannot write a bf16/fp16 product into fp32 (on CPU): add the product
        acc += a @ b


def _input_gradients(h, weight, t_local, held, lse, scale, smoothing, vocab_size, chunk_elements, need_h, need_w):
    """Gradients of hidden ``[n, h]`` and weight ``[V/tp, h]``, recomputing the logits chunk by chunk.

    One of the two sums over chunks: chunks of tokens complete the hidden-state gradient rows
    one chunk at a time and accumulate the weight gradient; chunks of the vocabulary do the
    reverse. The accumulated one is kept in fp32 for low-precision weights (rounded once at the
    end), so the smaller of the two is chosen: for usual micro-batches (tokens < V/tp) that is
    the hidden-state gradient, and no weight-sized fp32 buffer is ever allocated.
    """
    n, vp = h.shape[0], weight.shape[0]
    over_vocab = vp >= n
    need_acc, need_exact = (need_h, need_w) if over_vocab else (need_w, need_h)
    acc_shape, exact_shape = (h.shape, weight.shape) if over_vocab else (weight.shape, h.shape)
    acc = torch.zeros(acc_shape, dtype=torch.float32, device=h.device) if need_acc else None
    exact = torch.empty(exact_shape, dtype=weight.dtype, device=h.device) if need_exact else None
    args = (smoothing, vocab_size)
    if over_vocab:
        step = max(1, chunk_elements // n)
        for v0 in range(0, vp, step):
            v1 = min(vp, v0 + step)
            in_chunk = held & (t_local >= v0) & (t_local < v1)
            d = _gradient_chunk(h, weight[v0:v1], lse, torch.where(in_chunk, t_local - v0, 0), in_chunk, scale, *args)
            if need_w:
                torch.mm(d.t(), h, out=exact[v0:v1])
            if need_h:
                _accumulate_mm(acc, d, weight[v0:v1])
        grad_h, grad_w = acc, exact
    else:
        step = max(1, chunk_elements // vp)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            d = _gradient_chunk(h[lo:hi], weight, lse[lo:hi], t_local[lo:hi], held[lo:hi], scale[lo:hi], *args)
            if need_h:
                torch.mm(d, weight, out=exact[lo:hi])
            if need_w:
                _accumulate_mm(acc, d.t(), h[lo:hi])
        grad_h, grad_w = exact, acc
    return (grad_h.to(h.dtype) if need_h else None), (grad_w.to(weight.dtype) if need_w else None)


def fused_linear_weighted_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    loss_weight: Optional[torch.Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    label_smoothing: float = 0.0,
    return_logprobs: bool = False,
    validate: bool = False,
    sequence_parallel: bool = False,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token ``loss_weight * CE(hidden @ weight.T, target)`` without materialising the logits.

    Args:
        hidden: ``[s, b, h]`` (any leading shape), the output layer's input as megatron-core's
            ColumnParallelLinear receives it: replicated over the tensor-parallel ranks, or with
            ``sequence_parallel`` this rank's sequence shard ``[s/tp, b, h]``.
        weight: this rank's output-layer slice ``[V/tp, h]`` (``output_layer.weight``, or the
            shared embedding weight when embeddings are tied), same dtype as ``hidden``.
        target: token ids ``[s, b]`` in ``[0, V)``.
        loss_weight: per-token multipliers ``[s, b]`` or None.
        chunk_size: tokens per forward chunk; backward chunks hold as many logits, over
            tokens or over the vocabulary (default: ``default_chunk_size``).
        label_smoothing, return_logprobs, validate: as in ``vocab_parallel_weighted_cross_entropy``.
        sequence_parallel: the hidden states are split along the sequence over the
            tensor-parallel ranks (megatron's ``--sequence-parallel``).

    Returns:
        The per-token loss (fp32, shape of ``target``), and the target log-prob with
        ``return_logprobs``. Gradients flow to ``hidden`` (all-reduced over the tensor-parallel
        group, or reduce-scattered to the sequence shards), ``weight`` and ``loss_weight``.
    """
    if hidden.dim() < 2:
        raise ValueError(f"hidden must be [s, b, h], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]} "
                         "(expected this rank's output-layer slice [V/tp, h])")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} differs from hidden dtype {hidden.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"weight is on {weight.device} but hidden is on {hidden.device}")
    partition = vocab_partition(weight.shape[0])
    # What ColumnParallelLinear does to its input: gather the sequence shards (reduce-scatter
    # their gradient), or pass the replicated input on (all-reduce its gradient).
    if partition.group is not None and sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True, group=partition.group)
    elif partition.group is not None:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=partition.group)
    if tuple(target.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match hidden shape {tuple(hidden.shape)}"
                         f"{' (sequence shards gathered)' if sequence_parallel else ''}: expected hidden "
                         "[s, b, h] and target [s, b]")
    check_inputs(hidden, target, loss_weight, label_smoothing, partition.vocab_size, validate, what="hidden")
    if chunk_size is None:
        chunk_size = default_chunk_size(target.numel(), weight.shape[0], hidden.device)
    elif chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    loss, logprob = _FusedLinearWeightedCrossEntropy.apply(hidden, weight, target, loss_weight,
                                                           float(label_smoothing), chunk_size, partition)
    return (loss, logprob) if return_logprobs else loss

