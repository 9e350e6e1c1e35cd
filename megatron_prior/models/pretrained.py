"""A trained model back from its checkpoint, for scoring and evaluation: the saved
architecture (``model_config.json``) built for the current parallel layout, its weights read
by ``megatron_prior.checkpoint``'s safe loader."""

from __future__ import annotations

import os
from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_prior.checkpoint import checkpoint_dir, load_state, model_state, read_model_config, restore_model
from megatron_prior.models.builder import build_model
from megatron_prior.models.config import ModelConfig


def load_inference_model(load_dir: str | os.PathLike, iteration: Optional[int] = None, bf16: bool = False,
                         params_dtype: Optional[torch.dtype] = None) -> tuple[torch.nn.Module, ModelConfig]:
    """Build the saved architecture for the current parallel layout and load its weights
    (in ``params_dtype`` when given, e.g. the checkpoint's own for an exact export).

    Returns ``(model, model_config)`` with the model in eval mode. Pipeline parallelism is
    not supported here (scoring runs the whole model per rank).
    """
    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("load_inference_model needs pipeline parallel size 1")
    ckpt = checkpoint_dir(load_dir, iteration)
    model_config = read_model_config(ckpt)
    # Not initialised: the strict load below overwrites every parameter.
    overrides = dict(perform_initialization=False, **({"params_dtype": params_dtype} if params_dtype else {}))
    model = build_model(model_config, bf16=bf16 or params_dtype == torch.bfloat16, config_overrides=overrides)
    restore_model([model], load_state(ckpt, model_state([model])), ckpt)
    model.eval()
    return model, model_config
