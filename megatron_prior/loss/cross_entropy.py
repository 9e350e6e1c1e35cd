"""Vocab-parallel cross-entropy with per-token weights, computed chunk by chunk.

megatron-core's ``vocab_parallel_cross_entropy`` upcasts the whole ``[s, b, V/tp]`` logits to
fp32, keeps that fp32 softmax alive until backward and all-reduces three times. Here:

- the logits are walked in row chunks and upcast one chunk at a time, so with bf16/fp16
  logits the only full-size tensor that lives from forward to backward is the input itself,
  in its own dtype (half of megatron-core's fp32 softmax);
- forward needs two all-reduces: the max of each rank's local log-sum-exp, then one fused
  sum of ``[rescaled sum exp, target logit(, sum of logits when smoothing)]``;
- backward recomputes the softmax per chunk from the saved log-sum-exp and, when the logits
  are an intermediate result (not a leaf the caller owns), writes the gradient over their
  storage, so backward allocates one chunk.

Label smoothing uses megatron-core's formula ``(1 - s) * ce - s * mean_j log p_j`` with
``s = label_smoothing * V / (V - 1)``, where V and the mean run over the *global*
vocabulary. (megatron-core's own kernel, through 0.19, uses the local partition's size and
mean there, so with TP > 1 and smoothing its ranks disagree; with TP = 1 both are the same.)

The per-chunk pieces (statistics, the cross-rank reduction, the in-place softmax gradient)
are shared with ``fused_linear_ce``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.distributed as dist
from megatron.core import parallel_state

# Elements per chunk. On CPU a chunk that stays in cache beats one big pass (which also
# page-faults a fresh fp32 copy); on a GPU the chunk only has to amortise kernel launches.
CPU_CHUNK_ELEMENTS = 1 << 18
GPU_CHUNK_ELEMENTS = 1 << 24

_LOGIT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class VocabPartition:
    """This rank's slice ``[start, end)`` of a vocabulary split over the tensor-parallel group."""

    group: Optional[dist.ProcessGroup]
    world_size: int
    start: int
    end: int
    vocab_size: int


def vocab_partition(partition_vocab_size: int) -> VocabPartition:
    """The slice this rank holds, as megatron-core's ``VocabUtility`` splits it.

    Without megatron-core's parallel state (a plain single process) the rank holds the
    whole vocabulary.
    """
    if not parallel_state.model_parallel_is_initialized():
        return VocabPartition(None, 1, 0, partition_vocab_size, partition_vocab_size)
    group = parallel_state.get_tensor_model_parallel_group()
    rank = parallel_state.get_tensor_model_parallel_rank()
    world = parallel_state.get_tensor_model_parallel_world_size()
    start = rank * partition_vocab_size
    return VocabPartition(group if world > 1 else None, world, start, start + partition_vocab_size,
                          partition_vocab_size * world)


def default_chunk_rows(partition_vocab_size: int, device: torch.device) -> int:
    """Rows per chunk when the caller does not say."""
    elements = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, elements // partition_vocab_size)


def smoothing_factor(label_smoothing: float, vocab_size: int) -> float:
    """megatron-core's ``label_smoothing * V / (V - 1)``: mass ``label_smoothing`` spread over
    the non-target classes."""
    return label_smoothing * vocab_size / (vocab_size - 1) if label_smoothing > 0 else 0.0


# --- validation ----------------------------------------------------------------------------

