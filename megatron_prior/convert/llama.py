"""Llama-family causal LMs (Llama, Mistral, Qwen2, SmolLM2) to and from this project's GPT
checkpoints, tensor by tensor.

The GPT is megatron-core's GPTModel with the shape a ``ModelConfig`` gives it (RMSNorm, SwiGLU,
grouped-query attention, rotary base and Llama 3.1 scaling, biases where the family has them).
The converter builds that model for one process without initialising it, fills every
parameter from the Hugging Face safetensors files one tensor at a time (memory: the model once,
plus the few tensors of one parameter), and saves it through ``megatron_prior.checkpoint`` as
megatron-core's sharded state: any tensor/pipeline layout reads it back. Two layouts differ
between the formats and are converted here:

- megatron-core's ``linear_qkv`` holds, per key/value group, that group's query heads, then its
  key head, then its value head (``convert.hf.fuse``); HF keeps ``q_proj``, ``k_proj``, ``v_proj``.
- the SwiGLU ``linear_fc1`` is ``[gate; up]`` (megatron-core's GLU takes the first half through
  SiLU); HF keeps ``gate_proj`` and ``up_proj``.

Rotary embeddings need no permutation: HF Llama rotates the two halves of each head
(``rotate_half``), which is megatron-core's default (non-interleaved) rotary.

The vocabulary stays the model's own size (no padding to a multiple of 128), so no padded
logit takes probability mass: the converted model's log-probabilities are HF's.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator, Optional

import torch
from transformers import LlamaConfig, PretrainedConfig, Qwen2Config

from megatron_prior.checkpoint import checkpoint_dir, read_metadata, read_model_config
from megatron_prior.convert.hf import (
    QKV,
    ConversionError,
    SafetensorsFiles,
    TensorMap,
    check_names,
    split,
    write_checkpoint,
    write_hf_directory,
)
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.pretrained import load_inference_model

log = logging.getLogger("megatron_prior.convert")

FAMILIES = ("llama", "mistral", "qwen2")
# Megatron-core applies Llama 3.1's rotary scaling with these constants fixed.
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
# Tensors an HF checkpoint may hold that the model computes (older Llama files saved them).
COMPUTED = ("rotary_emb.inv_freq",)


# --- the two formats' tensors ----------------------------------------------------------------

def tensor_map(cfg: ModelConfig) -> TensorMap:
    """(GPTModel parameter, HF tensors) for every parameter of the language model; several HF
    tensors make one parameter where megatron-core fuses them (q/k/v, gate/up)."""
    out = [("embedding.word_embeddings.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        kinds = ["weight"] + (["bias"] if cfg.add_bias_linear else [])
        out += [(m + "input_layernorm.weight", (h + "input_layernorm.weight",))]
        out += [(m + f"self_attention.linear_qkv.{k}", tuple(h + f"self_attn.{x}_proj.{k}" for x in "qkv"))
                for k in (kinds if not cfg.add_qkv_bias else ["weight", "bias"])]
        out += [(m + f"self_attention.linear_proj.{k}", (h + f"self_attn.o_proj.{k}",)) for k in kinds]
        out += [(m + "pre_mlp_layernorm.weight", (h + "post_attention_layernorm.weight",))]
        out += [(m + f"mlp.linear_fc1.{k}", (h + f"mlp.gate_proj.{k}", h + f"mlp.up_proj.{k}")) for k in kinds]
        out += [(m + f"mlp.linear_fc2.{k}", (h + f"mlp.down_proj.{k}",)) for k in kinds]
    out.append(("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if not cfg.share_embeddings_and_output_weights:
        out.append(("output_layer.weight", ("lm_head.weight",)))
    return out


def qkv_layout(cfg: ModelConfig) -> QKV:
    return QKV.of(cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups)


# --- configs -----------------------------------------------------------------------------------

def _rope(hf: PretrainedConfig, where: Path) -> dict:
    params = dict(getattr(hf, "rope_parameters", None) or {})
    kind = params.get("rope_type", "default")
    out = dict(rotary_base=float(params.get("rope_theta", 10000.0)))
    if kind == "llama3":
        fixed = {k: params.get(k) for k in LLAMA3_ROPE}
        if any(float(fixed[k] or 0) != v for k, v in LLAMA3_ROPE.items()):
            raise ConversionError(f"{where}: llama3 rope scaling with {fixed}: megatron-core applies it with "
                                  f"{LLAMA3_ROPE} only")
        out.update(rope_scaling=True, rope_scaling_factor=float(params["factor"]))
    elif kind != "default":
        raise ConversionError(f"{where}: rope_type {kind!r} is not supported (default or llama3)")
    return out


def gpt_config_from_hf(hf: PretrainedConfig, where: Path) -> ModelConfig:
    """The ``ModelConfig`` of a Llama-family HF config, or a ConversionError naming what megatron-core's
    GPTModel cannot express."""
    family = getattr(hf, "model_type", None)
    if family not in FAMILIES:
        raise ConversionError(f"{where}: model_type {family!r} is not a Llama-family causal LM ({', '.join(FAMILIES)})")
    heads, hidden = hf.num_attention_heads, hf.hidden_size
    head_dim = getattr(hf, "head_dim", None) or hidden // heads
    problems = []
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act {hf.hidden_act!r} (SwiGLU needs silu)")
    if head_dim * heads != hidden:
        problems.append(f"head_dim {head_dim} x {heads} heads != hidden_size {hidden}")
    attention_bias, mlp_bias = getattr(hf, "attention_bias", False), getattr(hf, "mlp_bias", False)
    if attention_bias != mlp_bias:
        problems.append(f"attention_bias {attention_bias} with mlp_bias {mlp_bias} (megatron-core biases all "
                        "linear layers or none, or q/k/v alone)")
    if problems:
        raise ConversionError(f"{where}: cannot convert: " + "; ".join(problems))
    window = getattr(hf, "sliding_window", None)
    if window and (family != "qwen2" or getattr(hf, "use_sliding_window", False)):
        log.warning("%s: sliding_window %d is not applied; sequences up to %d tokens compute the same", where,
                    window, window)
    kv_heads = getattr(hf, "num_key_value_heads", None) or heads
    return ModelConfig(
        arch="gpt", num_layers=hf.num_hidden_layers, hidden_size=hidden, num_attention_heads=heads,
        ffn_hidden_size=hf.intermediate_size, vocab_size=hf.vocab_size,
        max_position_embeddings=hf.max_position_embeddings, position_embedding_type="rope",
        share_embeddings_and_output_weights=bool(hf.tie_word_embeddings), normalization="RMSNorm",
        swiglu=True, num_query_groups=kv_heads if kv_heads != heads else None,
        add_bias_linear=bool(attention_bias), add_qkv_bias=family == "qwen2",
        norm_epsilon=hf.rms_norm_eps, **_rope(hf, where))


def hf_config_from_gpt(cfg: ModelConfig, dtype: torch.dtype, where: Path) -> PretrainedConfig:
    """The HF config of a Llama-shaped GPT (Qwen2's for q/k/v-only biases), or a ConversionError."""
    problems = [f"{field} {getattr(cfg, field)!r} (HF Llama needs {want!r})" for field, want in (
        ("arch", "gpt"), ("position_embedding_type", "rope"), ("normalization", "RMSNorm"), ("swiglu", True))
        if getattr(cfg, field) != want]
    if cfg.add_qkv_bias and cfg.add_bias_linear:
        problems.append("add_qkv_bias with add_bias_linear")
    if cfg.add_qkv_bias and cfg.rope_scaling:
        problems.append("add_qkv_bias (Qwen2) with rope_scaling")
    if problems:
        raise ConversionError(f"{where}: not expressible as a Hugging Face Llama: " + "; ".join(problems))
    rope = {"rope_type": "default", "rope_theta": cfg.rotary_base}
    if cfg.rope_scaling:
        rope.update(rope_type="llama3", factor=cfg.rope_scaling_factor, **LLAMA3_ROPE)
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size or 4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups or cfg.num_attention_heads, hidden_act="silu",
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.share_embeddings_and_output_weights, rope_parameters=rope,
        dtype=str(dtype).removeprefix("torch."))
    if cfg.add_qkv_bias:
        return Qwen2Config(**common, architectures=["Qwen2ForCausalLM"], use_sliding_window=False)
    return LlamaConfig(**common, architectures=["LlamaForCausalLM"], attention_bias=cfg.add_bias_linear,
                       mlp_bias=cfg.add_bias_linear)


