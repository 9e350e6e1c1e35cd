"""A Hugging Face CLIP vision tower as the H-LVLM's vision encoder (``--vit-load``).

megatron-core's ``CLIPViTModel`` (``vision_model_type="clip"``, what ``LLaVAModel`` builds for
the H-LVLM) is OpenAI CLIP's vision transformer: a bias-free patch convolution, a class token,
learned positions, the pre-LayerNorm (``ln_pre``), pre-norm layers with biased q/k/v, output
and MLP projections, and (with ``vit_activation="quick_gelu"``) CLIP's quick GELU. Its output is
the last layer's hidden states without the post-LayerNorm, HF's ``last_hidden_state``;
``vision_feature_layer=-2`` keeps all layers but the last, the features LLaVA-1.5 reads.

The checkpoint holds only the ``vision_model.*`` tensors of an H-LVLM, keyed as the H-LVLM keys
them, so ``--vit-load`` reads it at any tensor-parallel size. Its ``model_config.json`` is an
``hlvlm`` config whose ViT fields, ``image_size`` and ``patch_size`` describe the tower; the
language model fields are placeholders (``extra["contents"]`` says so). It records OpenAI CLIP's
pixel mean and std, which the trainer then applies to every image (the tower was trained on them).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import PretrainedConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from megatron_prior.convert.hf import QKV, ConversionError, SafetensorsFiles, TensorMap, check_names, write_checkpoint
from megatron_prior.models.config import ModelConfig

log = logging.getLogger("megatron_prior.convert")

CLIP_TYPES = ("clip", "clip_vision_model")
PREFIX = "vision_model."
ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}  # HF's hidden_act -> ModelConfig.vit_activation


def vision_config_of(hf: PretrainedConfig) -> PretrainedConfig:
    """The vision tower's config of a CLIPModel or CLIPVisionModel config."""
    return hf.vision_config if hf.model_type == "clip" else hf


def vit_config_from_hf(hf: PretrainedConfig, where: Path, vision_feature_layer: int = -1) -> ModelConfig:
    """The ``hlvlm`` ModelConfig whose vision encoder is this CLIP tower (its first layers up to
    ``vision_feature_layer``, HF LLaVA's convention: -1 all, -2 all but the last)."""
    vc = vision_config_of(hf)
    layers = vc.num_hidden_layers + 1 + vision_feature_layer
    problems = []
    if vc.hidden_act not in ACTIVATIONS:
        problems.append(f"hidden_act {vc.hidden_act!r} (quick_gelu or gelu)")
    if vc.intermediate_size != 4 * vc.hidden_size:
        problems.append(f"intermediate_size {vc.intermediate_size} (the ViT's MLP is 4 x hidden_size "
                        f"= {4 * vc.hidden_size})")
    if vc.layer_norm_eps != 1e-5:
        problems.append(f"layer_norm_eps {vc.layer_norm_eps} (the ViT's LayerNorm takes 1e-5)")
    if getattr(vc, "num_channels", 3) != 3:
        problems.append(f"num_channels {vc.num_channels} (RGB images)")
    if not 1 <= layers <= vc.num_hidden_layers:
        problems.append(f"--vision-feature-layer {vision_feature_layer} of {vc.num_hidden_layers} layers")
    if problems:
        raise ConversionError(f"{where}: cannot convert the CLIP vision tower: " + "; ".join(problems))
    return ModelConfig(
        arch="hlvlm", vocab_size=128, max_position_embeddings=None, seq_length=1, image_token_id=0,
        image_size=vc.image_size, patch_size=vc.patch_size, vit_num_layers=layers, vit_hidden_size=vc.hidden_size,
        vit_num_attention_heads=vc.num_attention_heads, vit_activation=ACTIVATIONS[vc.hidden_act],
        image_mean=list(OPENAI_CLIP_MEAN), image_std=list(OPENAI_CLIP_STD),
        extra={"contents": "vision_model only (a converted CLIP tower); the language model fields are placeholders"})


def tensor_map(cfg: ModelConfig, source_prefix: str) -> TensorMap:
    m, h = PREFIX, source_prefix
    out = [(m + "conv1.weight", (h + "embeddings.patch_embedding.weight",)),
           (m + "class_token", (h + "embeddings.class_embedding",)),
           (m + "position_embeddings.weight", (h + "embeddings.position_embedding.weight",))]
    out += [(m + f"ln_pre.{k}", (h + f"pre_layrnorm.{k}",)) for k in ("weight", "bias")]
    for i in range(cfg.vit_num_layers):
        ml, hl = f"{m}decoder.layers.{i}.", f"{h}encoder.layers.{i}."
        for k in ("weight", "bias"):
            out += [(ml + f"input_layernorm.{k}", (hl + f"layer_norm1.{k}",)),
                    (ml + f"self_attention.linear_qkv.{k}", tuple(hl + f"self_attn.{x}_proj.{k}" for x in "qkv")),
                    (ml + f"self_attention.linear_proj.{k}", (hl + f"self_attn.out_proj.{k}",)),
                    (ml + f"pre_mlp_layernorm.{k}", (hl + f"layer_norm2.{k}",)),
                    (ml + f"mlp.linear_fc1.{k}", (hl + f"mlp.fc1.{k}",)),
                    (ml + f"mlp.linear_fc2.{k}", (hl + f"mlp.fc2.{k}",))]
    return out


def convert_clip_to_megatron(path: Path, hf: PretrainedConfig, output: str | os.PathLike,
                             dtype: Optional[torch.dtype] = None, vision_feature_layer: int = -1) -> ModelConfig:
    """Write the CLIP vision tower in ``path`` as a checkpoint ``--vit-load`` reads (world of one)."""
    cfg = vit_config_from_hf(hf, path / "config.json", vision_feature_layer)
    files = SafetensorsFiles(path)
    # A CLIPModel (and transformers 4's CLIPVisionModel) keys the tower under vision_model.
    source = PREFIX if PREFIX + "embeddings.class_embedding" in files.where else ""
    mapping = tensor_map(cfg, source)
    kept = tuple(f"{source}encoder.layers.{i}." for i in range(cfg.vit_num_layers))
    embeddings_and_layers = (source + "embeddings.", source + "pre_layrnorm.", source + "encoder.")

    def ignored(name: str) -> bool:
        # The text tower, projections, post-LayerNorm, the layers past the feature layer and
        # the position_ids buffer older files saved: none is part of the encoder.
        return (not name.startswith(embeddings_and_layers) or name.endswith("position_ids")
                or (name.startswith(source + "encoder.") and not name.startswith(kept)))

    check_names(mapping, files, path, ignored, f"{cfg.vit_num_layers} layers of a CLIP vision tower")
    dtype = dtype or files.dtype(source + "embeddings.patch_embedding.weight")
    log.info("%s: CLIP vision tower, %d of %d layers, hidden %d, %d heads, %dpx images in %dpx patches, %s -> %s",
             path, cfg.vit_num_layers, vision_config_of(hf).num_hidden_layers, cfg.vit_hidden_size,
             cfg.vit_num_attention_heads, cfg.image_size, cfg.patch_size, dtype, output)
    qkv = QKV.of(cfg.vit_hidden_size, cfg.vit_num_attention_heads, None)
    write_checkpoint(output, cfg, files, mapping, qkv, dtype,
                     dict(hf_dir=str(path.resolve()), model_type=hf.model_type,
                          vision_feature_layer=vision_feature_layer), prefix=PREFIX)
    return cfg