def check_inputs(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor],
    label_smoothing: float,
    vocab_size: int,
    values: bool,
    what: str = "vocab_parallel_logits",
) -> None:
    """Refuse mismatched shapes/dtypes (free: metadata only) and, with ``values``, targets
    outside ``[0, vocab_size)`` and NaN, infinite or negative weights, naming the problem. The
    value checks are vectorised and read back to the host in one transfer: one device sync per
    call on a GPU, which is why they are a debugging option (``--check-loss-inputs``)."""
    if vocab_parallel_logits.dtype not in _LOGIT_DTYPES:
        raise TypeError(f"{what} must be float32, bfloat16 or float16, got {vocab_parallel_logits.dtype}")
    if target.dtype.is_floating_point or target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer token ids, got {target.dtype}")
    if target.device != vocab_parallel_logits.device:
        raise ValueError(f"target is on {target.device} but {what} is on {vocab_parallel_logits.device}")
    if weight is not None:
        if tuple(weight.shape) != tuple(target.shape):
            raise ValueError(f"weight shape {tuple(weight.shape)} does not match target shape "
                             f"{tuple(target.shape)}")
        if not weight.dtype.is_floating_point:
            raise TypeError(f"weight must be floating point, got {weight.dtype}")
        if weight.device != target.device:
            raise ValueError(f"weight is on {weight.device} but target is on {target.device}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if label_smoothing > 0 and vocab_size < 2:
        raise ValueError("label smoothing needs a vocabulary of at least 2 entries")
    if not values:
        return
    counts = [((target < 0) | (target >= vocab_size)).sum()]
    if weight is not None:
        counts += [torch.isnan(weight).sum(), torch.isinf(weight).sum(), (weight < 0).sum()]
    bad_target, *bad_weight = torch.stack(counts).tolist()
    if bad_target:
        where = _first(((target < 0) | (target >= vocab_size)))
        raise ValueError(f"target holds {bad_target} token id(s) outside the vocabulary [0, {vocab_size}) "
                         f"(first at index {where}: {int(target[where])})")
    for count, kind, mask_fn in zip(bad_weight, ("NaN", "infinite", "negative"),
                                    (torch.isnan, torch.isinf, lambda w: w < 0)):
        if count:
            where = _first(mask_fn(weight))
            raise ValueError(f"weight holds {count} {kind} value(s) (first at index {where}: "
                             f"{float(weight[where])})")


def _first(mask: torch.Tensor) -> tuple:
    return tuple(int(i) for i in mask.nonzero()[0])


# --- per-chunk math shared with the fused linear cross-entropy -------------------------------

def local_target(target_1d: torch.Tensor, partition: VocabPartition) -> tuple[torch.Tensor, torch.Tensor]:
    """Target ids relative to this rank's slice (0 where the target lives elsewhere) and the
    mask of targets this rank holds."""
    held = (target_1d >= partition.start) & (target_1d < partition.end)
    return torch.where(held, target_1d - partition.start, 0), held


def chunk_statistics(
    x: torch.Tensor, x_is_scratch: bool, t_local: torch.Tensor, held: torch.Tensor, with_logit_sum: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Local max, sum of ``exp(x - local max)``, target logit (0 where not held) and, for label
    smoothing, the sum of logits, for fp32 rows ``x`` ``[c, V/tp]``.

    ``x_is_scratch`` says that ``x`` may be overwritten (a fresh fp32 upcast or product)."""
    target_logit = torch.where(held, x.gather(1, t_local.unsqueeze(1)).squeeze(1), 0.0)
    logit_sum = x.sum(dim=1) if with_logit_sum else None
    local_max = x.amax(dim=1)
    shifted = x.sub_(local_max.unsqueeze(1)) if x_is_scratch else x - local_max.unsqueeze(1)
    sum_exp = shifted.exp_().sum(dim=1)
    return local_max, sum_exp, target_logit, logit_sum


def reduce_statistics(
    local_max: torch.Tensor, sum_exp: torch.Tensor, target_logit: torch.Tensor,
    logit_sum: Optional[torch.Tensor], partition: VocabPartition,
) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Log-sum-exp over the global vocabulary, the target logit and the logit sum, in two
    all-reduces over the tensor-parallel group (none without one)."""
    if partition.group is not None:
        global_max = local_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=partition.group)
        # Rescale each rank's sum to the global max so one SUM all-reduce carries every term.
        parts = [sum_exp * torch.exp(local_max - global_max), target_logit]
        if logit_sum is not None:
            parts.append(logit_sum)
        fused = torch.stack(parts)
        dist.all_reduce(fused, op=dist.ReduceOp.SUM, group=partition.group)
        local_max, sum_exp, target_logit = global_max, fused[0], fused[1]
        logit_sum = fused[2] if logit_sum is not None else None
    return local_max + torch.log(sum_exp), target_logit, logit_sum


def token_loss(lse: torch.Tensor, target_logit: torch.Tensor, logit_sum: Optional[torch.Tensor],
               smoothing: float, vocab_size: int) -> torch.Tensor:
    """Unweighted per-token loss: ``lse - x_t``, or megatron-core's smoothed
    ``lse - (1 - s) x_t - s mean_j x_j``."""
    if smoothing == 0.0:
        return lse - target_logit
    return lse - (1.0 - smoothing) * target_logit - smoothing * (logit_sum / vocab_size)


def softmax_gradient_(x: torch.Tensor, lse: torch.Tensor, t_local: torch.Tensor, held: torch.Tensor,
                      scale: torch.Tensor, smoothing: float, vocab_size: int) -> torch.Tensor:
    """Overwrite fp32 logits rows ``x`` with ``scale * d loss / d x = scale * (softmax - (1 - s)
    onehot - s / V)``."""
    x.sub_(lse.unsqueeze(1)).exp_()
    x.scatter_add_(1, t_local.unsqueeze(1), (held.to(x.dtype) * -(1.0 - smoothing)).unsqueeze(1))
    if smoothing:
        x.sub_(smoothing / vocab_size)
    return x.mul_(scale.unsqueeze(1))


# --- the autograd function -----------------------------------------------------------------

class _WeightedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, weight, label_smoothing, chunk_rows, inplace_backward, partition):
        vp = logits.shape[-1]
        rows = logits.view(-1, vp)
        t_local, held = local_target(target.reshape(-1).long(), partition)
        smoothing = smoothing_factor(label_smoothing, partition.vocab_size)
        n = rows.shape[0]
        stats = [torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(4 if smoothing else 3)]
        for lo in range(0, n, chunk_rows):
            hi = min(n, lo + chunk_rows)
            x = rows[lo:hi]
            upcast = x.dtype != torch.float32
            for out, value in zip(stats, chunk_statistics(x.float(), upcast, t_local[lo:hi], held[lo:hi],
                                                          bool(smoothing))):
                out[lo:hi] = value
        lse, target_logit, logit_sum = reduce_statistics(*stats[:3], stats[3] if smoothing else None, partition)
        ce = token_loss(lse, target_logit, logit_sum, smoothing, partition.vocab_size)
        w = None if weight is None else weight.reshape(-1).float()
        loss = ce if w is None else ce * w
        ctx.save_for_backward(logits, t_local, held, lse, w,
                              ce if weight is not None and ctx.needs_input_grad[2] else None)
        ctx.smoothing, ctx.vocab_size, ctx.chunk_rows, ctx.inplace = (
            smoothing, partition.vocab_size, chunk_rows, inplace_backward)
        logprob = target_logit - lse
        ctx.mark_non_differentiable(logprob)
        return loss.view(target.shape), logprob.view(target.shape)

    @staticmethod
    def backward(ctx, grad_loss, _grad_logprob):
        logits, t_local, held, lse, w, ce = ctx.saved_tensors
        g = grad_loss.reshape(-1).float()
        grad_weight = (g * ce).view(grad_loss.shape) if ce is not None else None
        if not ctx.needs_input_grad[0]:
            return None, None, grad_weight, None, None, None, None
        scale = g if w is None else g * w
        vp = logits.shape[-1]
        grad = logits if ctx.inplace else torch.empty_like(logits)
        src, dst = logits.view(-1, vp), grad.view(-1, vp)
        for lo in range(0, src.shape[0], ctx.chunk_rows):
            hi = min(src.shape[0], lo + ctx.chunk_rows)
            if src.dtype == torch.float32:
                # fp32: compute straight in the output rows (which may be the logits themselves).
                x = dst[lo:hi] if ctx.inplace else dst[lo:hi].copy_(src[lo:hi])
            else:
                x = src[lo:hi].float()
            softmax_gradient_(x, lse[lo:hi], t_local[lo:hi], held[lo:hi], scale[lo:hi],
                              ctx.smoothing, ctx.vocab_size)
            if src.dtype != torch.float32:
                dst[lo:hi].copy_(x)
        return grad, None, grad_weight, None, None, None, None


