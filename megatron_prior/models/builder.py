"""Build this rank's part of a model from a ``ModelConfig``: GPT, H-LVLM or U-LVLM."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.transformer import TransformerConfig

from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import build_gpt, transformer_config
from megatron_prior.models.loss_head import install_loss_head


def language_config(cfg: ModelConfig, bf16: bool = False, **overrides) -> TransformerConfig:
    return transformer_config(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        ffn_hidden_size=cfg.ffn_hidden_size,
        bf16=bf16,
        normalization=cfg.normalization,
        **overrides,
    )


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
    with its language-model loss routed through megatron_prior.loss."""
    model = _build(cfg, bf16, use_te, vp_stage, config_overrides)
    if not hasattr(model, "model_type"):
        # megatron-core's schedules read it; the LVLMs are decoder-only on the pipeline too.
        model.model_type = ModelType.encoder_or_decoder
    language_model = model if cfg.arch == "gpt" else model.language_model
    if language_model is not None:
        install_loss_head(language_model, fused_linear_ce, check_loss_inputs)
    return model


def _build(cfg: ModelConfig, bf16: bool, use_te: bool, vp_stage: Optional[int],
           config_overrides: Optional[dict]) -> torch.nn.Module:
    config = language_config(cfg, bf16=bf16, **(config_overrides or {}))
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    if cfg.arch == "hlvlm":
        from megatron_prior.models.hlvlm import build_hlvlm

        return build_hlvlm(cfg, config, bf16=bf16, use_te=use_te, vp_stage=vp_stage, pre_process=pre,
                           post_process=post)
    gpt = build_gpt(
        config,
        cfg.vocab_size,
        cfg.max_position_embeddings,
        position_embedding_type=cfg.position_embedding_type,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        use_te=use_te,
        vp_stage=vp_stage,
        pre_process=pre,
        post_process=post,
    )
    if cfg.arch == "gpt":
        return gpt
    if cfg.arch == "ulvlm":
        from megatron_prior.models.ulvlm import ULVLM

        return ULVLM(cfg, gpt)
    raise ValueError(f"unknown architecture {cfg.arch!r}")
