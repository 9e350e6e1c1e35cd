"""Hugging Face models in and out: Llama-family causal LMs to and from this project's GPT
checkpoints (``llama``), CLIP and SigLIP vision towers into the H-LVLM's vision encoder (``clip``), H-LVLMs
out as LLaVA (``llava``), and what they share (``hf``). Above ``models`` and ``checkpoint``; only
the tools import it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from megatron_prior.convert.clip import TOWER_TYPES, convert_tower_to_megatron
from megatron_prior.convert.hf import ConversionError, hf_directory, read_hf_config
from megatron_prior.checkpoint import checkpoint_dir, read_model_config
from megatron_prior.convert.llama import FAMILIES, convert_gpt_to_hf, convert_llama_to_megatron
from megatron_prior.convert.llava import convert_hlvlm_to_llava
from megatron_prior.models.config import ModelConfig

__all__ = ["ConversionError", "convert_hf_to_megatron", "convert_megatron_to_hf"]


def convert_hf_to_megatron(hf_dir: str | os.PathLike, output: str | os.PathLike, dtype: Optional[torch.dtype] = None,
                           vision_feature_layer: int = -1) -> ModelConfig:
    """The model in the local directory ``hf_dir`` as a checkpoint in ``output``: a GPT for a
    Llama-family causal LM, an H-LVLM vision encoder for a CLIP or SigLIP (vision) model. Needs a world
    of one (``megatron_prior.parallel.initialize``)."""
    path = hf_directory(hf_dir)
    hf = read_hf_config(path)
    if hf.model_type in TOWER_TYPES:
        return convert_tower_to_megatron(path, hf, output, dtype, vision_feature_layer)
    if hf.model_type not in FAMILIES:
        raise ConversionError(f"{path / 'config.json'}: model_type {hf.model_type!r} is neither a Llama-family "
                              f"causal LM ({', '.join(FAMILIES)}) nor a CLIP or SigLIP model "
                              f"({', '.join(TOWER_TYPES)})")
    return convert_llama_to_megatron(path, hf, output, dtype)


def convert_megatron_to_hf(load: str | os.PathLike, output: str | os.PathLike,
                           tokenizer_dir: Optional[str | os.PathLike] = None) -> Path:
    """The checkpoint in ``load`` as a Hugging Face directory in ``output``: a GPT as a Llama (or
    Qwen2), an H-LVLM as a LLaVA. Needs a world of one."""
    if Path(output).exists():
        raise ConversionError(f"--output {output} exists; give a new directory")
    arch = read_model_config(checkpoint_dir(load)).arch
    if arch == "hlvlm":
        return convert_hlvlm_to_llava(load, output, tokenizer_dir)
    if arch != "gpt":
        raise ConversionError(f"{load}: a {arch} checkpoint; Hugging Face export takes gpt (Llama) and hlvlm (LLaVA)")
    return convert_gpt_to_hf(load, output, tokenizer_dir)