def vocab_parallel_weighted_cross_entropy(
    vocab_parallel_logits: torch.Tensor,
    target: torch.Tensor,
    weight: Optional[torch.Tensor] = None,
    label_smoothing: float = 0.0,
    *,
    return_logprobs: bool = False,
    inplace_backward: bool = True,
    validate: bool = False,
    chunk_rows: Optional[int] = None,
) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token cross-entropy over a vocabulary split across the tensor-parallel group,
    multiplied by ``weight``.

    Args:
        vocab_parallel_logits: ``[s, b, V/tp]`` (any leading shape) fp32, bf16 or fp16: this
            rank's slice of the vocabulary, as megatron-core's ColumnParallelLinear output layer
            produces it.
        target: token ids, shape of the logits without the last dim, in ``[0, V)``.
        weight: per-token multipliers (e.g. PRIOR's ``m``), shape of ``target``, or None.
        label_smoothing: in ``[0, 1)``, megatron-core's formula over the global vocabulary.
        return_logprobs: also return ``log p(target)`` (fp32, no gradient), for online
            scoring and Rho-1.
        inplace_backward: write the logits' gradient over their storage. Done only when the
            logits are an intermediate result (they are not a leaf tensor the caller owns):
            after backward they hold the gradient. Pass False when the logits are read after
            backward; if another op saved them for its own backward, autograd's version check
            refuses instead of computing a wrong gradient.
        validate: also check the values of target ids and weights (one host read-back, i.e. a
            device sync, per call); shapes, dtypes and devices are always checked.
        chunk_rows: rows per chunk (default: a device-dependent number of elements).

    Returns:
        The per-token loss (fp32, shape of ``target``), times ``weight``; with
        ``return_logprobs`` a pair ``(loss, target log-prob)``.
    """
    if vocab_parallel_logits.dim() < 2:
        raise ValueError(f"vocab_parallel_logits must be [s, b, V/tp], got shape "
                         f"{tuple(vocab_parallel_logits.shape)}")
    if tuple(target.shape) != tuple(vocab_parallel_logits.shape[:-1]):
        raise ValueError(f"target shape {tuple(target.shape)} does not match vocab_parallel_logits shape "
                         f"{tuple(vocab_parallel_logits.shape)} (expected the logits' shape without the "
                         "vocabulary dim)")
    partition = vocab_partition(vocab_parallel_logits.shape[-1])
    check_inputs(vocab_parallel_logits, target, weight, label_smoothing, partition.vocab_size, validate)
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(vocab_parallel_logits.shape[-1], vocab_parallel_logits.device)
    elif chunk_rows < 1:
        raise ValueError(f"chunk_rows must be positive, got {chunk_rows}")
    logits = vocab_parallel_logits
    if not logits.is_contiguous():
        # Our own copy: nobody else can see it, so backward may always reuse it.
        logits, inplace = logits.contiguous(), True
    else:
        # A leaf belongs to the caller, and a view shares storage with its base: neither is ours.
        inplace = inplace_backward and not logits.is_leaf and logits._base is None
    loss, logprob = _WeightedCrossEntropy.apply(logits, target, weight, float(label_smoothing), chunk_rows,
                                                inplace, partition)
    return (loss, logprob) if return_logprobs else loss
