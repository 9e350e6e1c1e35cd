"""Sample packing, model side: attention and positions kept within each packed sample.

A packed row (``--pack-samples``: several documents for the GPT, several captions with their
images for the LVLMs, built by ``megatron_prior.data``) marks where its samples start by
position ids that start again at 0; an LVLM's text row marks its images by ``<image>`` tokens,
and ``combined_positions`` carries the marks into the language model's combined sequence
(``megatron_prior.models.layout``). From the per-sample positions ``packed_inputs`` gives the
language model what keeps each sample to itself:

- with Transformer Engine's attention, megatron-core's ``PackedSeqParams`` (``qkv_format
  "thd"``, ``cu_seqlens`` at the sample starts), under which megatron-core also starts RoPE
  again at every sample;
- with megatron-core's local attention, which takes no packed format, the equivalent
  block-diagonal causal mask (bool ``[b, 1, s, s]``, True = masked) and, for RoPE, the
  per-sample positions (megatron-core's GPTModel evaluates RoPE at ``0 .. s-1`` whatever
  position ids it is given: a forward hook on its ``RotaryEmbedding`` hands each position
  its own sample's row of the same table).

Each sample then computes what it computes alone in a row (up to the float rounding of a
longer row's reductions), so its losses, PRIOR weights included, are the unpacked ones.
"""

from __future__ import annotations

import argparse
import contextlib
from functools import partial
from typing import Callable, Iterator, Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.dot_product_attention import DotProductAttention

from megatron_prior.models.arch import get_arch
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.layout import combined_index


def combined_positions(position_ids: torch.Tensor, image_mask: Optional[torch.Tensor],
                       image_sequence_length: int) -> torch.Tensor:
    """Per-sample positions ``[b, image_sequence_length - 1 + s]`` of the combined sequence
    from text position ids ``[b, s]`` (0 where a sample starts) and the ``<image>`` tokens
    (``image_mask``; None for a text-only model, whose positions are the text's)."""
    if image_mask is None:
        return position_ids
    b, s = position_ids.shape
    length = image_sequence_length - 1 + s
    index = combined_index(image_mask, image_sequence_length)
    # A sample starting with an <image> starts at the first of its image's positions.
    first = index - (image_sequence_length - 1) * image_mask.long()
    starts = (position_ids == 0) & (first < length)
    rows = torch.arange(b, device=position_ids.device)[:, None].expand(b, s)
    start_of = torch.zeros(b, length, dtype=torch.long, device=position_ids.device)
    start_of[rows[starts], first[starts]] = first[starts]
    return torch.arange(length, device=position_ids.device) - start_of.cummax(dim=1).values


def block_causal_mask(positions: torch.Tensor) -> torch.Tensor:
    """megatron-core's attention mask (bool ``[b, 1, s, s]``, True = masked) that keeps each
    position to the earlier positions of its own sample (samples start where positions are 0)."""
    sample = (positions == 0).cumsum(dim=1)
    n = positions.shape[1]
    later = torch.ones(n, n, dtype=torch.bool, device=positions.device).triu(diagonal=1)
    return (later | (sample[:, :, None] != sample[:, None, :])).unsqueeze(1)


def thd_params(positions: torch.Tensor) -> PackedSeqParams:
    """megatron-core's packed-sequence parameters of one packed row ``[1, s]``: a sequence
    from each position 0 to the next."""
    if positions.shape[0] != 1:
        raise ValueError(f"Transformer Engine's packed format takes one row per micro-batch, got {positions.shape[0]}: "
                         "--pack-samples with Transformer Engine needs --micro-batch-size 1")
    n = positions.shape[1]
    starts = torch.nonzero(positions[0] == 0).flatten()
    cu_seqlens = torch.cat([starts, starts.new_tensor([n])]).to(torch.int32)
    # GPTModel sizes its RoPE table by max_seqlen, and megatron-core's packed RoPE starts every
    # sequence at position 0 only from a table shorter than the row (a table of the row's
    # length it reads at the row's offsets): the longest sequence, not the row.
    longest = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu_seqlens, cu_seqlens_kv=cu_seqlens,
                           max_seqlen_q=longest, max_seqlen_kv=longest)


