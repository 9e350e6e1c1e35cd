"""The text model every architecture shares: megatron-core GPTModel, built for this rank, and
the ``gpt`` architecture (the text-only reference LM).

``transformer_config`` turns sizes and precision into a megatron-core TransformerConfig with
the CPU-safe choices made in one place (no fused kernels without CUDA, CPU initialisation, fp32
on CPU unless bf16 is asked for); every transformer of every architecture (language model,
ViT, projector) gets its config from it. ``build_gpt`` picks the layer spec (Transformer
Engine's when present and wanted, megatron-core's local one otherwise) and builds the pipeline
stage this rank owns.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_prior.models.arch import Arch, BuildContext, register
from megatron_prior.models.config import ModelConfig


def transformer_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: Optional[int] = None,
    bf16: bool = False,
    hidden_dropout: float = 0.0,
    attention_dropout: float = 0.0,
    pipelined: bool = True,
    **overrides,
) -> TransformerConfig:
    """A TransformerConfig for this rank's parallel layout (read from parallel_state).

    ``pipelined=False`` for a module that lives whole on the first pipeline stage (the
    H-LVLM's ViT and projector): no pipeline split of its layers."""
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size or 4 * hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size() if pipelined else 1,
        virtual_pipeline_model_parallel_size=(
            parallel_state.get_virtual_pipeline_model_parallel_world_size() if pipelined else None),
        hidden_dropout=hidden_dropout,
        attention_dropout=attention_dropout,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_cpu_initialization=not on_gpu,
        # The fused kernels need CUDA (and apex/TE for some); the unfused paths are exact.
        gradient_accumulation_fusion=False,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        calculate_per_token_loss=True,
    )
    kwargs.update(overrides)
    if "bias_activation_fusion" not in kwargs:
        # megatron-core fuses bias + GELU only with a bias, and quick GELU only gated.
        gated = kwargs.get("gated_linear_unit", False)
        activation = kwargs.get("activation_func", torch.nn.functional.gelu)
        kwargs["bias_activation_fusion"] = on_gpu and (
            gated if activation is not torch.nn.functional.gelu else kwargs.get("add_bias_linear", True))
    return TransformerConfig(**kwargs)


def layer_spec(config: TransformerConfig, use_te: bool = False) -> ModuleSpec:
    """Transformer Engine's layer spec when asked for (FP8 needs it), else megatron-core's local one."""
    if use_te:
        try:
            import transformer_engine  # noqa: F401  (optional dependency: only FP8 runs need it)
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
    **rotary,
) -> GPTModel:
    """The GPTModel stage this rank owns (by default the stage ``BuildContext.for_this_rank`` says);
    ``rotary`` are GPTModel's rotary settings (``rotary_kwargs``)."""
    if pre_process is None or post_process is None:
        ctx = BuildContext.for_this_rank(vp_stage)
        pre_process = ctx.pre_process if pre_process is None else pre_process
        post_process = ctx.post_process if post_process is None else post_process
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
        **rotary,
    )


def rotary_kwargs(cfg: ModelConfig) -> dict:
    """The rotary embedding's settings, as GPTModel takes them (LLaVAModel prefixes ``language_``)."""
    return dict(rotary_base=cfg.rotary_base, rope_scaling=cfg.rope_scaling,
                rope_scaling_factor=cfg.rope_scaling_factor)


def language_model(cfg: ModelConfig, config: TransformerConfig, ctx: BuildContext) -> GPTModel:
    """The GPTModel a ``ModelConfig`` describes, for the stage ``ctx`` names."""
    return build_gpt(config, cfg.vocab_size, cfg.max_position_embeddings,
                     position_embedding_type=cfg.position_embedding_type,
                     share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
                     use_te=ctx.use_te, vp_stage=ctx.vp_stage, pre_process=ctx.pre_process,
                     post_process=ctx.post_process, **rotary_kwargs(cfg))


def forward_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                 packed_seq_params=batch.get("packed_seq_params"))


ARCH = register(Arch(
    name="gpt",
    display_name="GPT",
    description="text-only language model (megatron-core GPTModel): the PRIOR reference LM",
    needs_images=False,
    build=language_model,
    forward_loss=forward_loss,
    supports_virtual_pipeline=True,
    supports_sequence_parallel=True,
))
