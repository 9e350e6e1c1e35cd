"""A Hugging Face CLIP or SigLIP vision tower as the H-LVLM's vision encoder (``--vit-load``).

megatron-core's ``CLIPViTModel`` (what ``LLaVAModel`` builds for the H-LVLM) has a subtype for each:

- ``clip``: OpenAI CLIP's vision transformer: a bias-free patch convolution, a class token,
  learned positions, the pre-LayerNorm (``ln_pre``), pre-norm layers with biased q/k/v, output
  and MLP projections, and (with ``vit_activation="quick_gelu"``) CLIP's quick GELU. Its output
  is the last layer's hidden states without the post-LayerNorm: HF's ``last_hidden_state``, and
  with ``vision_feature_layer=-2`` (all layers but the last) ``hidden_states[-2]``, the features
  LLaVA-1.5 reads.
- ``siglip``: no class token, a patch convolution with bias, learned positions, no ``ln_pre``,
  the same layers with GELU's tanh approximation (HF's ``gelu_pytorch_tanh``), and the
  post-LayerNorm, which megatron-core always applies after its last layer. So the features are
  HF's ``last_hidden_state`` (``post_layernorm(hidden_states[-1])``), and with
  ``vision_feature_layer=-k`` ``post_layernorm(hidden_states[-k])``: the ``last_hidden_state``
  of the tower cut after that layer. HF LLaVA's own reading of a SigLIP tower,
  ``hidden_states[k]`` without the post-LayerNorm, is not what this encoder computes. SigLIP's
  attention-pooling head gives one vector per image, not LLaVA-style patch features: it is
  left out.

The checkpoint holds only the ``vision_model.*`` tensors of an H-LVLM, keyed as the H-LVLM keys
them, so ``--vit-load`` reads it at any tensor-parallel size. Its ``model_config.json`` is an
``hlvlm`` config whose ViT fields, ``image_size`` and ``patch_size`` describe the tower; the
language model fields are placeholders (``extra["contents"]`` says so). It records the tower's
pixel mean and std (OpenAI CLIP's, or SigLIP's 0.5 and 0.5), which the trainer then applies to
every image (the tower was trained on them).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from transformers import PretrainedConfig
from transformers.image_utils import IMAGENET_STANDARD_MEAN, IMAGENET_STANDARD_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

from megatron_prior.convert.hf import QKV, ConversionError, SafetensorsFiles, TensorMap, check_names, write_checkpoint
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.vision_encoder import PREFIX, vision_encoder_config

log = logging.getLogger("megatron_prior.convert")


@dataclass(frozen=True)
class Tower:
    """What tells a CLIP tower from a SigLIP one: their model types (the full model's first),
    megatron-core's subtype, HF's activations, the pixel normalisation their image processors
    apply, and the embedding tensors (megatron-core name, HF name under the tower's prefix)."""

    name: str
    model_types: tuple[str, str]
    vision_model_type: str
    activations: dict[str, str]  # HF's hidden_act -> ModelConfig.vit_activation
    mean: tuple[float, ...]
    std: tuple[float, ...]
    embeddings: tuple[tuple[str, str], ...]


CLIP = Tower("CLIP", ("clip", "clip_vision_model"), "clip", {"quick_gelu": "quick_gelu", "gelu": "gelu"},
             tuple(OPENAI_CLIP_MEAN), tuple(OPENAI_CLIP_STD),
             (("conv1.weight", "embeddings.patch_embedding.weight"), ("class_token", "embeddings.class_embedding"),
              ("position_embeddings.weight", "embeddings.position_embedding.weight"),
              ("ln_pre.weight", "pre_layrnorm.weight"), ("ln_pre.bias", "pre_layrnorm.bias")))
SIGLIP = Tower("SigLIP", ("siglip", "siglip_vision_model"), "siglip",
               {"gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"},
               tuple(IMAGENET_STANDARD_MEAN), tuple(IMAGENET_STANDARD_STD),
               (("conv1.weight", "embeddings.patch_embedding.weight"),
                ("conv1.bias", "embeddings.patch_embedding.bias"),
                ("position_embeddings.weight", "embeddings.position_embedding.weight"),
                ("ln_post.weight", "post_layernorm.weight"), ("ln_post.bias", "post_layernorm.bias")))
TOWERS = {model_type: tower for tower in (CLIP, SIGLIP) for model_type in tower.model_types}
TOWER_TYPES = tuple(TOWERS)


def vision_config_of(hf: PretrainedConfig) -> PretrainedConfig:
    """The vision tower's config of a full (CLIPModel, SiglipModel) or vision-only model config."""
    return hf.vision_config if hf.model_type == TOWERS[hf.model_type].model_types[0] else hf


def vit_config_from_hf(hf: PretrainedConfig, where: Path, vision_feature_layer: int = -1) -> ModelConfig:
    """The ``hlvlm`` ModelConfig whose vision encoder is this tower (its first layers up to
    ``vision_feature_layer``, HF LLaVA's convention: -1 all, -2 all but the last)."""
    tower, vc = TOWERS[hf.model_type], vision_config_of(hf)
    layers = vc.num_hidden_layers + 1 + vision_feature_layer
    problems = []
    if vc.hidden_act not in tower.activations:
        problems.append(f"hidden_act {vc.hidden_act!r} ({' or '.join(tower.activations)})")
    if vc.intermediate_size != 4 * vc.hidden_size:
        problems.append(f"intermediate_size {vc.intermediate_size} (the ViT's MLP is 4 x hidden_size "
                        f"= {4 * vc.hidden_size})")
    if getattr(vc, "num_channels", 3) != 3:
        problems.append(f"num_channels {vc.num_channels} (RGB images)")
    if not 1 <= layers <= vc.num_hidden_layers:
        problems.append(f"--vision-feature-layer {vision_feature_layer} of {vc.num_hidden_layers} layers")
    if problems:
        raise ConversionError(f"{where}: cannot convert the {tower.name} vision tower: " + "; ".join(problems))
    return vision_encoder_config(
        f"a converted {tower.name} tower",
        image_size=vc.image_size, patch_size=vc.patch_size, vision_model_type=tower.vision_model_type,
        vit_num_layers=layers, vit_hidden_size=vc.hidden_size, vit_num_attention_heads=vc.num_attention_heads,
        vit_activation=tower.activations[vc.hidden_act], vit_norm_epsilon=vc.layer_norm_eps,
        image_mean=list(tower.mean), image_std=list(tower.std))


def tensor_map(cfg: ModelConfig, source_prefix: str) -> TensorMap:
    m, h = PREFIX, source_prefix
    tower = TOWERS[cfg.vision_model_type]
    out = [(m + ours, (h + theirs,)) for ours, theirs in tower.embeddings]
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


def convert_tower_to_megatron(path: Path, hf: PretrainedConfig, output: str | os.PathLike,
                              dtype: Optional[torch.dtype] = None, vision_feature_layer: int = -1) -> ModelConfig:
    """Write the CLIP or SigLIP vision tower in ``path`` as a checkpoint ``--vit-load`` reads (world of one)."""
    cfg = vit_config_from_hf(hf, path / "config.json", vision_feature_layer)
    files = SafetensorsFiles(path)
    # A full model (and transformers 4's vision-only one) keys the tower under vision_model.
    source = PREFIX if PREFIX + "embeddings.position_embedding.weight" in files.where else ""
    mapping = tensor_map(cfg, source)
    kept = tuple(f"{source}encoder.layers.{i}." for i in range(cfg.vit_num_layers))

    def ignored(name: str) -> bool:
        # The text tower, projections, CLIP's post-LayerNorm, SigLIP's pooling head, the layers
        # past the feature layer and the position_ids buffer older files saved: none is part of
        # the encoder.
        return (not name.startswith((source + "embeddings.", source + "encoder.")) or name.endswith("position_ids")
                or (name.startswith(source + "encoder.") and not name.startswith(kept)))

    tower = TOWERS[cfg.vision_model_type]
    check_names(mapping, files, path, ignored, f"{cfg.vit_num_layers} layers of a {tower.name} vision tower")
    dtype = dtype or files.dtype(source + "embeddings.patch_embedding.weight")
    log.info("%s: %s vision tower, %d of %d layers, hidden %d, %d heads, %dpx images in %dpx patches, %s -> %s",
             path, tower.name, cfg.vit_num_layers, vision_config_of(hf).num_hidden_layers, cfg.vit_hidden_size,
             cfg.vit_num_attention_heads, cfg.image_size, cfg.patch_size, dtype, output)
    qkv = QKV.of(cfg.vit_hidden_size, cfg.vit_num_attention_heads, None)
    write_checkpoint(output, cfg, files, mapping, qkv, dtype,
                     dict(hf_dir=str(path.resolve()), model_type=hf.model_type,
                          vision_feature_layer=vision_feature_layer), prefix=PREFIX)
    return cfg