# --- conversions ---------------------------------------------------------------------------------

def convert_llama_to_megatron(path: Path, hf: PretrainedConfig, output: str | os.PathLike,
                              dtype: Optional[torch.dtype] = None) -> ModelConfig:
    """Write the Llama-family model in ``path`` (its config ``hf``) as iteration 0 of a GPT
    checkpoint in ``output``. Needs a world of one (``megatron_prior.parallel.initialize``);
    ``dtype`` defaults to the model's own, so the tensors are copied bit for bit."""
    cfg = gpt_config_from_hf(hf, path / "config.json")
    files = SafetensorsFiles(path)
    mapping = tensor_map(cfg)
    tied_head = "lm_head.weight" if cfg.share_embeddings_and_output_weights else None
    check_names(mapping, files, path, lambda n: n == tied_head or n.endswith(COMPUTED),
                f"{cfg.num_layers} layers, biases {cfg.add_bias_linear or cfg.add_qkv_bias}, tied embeddings "
                f"{cfg.share_embeddings_and_output_weights}")
    dtype = dtype or files.dtype("model.embed_tokens.weight")
    log.info("%s: %s, %d layers, hidden %d, %d heads (%s key/value), vocab %d, %s -> %s", path, hf.model_type,
             cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups or "all",
             cfg.vocab_size, dtype, output)
    write_checkpoint(output, cfg, files, mapping, qkv_layout(cfg), dtype,
                     dict(hf_dir=str(path.resolve()), model_type=hf.model_type, architectures=hf.architectures))
    return cfg


def saved_dtype(ckpt: Path, key: str) -> torch.dtype:
    """The dtype a checkpoint stores tensor ``key`` in."""
    entry = read_metadata(ckpt).state_dict_metadata.get(key)
    return entry.properties.dtype if entry is not None else torch.float32


def model_tensors(params: dict[str, torch.Tensor], cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of a single-process GPTModel's state dict ``params``, name by name."""
    for name, hf_names in tensor_map(cfg):
        yield from zip(hf_names, split(name, params[name], len(hf_names), qkv_layout(cfg)))


def convert_gpt_to_hf(load: str | os.PathLike, output: str | os.PathLike,
                      tokenizer_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the GPT checkpoint in ``load`` as a Hugging Face Llama (or Qwen2) directory (world
    of one); the tensors keep the checkpoint's dtype."""
    ckpt = checkpoint_dir(load)
    cfg = read_model_config(ckpt)
    dtype = saved_dtype(ckpt, "embedding.word_embeddings.weight")
    config = hf_config_from_gpt(cfg, dtype, ckpt / "model_config.json")
    model, _ = load_inference_model(load, params_dtype=dtype)
    tensors = dict(model_tensors(model.state_dict(), cfg))
    del model
    log.info("%s -> %s (%s)", ckpt, output, config.architectures[0])
    return write_hf_directory(output, config, tensors, tokenizer_dir)