def _rope_at_positions(rotary: torch.nn.Module, args: tuple, table: torch.Tensor,
                       positions: torch.Tensor) -> torch.Tensor:
    # RotaryEmbedding returns the table of positions 0 .. s-1, [s, 1, 1, d]; each (position,
    # row) takes its own position's entry: [s, b, 1, d], which megatron-core's unfused RoPE
    # broadcasts over the heads as it broadcasts the shared table over the rows.
    return table[positions.t()].flatten(2, 3)


@contextlib.contextmanager
def _rope_positions(language_models: list, positions: torch.Tensor) -> Iterator[None]:
    hook = partial(_rope_at_positions, positions=positions)
    handles = [lm.rotary_pos_emb.register_forward_hook(hook) for lm in language_models
               if lm.position_embedding_type == "rope"]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _check_local_kernels(language_models: list) -> None:
    for lm in language_models:
        if lm.config.masked_softmax_fusion:
            raise ValueError("--pack-samples with megatron-core's local attention needs masked_softmax_fusion off: "
                             "its fused causal softmax ignores the packed attention mask")
        if lm.config.apply_rope_fusion and lm.position_embedding_type == "rope":
            raise ValueError("--pack-samples with megatron-core's local attention needs apply_rope_fusion off: "
                             "the fused RoPE takes one table for all rows, not per-sample positions")


@contextlib.contextmanager
def packed_inputs(model: torch.nn.Module, batch: dict, model_config: ModelConfig) -> Iterator[dict]:
    """The batch entries that keep a packed batch's samples apart in ``model`` (this rank's
    chunk): ``{"packed_seq_params": ...}`` with Transformer Engine's attention, else
    ``{"attention_mask": ...}`` while RoPE, inside the ``with``, sees per-sample positions."""
    image_length = model_config.image_sequence_length
    image_mask = batch["tokens"] == model_config.image_token_id if image_length else None
    positions = combined_positions(batch["position_ids"], image_mask, image_length)
    language_models = [m for m in model.modules() if isinstance(m, GPTModel)]
    local = any(isinstance(m, DotProductAttention) for lm in language_models for m in lm.modules())
    if not local:
        yield {"packed_seq_params": thd_params(positions)}
        return
    _check_local_kernels(language_models)
    with _rope_positions(language_models, positions):
        yield {"attention_mask": block_causal_mask(positions)}


def log_position_counts(loss_func: Callable, batch: dict, model_config: ModelConfig) -> Callable:
    """``loss_func`` whose logs also say what the batch's positions hold, each as a ``[count,
    positions]`` pair (summed over micro-batches and ranks like the losses):
    ``"padding_share"``, the positions no sample fills (the batch's ``padding_positions``, when it
    counts them), and for a model with images ``"image_share"``, the positions its images add
    (``image_offset`` per ``<image>`` token: the rows are filled so that every image fits)."""
    padding = batch.get("padding_positions")
    images = None
    if model_config.image_offset:
        images = (batch["tokens"] == model_config.image_token_id).sum() * model_config.image_offset
    if padding is None and images is None:
        return loss_func

    def logged(per_token_ce: torch.Tensor):
        loss, num_tokens, logs = loss_func(per_token_ce)
        total = torch.tensor(per_token_ce.numel(), dtype=torch.float32, device=per_token_ce.device)
        if padding is not None:
            logs["padding_share"] = torch.stack([padding.sum().to(total.dtype), total])
        if images is not None:
            logs["image_share"] = torch.stack([images.to(total.dtype), total])
        return loss, num_tokens, logs

    return logged


def check_args(args: argparse.Namespace) -> Optional[str]:
    """What ``--pack-samples`` cannot be combined with, named by flag (None: nothing)."""
    if not args.pack_samples:
        return None
    transformer_engine = (args.fp8_format is not None
                          or getattr(args, "transformer_impl", None) == "transformer_engine")
    if transformer_engine and args.micro_batch_size != 1:
        return (f"--pack-samples with Transformer Engine needs --micro-batch-size 1, got {args.micro_batch_size}: its "
                "packed format takes one row per micro-batch (pack more samples into a longer --seq-length instead)")
    if getattr(args, "context_parallel_size", 1) > 1:
        return "--pack-samples does not take --context-parallel-size > 1 (sequences would need padding per rank)"
    if get_arch(args.model).cuts_at_max_position_embeddings and args.max_position_embeddings is not None:
        return (f"--pack-samples with --model {args.model} takes no --max-position-embeddings: the model cuts each row "
                "at it, and a packed row must be cut at one row's combined length (the default)")
    return None
