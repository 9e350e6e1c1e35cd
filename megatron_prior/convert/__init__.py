"""Hugging Face models in and out: Llama-family causal LMs to and from this project's GPT
checkpoints (``llama``), CLIP vision towers into the H-LVLM's vision encoder (``clip``), and what
they share (``hf``). Above ``models`` and ``checkpoint``; only the tools import it."""

from __future__ import annotations

import os
from typing import Optional

import torch

from megatron_prior.convert.clip import CLIP_TYPES, convert_clip_to_megatron
from megatron_prior.convert.hf import ConversionError, hf_directory, read_hf_config
from megatron_prior.convert.llama import FAMILIES, convert_llama_to_megatron, convert_megatron_to_hf
from megatron_prior.models.config import ModelConfig

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]


def convert_hf_to_megatron(hf_dir: str | os.PathLike, output: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                           vision_feature_layer: int = -1) -> ModelConfig:
    """The model in the local directory ``hf_dir`` as a checkpoint in ``output``: a GPT for a
    Llama-family causal LM, an H-LVLM vision encoder for a CLIP (vision) model. Needs a world
    of one (``megatron_prior.parallel.initialize``)."""
    path = hf_directory(hf_dir)
    hf = read_hf_config(path)
    if hf.model_type in CLIP_TYPES:
        return convert_clip_to_megatron(path, hf, output, dtype, vision_feature_layer)
    if hf.model_type not in FAMILIES:
        raise ConversionError(f"{path / 'config.json'}: model_type {hf.model_type!r} is neither a Llama-family "
                              f"causal LM ({', '.join(FAMILIES)}) nor a CLIP model ({', '.join(CLIP_TYPES)})")
    return convert_llama_to_megatron(path, hf, output, dtype)
