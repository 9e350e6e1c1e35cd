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
  key head, then its value head (``_fuse_qkv``); HF keeps ``q_proj``, ``k_proj``, ``v_proj``.
- the SwiGLU ``linear_fc1`` is ``[gate; up]`` (megatron-core's GLU takes the first half through
  SiLU); HF keeps ``gate_proj`` and ``up_proj``.

Rotary embeddings need no permutation: HF Llama rotates the two halves of each head
(``rotate_half``), which is megatron-core's default (non-interleaved) rotary.

The vocabulary stays the model's own size (no padding to a multiple of 128), so no padded
logit takes probability mass: the converted model's log-probabilities are HF's.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, LlamaConfig, PretrainedConfig, Qwen2Config

from megatron_prior.checkpoint import TRACKER, checkpoint_dir, read_metadata, read_model_config, save
from megatron_prior.checkpoint import model_state as sharded_model_state
from megatron_prior.files import atomic_write_text
from megatron_prior.models.builder import build_model
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.pretrained import load_inference_model

log = logging.getLogger("megatron_prior.convert")

FAMILIES = ("llama", "mistral", "qwen2")
SOURCE_FILE = "hf_source.json"
# Megatron-core applies Llama 3.1's rotary scaling with these constants fixed.
LLAMA3_ROPE = dict(low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Tensors an HF checkpoint may hold that the model computes (older Llama files saved them).
COMPUTED = ("rotary_emb.inv_freq",)


class ConversionError(ValueError):
    """A model that cannot be converted; the message names the file, tensor or config field."""


# --- reading Hugging Face directories ---------------------------------------------------------

def hf_directory(path: str | os.PathLike, flag: str = "--hf-dir") -> Path:
    """``path`` as a local model directory (``save_pretrained``'s layout), or a clear error."""
    p = Path(path)
    if not p.is_dir():
        hint = (f" It looks like a Hugging Face hub id: nothing is downloaded here, download it first "
                f"(e.g. `huggingface-cli download {path} --local-dir DIR`) and pass DIR."
                if str(path).count("/") == 1 and not str(path).startswith((".", "/")) else "")
        raise ConversionError(f"{flag} {path}: no such directory.{hint}")
    if not (p / "config.json").is_file():
        raise ConversionError(f"{flag} {path}: no config.json (not a save_pretrained directory)")
    return p


def read_hf_config(path: Path) -> PretrainedConfig:
    try:
        return AutoConfig.from_pretrained(path, local_files_only=True)
    except (ValueError, OSError, KeyError) as err:
        raise ConversionError(f"{path / 'config.json'}: not a config transformers reads ({err})") from None


class SafetensorsFiles:
    """The tensors of a model directory, opened with safetensors and read one at a time."""

    def __init__(self, path: Path) -> None:
        index = path / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as err:
                raise ConversionError(f"{index}: not a safetensors index ({err})") from None
            files = sorted({path / name for name in weight_map.values()})
        elif (path / "model.safetensors").is_file():
            files = [path / "model.safetensors"]
        else:
            raise ConversionError(f"{path}: no model.safetensors or model.safetensors.index.json (a PyTorch .bin "
                                  "checkpoint? re-save it with save_pretrained, which writes safetensors)")
        self.handles, self.where = {}, {}
        for file in files:
            if not file.is_file():
                raise ConversionError(f"{index}: names {file.name}, which does not exist")
            try:
                handle = safe_open(str(file), framework="pt")
            except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
                raise ConversionError(f"{file}: not a safetensors file ({err})") from None
            self.handles[file] = handle
            self.where.update((name, file) for name in handle.keys())

    def shape(self, name: str) -> list[int]:
        return self.handles[self.where[name]].get_slice(name).get_shape()

    def get(self, name: str) -> torch.Tensor:
        return self.handles[self.where[name]].get_tensor(name)


# --- the two formats' tensors ----------------------------------------------------------------

def tensor_map(cfg: ModelConfig) -> list[tuple[str, tuple[str, ...]]]:
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


def _qkv_sizes(cfg: ModelConfig) -> tuple[int, int, int]:
    """(key/value groups, query rows per group, rows per key or value head)."""
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    groups = cfg.num_query_groups or cfg.num_attention_heads
    return groups, cfg.num_attention_heads // groups * head_dim, head_dim


def _fuse(name: str, tensors: list[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0]
    if ".linear_qkv." in name:
        groups, q_rows, head_dim = _qkv_sizes(cfg)
        q, k, v = (t.reshape(groups, -1, *t.shape[1:]) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tensors[0].shape[1:])
    return torch.cat(tensors, dim=0)  # linear_fc1: [gate; up]


def _split(name: str, tensor: torch.Tensor, count: int, cfg: ModelConfig) -> list[torch.Tensor]:
    if count == 1:
        return [tensor]
    if ".linear_qkv." in name:
        groups, q_rows, head_dim = _qkv_sizes(cfg)
        rest = tensor.shape[1:]
        parts = tensor.reshape(groups, q_rows + 2 * head_dim, *rest).split([q_rows, head_dim, head_dim], dim=1)
        return [p.reshape(-1, *rest).contiguous() for p in parts]
    return [p.contiguous() for p in tensor.chunk(2, dim=0)]


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

def _check_names(cfg: ModelConfig, files: SafetensorsFiles, path: Path) -> list[tuple[str, tuple[str, ...]]]:
    """The tensor map, every HF tensor it names present and none left over (before any reading)."""
    mapping = tensor_map(cfg)
    wanted = {name for _, names in mapping for name in names}
    missing = sorted(wanted - set(files.where))
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing[:5]} (the config says {cfg.num_layers} layers, "
                              f"biases {cfg.add_bias_linear or cfg.add_qkv_bias}, tied embeddings "
                              f"{cfg.share_embeddings_and_output_weights})")
    tied_head = {"lm_head.weight"} if cfg.share_embeddings_and_output_weights else set()
    extra = sorted(n for n in set(files.where) - wanted - tied_head if not n.endswith(COMPUTED))
    if extra:
        raise ConversionError(f"{files.where[extra[0]]}: tensors the config does not describe: {extra[:5]}")
    return mapping


def convert_hf_to_megatron(hf_dir: str | os.PathLike, output: str | os.PathLike,
                           dtype: Optional[torch.dtype] = None) -> ModelConfig:
    """Write the Llama-family model in ``hf_dir`` as iteration 0 of a GPT checkpoint in ``output``.

    Runs in a world of one (``megatron_prior.parallel.initialize``); ``dtype`` defaults to the
    embedding's in the safetensors files, so the tensors are copied bit for bit."""
    path = hf_directory(hf_dir)
    if (Path(output) / TRACKER).exists():
        raise ConversionError(f"--output {output} already holds a checkpoint ({TRACKER}); give a new directory")
    hf = read_hf_config(path)
    cfg = gpt_config_from_hf(hf, path / "config.json")
    files = SafetensorsFiles(path)
    mapping = _check_names(cfg, files, path)
    embed = files.get("model.embed_tokens.weight")
    dtype = dtype or embed.dtype
    log.info("%s: %s, %d layers, hidden %d, %d heads (%s key/value), vocab %d, %s -> %s", path, hf.model_type,
             cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups or "all",
             cfg.vocab_size, dtype, output)
    model = build_model(cfg, bf16=dtype == torch.bfloat16,
                        config_overrides=dict(params_dtype=dtype, perform_initialization=False))
    params = {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.endswith("_extra_state")}
    unfilled = set(params) - {name for name, _ in mapping}
    if unfilled:  # the map must cover the model megatron-core built, or a parameter would stay empty
        raise ConversionError(f"no HF tensor maps to {sorted(unfilled)[:5]}")
    with torch.no_grad():
        for name, hf_names in tqdm(mapping, desc="hf -> megatron", unit="tensor", mininterval=1.0):
            tensors = [embed if n == "model.embed_tokens.weight" else files.get(n) for n in hf_names]
            value = _fuse(name, tensors, cfg)
            if tuple(value.shape) != tuple(params[name].shape):
                raise ConversionError(f"{files.where[hf_names[0]]}: {', '.join(hf_names)} of shape "
                                      f"{[list(t.shape) for t in tensors]} do not fit {name} "
                                      f"{list(params[name].shape)}")
            params[name].copy_(value)
            del tensors, value
    del embed
    source = dict(hf_dir=str(path.resolve()), model_type=hf.model_type, architectures=hf.architectures,
                  dtype=str(dtype))
    save(output, 0, sharded_model_state([model]), cfg, {SOURCE_FILE: json.dumps(source, indent=2)})
    return cfg


def _saved_dtype(ckpt: Path) -> torch.dtype:
    entry = read_metadata(ckpt).state_dict_metadata.get("embedding.word_embeddings.weight")
    return entry.properties.dtype if entry is not None else torch.float32


def model_tensors(model: torch.nn.Module, cfg: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of a single-process GPT ``model`` (its language model), name by name."""
    params = model.state_dict()
    for name, hf_names in tensor_map(cfg):
        yield from zip(hf_names, _split(name, params[name], len(hf_names), cfg))


def write_hf_directory(output: str | os.PathLike, config: PretrainedConfig, tensors: dict[str, torch.Tensor],
                       tokenizer_dir: Optional[str | os.PathLike] = None) -> Path:
    """``save_pretrained``'s layout (config.json, safetensors shards and their index), written
    into a temporary directory renamed into place when complete."""
    final = Path(output)
    if final.exists():
        raise ConversionError(f"--output {output} exists; give a new directory")
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an interrupted export
    tmp.mkdir(parents=True)
    config.save_pretrained(tmp)
    split = split_torch_state_dict_into_shards(tensors, filename_pattern="model{suffix}.safetensors")
    for file, names in tqdm(split.filename_to_tensors.items(), desc="write", unit="file", mininterval=1.0):
        save_file({n: tensors[n] for n in names}, tmp / file, metadata={"format": "pt"})
    if split.is_sharded:
        index = dict(metadata=split.metadata, weight_map=split.tensor_to_filename)
        atomic_write_text(tmp / "model.safetensors.index.json", json.dumps(index, indent=2, sort_keys=True))
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(hf_directory(tokenizer_dir, "--tokenizer-dir"),
                                      local_files_only=True).save_pretrained(tmp)
    os.replace(tmp, final)
    return final


def convert_megatron_to_hf(load: str | os.PathLike, output: str | os.PathLike,
                           tokenizer_dir: Optional[str | os.PathLike] = None) -> Path:
    """Write the GPT checkpoint in ``load`` as a Hugging Face Llama (or Qwen2) directory.

    Runs in a world of one; the tensors keep the checkpoint's dtype."""
    ckpt = checkpoint_dir(load)
    cfg = read_model_config(ckpt)
    config = hf_config_from_gpt(cfg, _saved_dtype(ckpt), ckpt / "model_config.json")
    model, _ = load_inference_model(load, params_dtype=_saved_dtype(ckpt))
    tensors = dict(model_tensors(model, cfg))
    del model
    log.info("%s -> %s (%s)", ckpt, output, config.architectures[0])
    return write_hf_directory(output, config, tensors, tokenizer_dir)
