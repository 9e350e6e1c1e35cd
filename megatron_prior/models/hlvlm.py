"""H-LVLM: megatron-core's LLaVAModel (CLIP-style ViT + MLP projector + GPT), and the ``hlvlm``
architecture. The ViT is megatron-core's CLIPViTModel of ``ModelConfig.vision_model_type``:
OpenAI CLIP's layout or SigLIP's.

The text enters with the tokenizer's ``<image>`` id at position 0; LLaVAModel replaces it
by the ViT's patch embeddings (CLIP's class token dropped; SigLIP has none), so the language model sees
``image_sequence_length - 1 + text_length`` positions. The vision encoder sits on the first
pipeline stage, as in Megatron-LM's pretrain_vlm.

``HLVLM`` is LLaVAModel called the way every vision-language model here is called (as
``ULVLM`` calls its GPTModel): ``model(images, tokens, position_ids, attention_mask,
labels=...)`` returns the per-token loss alone. It subclasses LLaVAModel rather than holding
one, so parameter names, checkpoints and the layout-independent initialisation (seeded by
those names) stay LLaVAModel's.
"""

from __future__ import annotations

import argparse
from typing import Optional

import torch
from megatron.core.models.multimodal import llava_model
from megatron.core.models.multimodal.llava_model import LLaVAModel
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer import TransformerConfig
from megatron.core.activations import fast_gelu, quick_gelu
from megatron.core.transformer.mlp import MLPSubmodules

from megatron_prior.models.arch import Arch, BuildContext, register
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import layer_spec, rotary_kwargs, transformer_config


# The ViT's MLP activation by ModelConfig.vit_activation (gelu_tanh: GELU's tanh approximation,
# HF's gelu_pytorch_tanh, SigLIP's).
VIT_ACTIVATIONS = {"gelu": torch.nn.functional.gelu, "quick_gelu": quick_gelu, "gelu_tanh": fast_gelu}
VISION_MODEL_TYPES = ("clip", "siglip")


