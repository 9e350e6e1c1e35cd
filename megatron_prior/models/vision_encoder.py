"""An H-LVLM's vision encoder as a checkpoint of its own: loading it into a model, and the
checkpoint that holds nothing else.

Any checkpoint whose model holds ``vision_model.*`` (an H-LVLM trained earlier, e.g. a
warm-up run) can supply the ViT of a new run: only those tensors are read, by the safe
loader of ``megatron_prior.checkpoint`` (megatron-core's resharding), so the source may have
another tensor-parallel layout. The projector
and the language model keep their fresh initialisation.

An encoder-only checkpoint (a converted CLIP or SigLIP tower, a contrastively pre-trained
encoder) is an ``hlvlm`` checkpoint whose model part is the ``vision_model.*`` tensors alone and
whose ``model_config.json`` describes the ViT, with placeholder language-model fields
(``vision_encoder_config``); ``save_vision_encoder`` writes one from any model that holds the
encoder as ``vision_model`` (built by ``hlvlm.vision_encoder``, so the names match).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_prior.checkpoint import CheckpointError, checkpoint_dir, load_state, load_weights, save, unwrap
from megatron_prior.models.config import ModelConfig

PREFIX = "vision_model."


def vision_encoder_config(contents: str, **vit: Any) -> ModelConfig:
    """The ``model_config.json`` of an encoder-only checkpoint: an ``hlvlm`` config with the
    ViT's fields (``vit``: image and patch size, ``vit_*``, ``vision_model_type``, pixel mean and
    std) and placeholder language-model fields; ``extra["contents"]`` says what it holds."""
    return ModelConfig(arch="hlvlm", vocab_size=128, max_position_embeddings=None, seq_length=1, image_token_id=0,
                       extra={"contents": f"vision_model only ({contents}); the language model fields are "
                                          "placeholders"}, **vit)


def save_vision_encoder(save_dir: str | os.PathLike, iteration: int, model: torch.nn.Module, cfg: ModelConfig,
                        files: Optional[Mapping[str, str]] = None, extra_state: Optional[dict] = None) -> Path:
    """Save ``model``'s ``vision_model.*`` tensors as the model part of iteration ``iteration``
    of ``save_dir`` (what ``--vit-load`` reads), ``extra_state`` beside it under its own keys
    (readers of the encoder never ask for them). Collective; returns the directory."""
    return save(save_dir, iteration, {"model": encoder_state(unwrap(model)), **(extra_state or {})}, cfg, files)


def encoder_state(model: torch.nn.Module) -> dict:
    """The ``vision_model.*`` entries of the model's sharded state dict."""
    state = {k: v for k, v in model.sharded_state_dict().items() if k.startswith(PREFIX)}
    if not any(isinstance(v, ShardedTensor) for v in nested_values(state)):
        raise ValueError("the model's sharded state dict has no vision_model.* tensors")
    return state


def load_vision_encoder(model: torch.nn.Module, load_dir: str | os.PathLike) -> int:
    """Copy the vision encoder's weights from ``load_dir`` into ``model`` (an LLaVAModel
    chunk); returns the number of tensors loaded. Chunks without the encoder load nothing."""
    model = unwrap(model)
    if getattr(model, "vision_model", None) is None:
        return 0
    ckpt = checkpoint_dir(load_dir)
    state = load_state(ckpt, {"model": encoder_state(model)})["model"]
    _, unexpected = load_weights(model, state, ckpt, strict=False)
    loaded = [k for k in state if k not in unexpected]
    if unexpected:
        raise CheckpointError(f"{ckpt}: unexpected vision encoder keys {sorted(unexpected)[:5]}")
    return len(loaded)
