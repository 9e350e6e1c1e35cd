"""Build this rank's part of a model from a ``ModelConfig``, whatever its architecture."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel

from megatron_prior.models.arch import BuildContext, get_arch
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import transformer_config
from megatron_prior.models.loss_head import install_loss_head


def build_model(
    cfg: ModelConfig,
    bf16: bool = False,
    use_te: bool = False,
    vp_stage: Optional[int] = None,
    config_overrides: Optional[dict] = None,
    fused_linear_ce: bool = False,
    check_loss_inputs: bool = False,
) -> torch.nn.Module:
    """The model chunk this rank owns (pipeline stage / virtual stage from parallel_state),
    with its language model's loss routed through megatron_prior.loss.

    ``config_overrides`` go into the language model's TransformerConfig (dropout, init std,
    FP8, p2p overlap)."""
    arch = get_arch(cfg.arch)
    language_config = transformer_config(bf16=bf16, **cfg.language_config_kwargs(), **(config_overrides or {}))
    model = arch.build(cfg, language_config, BuildContext.for_this_rank(vp_stage, use_te=use_te, bf16=bf16))
    if not hasattr(model, "model_type"):
        # megatron-core's schedules read it; the LVLMs are decoder-only on the pipeline too.
        model.model_type = ModelType.encoder_or_decoder
    for module in model.modules():
        # The language model of every architecture is a GPTModel (its only one).
        if isinstance(module, GPTModel):
            install_loss_head(module, fused_linear_ce, check_loss_inputs)
    return model
