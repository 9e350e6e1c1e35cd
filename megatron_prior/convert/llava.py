"""An H-LVLM checkpoint as a Hugging Face ``LlavaForConditionalGeneration`` directory, for the
evaluation suites people already run (lmms-eval, VLMEvalKit).

The H-LVLM is megatron-core's LLaVAModel: a CLIP ViT whose last layer's patch features (class
token dropped) go through a two-layer GELU MLP into a GPT, replacing one ``<image>`` token.
HF LLaVA computes the same with ``vision_feature_layer=-1`` and the ``default`` feature
selection (class token dropped); its processor writes ``image_seq_length`` copies of the image
token, one per patch, where this project writes one. The language model must be Llama-shaped
(``convert.llama``), and the CLIP tower's tensors map back as ``convert.clip`` reads them; HF's
CLIP also holds a post-LayerNorm that LLaVA never applies to its features, written as the
identity. The pixel normalisation the model was trained with goes into
``preprocessor_config.json`` (a ``CLIPImageProcessor``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

import torch
from transformers import CLIPImageProcessor, CLIPVisionConfig, LlavaConfig

from megatron_prior.checkpoint import checkpoint_dir, read_model_config
from megatron_prior.convert import clip, llama
from megatron_prior.convert.hf import QKV, ConversionError, split, write_hf_directory
from megatron_prior.models.pretrained import load_inference_model

log = logging.getLogger("megatron_prior.convert")

VISION, PROJECTOR, LANGUAGE = "model.vision_tower.", "model.multi_modal_projector.", "model.language_model."
LM = "language_model."


def convert_hlvlm_to_llava(load: str | os.PathLike, output: str | os.PathLike,
                           tokenizer_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the H-LVLM checkpoint in ``load`` as a LLaVA directory (world of one)."""
    ckpt = checkpoint_dir(load)
    cfg = read_model_config(ckpt)
    if cfg.vision_model_type != "clip":
        # HF LLaVA reads a SigLIP tower's hidden states without its post-LayerNorm, which
        # megatron-core's siglip encoder always applies: the export would compute other features.
        raise ConversionError(f"{ckpt}: an H-LVLM with a {cfg.vision_model_type} vision encoder; the LLaVA export "
                              "takes CLIP towers")
    dtype = llama.saved_dtype(ckpt, LM + "embedding.word_embeddings.weight")
    # The language model alone is a GPT: the same rules say whether HF Llama expresses it.
    text_config = llama.hf_config_from_gpt(dataclasses.replace(cfg, arch="gpt"), dtype, ckpt / "model_config.json")
    vision_config = CLIPVisionConfig(
        hidden_size=cfg.vit_hidden_size, intermediate_size=4 * cfg.vit_hidden_size,
        num_hidden_layers=cfg.vit_num_layers, num_attention_heads=cfg.vit_num_attention_heads,
        image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_act=cfg.vit_activation,
        layer_norm_eps=cfg.vit_norm_epsilon)
    config = LlavaConfig(
        vision_config=vision_config, text_config=text_config, image_token_index=cfg.image_token_id,
        image_seq_length=cfg.image_sequence_length, vision_feature_layer=-1,
        vision_feature_select_strategy="default", projector_hidden_act="gelu", multimodal_projector_bias=True,
        architectures=["LlavaForConditionalGeneration"], dtype=str(dtype).removeprefix("torch."))
    if cfg.image_token_id >= cfg.vocab_size:
        raise ConversionError(f"{ckpt}: image_token_id {cfg.image_token_id} outside the vocabulary {cfg.vocab_size}")
    model, _ = load_inference_model(load, params_dtype=dtype)
    params = model.state_dict()
    del model
    tensors = {}
    lm_params = {k[len(LM):]: v for k, v in params.items() if k.startswith(LM)}
    for name, tensor in llama.model_tensors(lm_params, cfg):
        tensors[LANGUAGE + name[len("model."):] if name.startswith("model.") else name] = tensor
    qkv = QKV.of(cfg.vit_hidden_size, cfg.vit_num_attention_heads, None)
    for name, hf_names in clip.tensor_map(cfg, VISION):
        value = params[name].reshape(-1) if name.endswith("class_token") else params[name]
        tensors.update(zip(hf_names, split(name, value, len(hf_names), qkv)))
    tensors[VISION + "post_layernorm.weight"] = torch.ones(cfg.vit_hidden_size, dtype=dtype)
    tensors[VISION + "post_layernorm.bias"] = torch.zeros(cfg.vit_hidden_size, dtype=dtype)
    for ours, theirs in (("linear_fc1", "linear_1"), ("linear_fc2", "linear_2")):
        for k in ("weight", "bias"):
            tensors[f"{PROJECTOR}{theirs}.{k}"] = params[f"vision_projection.encoder.{ours}.{k}"]
    log.info("%s -> %s (LlavaForConditionalGeneration: %d-layer CLIP tower, %s language model)", ckpt, output,
             cfg.vit_num_layers, text_config.architectures[0])
    processor = CLIPImageProcessor(size={"shortest_edge": cfg.image_size},
                                   crop_size={"height": cfg.image_size, "width": cfg.image_size},
                                   image_mean=list(cfg.image_mean), image_std=list(cfg.image_std))
    return write_hf_directory(output, config, tensors, tokenizer_dir, extra=[processor])
