"""The text model every architecture shares: megatron-core GPTModel, built for this rank.

``transformer_config`` turns sizes and precision into one megatron-core TransformerConfig
with the CPU-safe choices made in one place (no fused kernels without CUDA, CPU
initialisation, fp32 on CPU unless bf16 is asked for). ``build_gpt`` picks the layer spec
(Transformer Engine's when present and wanted, megatron-core's local one otherwise) and
builds the pipeline stage this rank owns.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec


def transformer_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: Optional[int] = None,
    bf16: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    **overrides,
) -> TransformerConfig:
    """A TransformerConfig for this rank's parallel layout (read from parallel_state)."""
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        virtual_pipeline_model_parallel_size=parallel_state.get_virtual_pipeline_model_parallel_world_size(),
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        # The fused kernels need CUDA (and apex/TE for some); the unfused paths are exact.
        gradient_accumulation_fusion=False,
        bias_activation_fusion=on_gpu,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def layer_spec(config: TransformerConfig, use_te: bool = False) -> ModuleSpec:
    """Transformer Engine's layer spec when asked for (FP8 needs it), else megatron-core's local one."""
    if use_te:
        try:
            from megatron.core.models.gpt.gpt_layer_specs import (
                get_gpt_layer_with_transformer_engine_spec,
            )
            import transformer_engine  # noqa: F401
        except ImportError as err:
            raise RuntimeError(
                "Transformer Engine's layer spec was requested (FP8 needs it) but "
                f"transformer_engine does not import here: {err}"
            ) from err
        return get_gpt_layer_with_transformer_engine_spec()
    return get_gpt_layer_local_spec(normalization=config.normalization)


def build_gpt(
    config: TransformerConfig,
    vocab_size: int,
    max_sequence_length: int,
    position_embedding_type: str = "learned_absolute",
    share_embeddings_and_output_weights: bool = True,
    use_te: bool = False,
    vp_stage: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
) -> GPTModel:
    """The GPTModel stage this rank owns (first/last stage decided by parallel_state)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, use_te),
        vocab_size=vocab_size,
        max_sequence_length=max_sequence_length,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=share_embeddings_and_output_weights,
        position_embedding_type=position_embedding_type,
        vp_stage=vp_stage,
    )
