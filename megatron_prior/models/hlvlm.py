"""H-LVLM: megatron-core's LLaVAModel (CLIP-style ViT + MLP projector + GPT).

The text enters with the tokenizer's ``<image>`` id at position 0; LLaVAModel replaces it
by the ViT's patch embeddings (class token dropped), so the language model sees
``image_sequence_length - 1 + text_length`` positions. The vision encoder sits on the first
pipeline stage, as in Megatron-LM's pretrain_vlm.
"""

from __future__ import annotations

from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.mlp import MLPSubmodules

from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import layer_spec, transformer_config


def vision_config(cfg: ModelConfig, bf16: bool = False) -> TransformerConfig:
    config = transformer_config(
        num_layers=cfg.vit_num_layers,
        hidden_size=cfg.vit_hidden_size,
        num_attention_heads=cfg.vit_num_attention_heads,
        bf16=bf16,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
    )
    # Megatron-LM's training arguments put this on the config; LLaVAModel reads it.
    config.vision_model_type = "clip"
    return config


def projector_config(cfg: ModelConfig, bf16: bool = False) -> TransformerConfig:
    return transformer_config(
        num_layers=1,
        hidden_size=cfg.hidden_size,
        ffn_hidden_size=cfg.hidden_size,
        # An MLP has no heads; the language model's count satisfies the TP divisibility check.
        num_attention_heads=cfg.num_attention_heads,
        bf16=bf16,
        pipeline_model_parallel_size=1,
        virtual_pipeline_model_parallel_size=None,
    )


def vit_layer_spec():
    spec = get_vit_layer_with_local_spec()
    # megatron-core 0.16's local ViT spec is causal; a ViT attends to every patch.
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def build_hlvlm(
    cfg: ModelConfig,
    language_config: TransformerConfig,
    bf16: bool = False,
    use_te: bool = False,
    vp_stage: Optional[int] = None,
    pre_process: bool = True,
    post_process: bool = True,
) -> LLaVAModel:
    if vp_stage is not None:
        raise ValueError("H-LVLM (LLaVAModel) does not support virtual pipeline stages")
    return LLaVAModel(
        language_transformer_config=language_config,
        language_transformer_layer_spec=layer_spec(language_config, use_te),
        language_vocab_size=cfg.vocab_size,
        language_max_sequence_length=cfg.max_position_embeddings,
        vision_transformer_config=vision_config(cfg, bf16),
        vision_transformer_layer_spec=vit_layer_spec(),
        drop_vision_class_token=True,
        vision_projection_config=projector_config(cfg, bf16),
        vision_projection_layer_spec=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        language_position_embedding_type=cfg.position_embedding_type,
        pre_process=pre_process,
        post_process=post_process,
        add_encoder=pre_process,
        add_decoder=True,
        img_h=cfg.image_size,
        img_w=cfg.image_size,
        patch_dim=cfg.patch_size,
        image_token_index=cfg.image_token_id,
    )
