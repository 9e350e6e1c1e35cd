"""Loading an H-LVLM's vision encoder from another checkpoint.

Any checkpoint whose model holds ``vision_model.*`` (an H-LVLM trained earlier, e.g. a
warm-up run) can supply the ViT of a new run: only those tensors are read, by the safe
loader of ``megatron_prior.checkpoint`` (megatron-core's resharding), so the source may have
another tensor-parallel layout. The projector
and the language model keep their fresh initialisation.
"""

from __future__ import annotations

import os

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_prior.checkpoint import CheckpointError, checkpoint_dir, load_state, load_weights, unwrap


def load_vision_encoder(model: torch.nn.Module, load_dir: str | os.PathLike) -> int:
    """Copy the vision encoder's weights from ``load_dir`` into ``model`` (an LLaVAModel
    chunk); returns the number of tensors loaded. Chunks without the encoder load nothing."""
    model = unwrap(model)
    if getattr(model, "vision_model", None) is None:
        return 0
    ckpt = checkpoint_dir(load_dir)
    full = model.sharded_state_dict()
    wanted = {k: v for k, v in full.items() if k.startswith("vision_model.")}
    if not any(isinstance(v, ShardedTensor) for v in nested_values(wanted)):
        raise ValueError("the model's sharded state dict has no vision_model.* tensors")
    state = load_state(ckpt, {"model": wanted})["model"]
    _, unexpected = load_weights(model, state, ckpt, strict=False)
    loaded = [k for k in state if k not in unexpected]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected vision encoder keys {sorted(unexpected)[:5]}")
    return len(loaded)