class HLVLM(LLaVAModel):
    def forward(
        self,
        images: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Per-token loss ``[b, s_combined]`` when labels are given, else logits.

        LLaVAModel also builds a combined loss mask from a text one, which nothing reads: the
        loss masks the combined sequence itself (``megatron_prior.models.layout``, keeping the
        first caption token that LLaVA's mask drops with the image), so any text mask of the
        labels' shape serves."""
        loss_mask = None if labels is None else torch.ones_like(labels, dtype=torch.float32)
        output, _ = super().forward(images, input_ids, position_ids, attention_mask, labels=labels,
                                    loss_mask=loss_mask, packed_seq_params=packed_seq_params)
        return output


def vision_config(cfg: ModelConfig, bf16: bool = False) -> TransformerConfig:
    """The ViT's TransformerConfig: what LLaVAModel builds its CLIPViTModel from."""
    config = transformer_config(num_layers=cfg.vit_num_layers, hidden_size=cfg.vit_hidden_size,
                                num_attention_heads=cfg.vit_num_attention_heads, bf16=bf16, pipelined=False,
                                activation_func=VIT_ACTIVATIONS[cfg.vit_activation],
                                layernorm_epsilon=cfg.vit_norm_epsilon)
    # Megatron-LM's training arguments put this on the config; LLaVAModel reads it.
    config.vision_model_type = cfg.vision_model_type
    return config


def has_class_token(cfg: ModelConfig) -> bool:
    return cfg.vision_model_type == "clip"  # SigLIP has none


def vision_encoder(cfg: ModelConfig, bf16: bool = False) -> CLIPViTModel:
    """The H-LVLM's vision encoder alone, built as LLaVAModel builds it (same config, layer
    spec, class token and image geometry), so its parameters and their names under
    ``vision_model.`` are the H-LVLM's: a model holding it as ``vision_model`` saves a
    checkpoint ``--vit-load`` reads (the contrastive pre-training does)."""
    cls = has_class_token(cfg)
    # The class LLaVAModel instantiates, looked up when called: without Transformer Engine,
    # compat.no_te replaces it there by one whose LayerNorms build.
    return llava_model.CLIPViTModel(vision_config(cfg, bf16), get_vit_layer_with_local_spec(), add_class_token=cls,
                        class_token_len=int(cls), patch_dim=cfg.patch_size, img_h=cfg.image_size,
                        img_w=cfg.image_size, model_subtype=cfg.vision_model_type)


def build(cfg: ModelConfig, language_config: TransformerConfig, ctx: BuildContext) -> HLVLM:
    if ctx.vp_stage is not None:
        raise ValueError("H-LVLM (LLaVAModel) does not support virtual pipeline stages")
    # An MLP has no heads; the language model's count satisfies the TP divisibility check.
    projector_config = transformer_config(num_layers=1, hidden_size=cfg.hidden_size, ffn_hidden_size=cfg.hidden_size,
                                          num_attention_heads=cfg.num_attention_heads, bf16=ctx.bf16,
                                          pipelined=False)
    return HLVLM(
        language_transformer_config=language_config,
        language_transformer_layer_spec=layer_spec(language_config, ctx.use_te),
        language_vocab_size=cfg.vocab_size,
        language_max_sequence_length=cfg.max_position_embeddings,
        vision_transformer_config=vision_config(cfg, ctx.bf16),
        vision_transformer_layer_spec=get_vit_layer_with_local_spec(),
        drop_vision_class_token=has_class_token(cfg),
        vision_projection_config=projector_config,
        vision_projection_layer_spec=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.share_embeddings_and_output_weights,
        language_position_embedding_type=cfg.position_embedding_type,
        **{f"language_{k}": v for k, v in rotary_kwargs(cfg).items()},
        pre_process=ctx.pre_process,
        post_process=ctx.post_process,
        add_encoder=ctx.pre_process,
        add_decoder=True,
        img_h=cfg.image_size,
        img_w=cfg.image_size,
        patch_dim=cfg.patch_size,
        image_token_index=cfg.image_token_id,
    )


def forward_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    return model(batch["images"], batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
                 labels=batch["labels"], packed_seq_params=batch.get("packed_seq_params"))


def validate_config(cfg: ModelConfig) -> list[str]:
    problems = []
    if cfg.image_size % cfg.patch_size:
        problems.append(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.image_token_id is None:
        problems.append(f"arch {cfg.arch} needs image_token_id (the tokenizer's <image> id)")
    if cfg.vision_model_type not in VISION_MODEL_TYPES:
        problems.append(f"vision_model_type {cfg.vision_model_type!r} is not one of {list(VISION_MODEL_TYPES)}")
    if cfg.vit_activation not in VIT_ACTIVATIONS:
        problems.append(f"vit_activation {cfg.vit_activation!r} is not one of {sorted(VIT_ACTIVATIONS)}")
    if cfg.vit_hidden_size % cfg.vit_num_attention_heads:
        problems.append("vit_hidden_size is not divisible by vit_num_attention_heads")
    return problems


def image_sequence_length(cfg: ModelConfig) -> int:
    return cfg.patches_per_side ** 2  # the ViT's patch tokens (CLIP's class token dropped)


def check_args(args: argparse.Namespace) -> Optional[str]:
    tp = args.tensor_model_parallel_size
    if args.vit_num_attention_heads % tp:
        return (f"--vit-num-attention-heads {args.vit_num_attention_heads} is not divisible by "
                f"--tensor-model-parallel-size {tp}")
    return None


ARCH = register(Arch(
    name="hlvlm",
    display_name="H-LVLM",
    description="LLaVA-style vision-language model: ViT + MLP projector + GPT (megatron-core LLaVAModel)",
    needs_images=True,
    build=build,
    forward_loss=forward_loss,
    validate_config=validate_config,
    image_sequence_length=image_sequence_length,
    only_flags=("vit_load", "freeze_vit", "freeze_lm"),
    cuts_at_max_position_embeddings=True,
    check_args=check_args,
))
