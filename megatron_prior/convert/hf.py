"""What every conversion between Hugging Face directories and this project's checkpoints shares:
reading a local model directory (config through transformers, tensors one at a time through
safetensors), megatron-core's fused q/k/v and gate/up layouts, filling a model built for one
process tensor by tensor and saving it as a sharded checkpoint, and writing ``save_pretrained``'s
layout atomically."""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from huggingface_hub import split_torch_state_dict_into_shards
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from megatron_prior.checkpoint import TRACKER, save
from megatron_prior.files import atomic_write_text
from megatron_prior.models.builder import build_model
from megatron_prior.models.config import ModelConfig

log = logging.getLogger("megatron_prior.convert")

SOURCE_FILE = "hf_source.json"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
# (megatron-core parameter, the HF tensors that make it)
TensorMap = list[tuple[str, tuple[str, ...]]]


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
        self.where, self.dtypes = {}, {}
        for file in files:
            if not file.is_file():
                raise ConversionError(f"{index}: names {file.name}, which does not exist")
            try:
                with safe_open(str(file), framework="pt") as handle:
                    for name in handle.keys():
                        self.where[name] = file
                        self.dtypes[name] = handle.get_slice(name).get_dtype()
            except Exception as err:  # safetensors raises its own SafetensorError for a damaged header
                raise ConversionError(f"{file}: not a safetensors file ({err})") from None

    def get(self, name: str) -> torch.Tensor:
        # Opened for each tensor: safetensors memory-maps the file, and the pages a read touched
        # would stay resident (the whole model a second time) while the mapping lives.
        with safe_open(str(self.where[name]), framework="pt") as handle:
            return handle.get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        kind = self.dtypes[name]
        if kind not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{self.where[name]}: {name} is {kind}, not a float32/bfloat16/float16 weight")
        return SAFETENSORS_DTYPES[kind]


# --- megatron-core's fused layouts -----------------------------------------------------------------

@dataclass(frozen=True)
class QKV:
    """megatron-core's ``linear_qkv`` rows: per key/value group, its query heads, then its key
    head, then its value head (``groups`` = heads for plain multi-head attention)."""

    groups: int
    q_rows: int     # query rows per group: heads per group x head_dim
    head_dim: int

    @classmethod
    def of(cls, hidden_size: int, heads: int, groups: Optional[int]) -> "QKV":
        head_dim = hidden_size // heads
        groups = groups or heads
        return cls(groups, heads // groups * head_dim, head_dim)


def fuse(name: str, tensors: list[torch.Tensor], qkv: QKV) -> torch.Tensor:
    """One megatron-core parameter from its HF tensors: q/k/v interleaved by group, gate/up stacked."""
    if len(tensors) == 1:
        return tensors[0]
    if ".linear_qkv." in name:
        q, k, v = (t.reshape(qkv.groups, -1, *t.shape[1:]) for t in tensors)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tensors[0].shape[1:])
    return torch.cat(tensors, dim=0)  # SwiGLU's linear_fc1: [gate; up], the first half through SiLU


def split(name: str, tensor: torch.Tensor, count: int, qkv: QKV) -> list[torch.Tensor]:
    """``fuse`` undone: the ``count`` HF tensors of a megatron-core parameter."""
    if count == 1:
        return [tensor]
    if ".linear_qkv." in name:
        rest = tensor.shape[1:]
        parts = tensor.reshape(qkv.groups, qkv.q_rows + 2 * qkv.head_dim, *rest).split(
            [qkv.q_rows, qkv.head_dim, qkv.head_dim], dim=1)
        return [p.reshape(-1, *rest).contiguous() for p in parts]
    return [p.contiguous() for p in tensor.chunk(2, dim=0)]


# --- HF directory -> checkpoint -------------------------------------------------------------------

def check_names(mapping: TensorMap, files: SafetensorsFiles, path: Path, ignored: Callable[[str], bool],
                what: str) -> None:
    """Every HF tensor the map names is present and every other one is ``ignored`` (before reading)."""
    wanted = {name for _, names in mapping for name in names}
    missing = sorted(wanted - set(files.where))
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing[:5]} (the config says {what})")
    extra = sorted(n for n in set(files.where) - wanted if not ignored(n))
    if extra:
        raise ConversionError(f"{files.where[extra[0]]}: tensors the config does not describe: {extra[:5]}")


def write_checkpoint(output: str | os.PathLike, cfg: ModelConfig, files: SafetensorsFiles, mapping: TensorMap,
                     qkv: QKV, dtype: torch.dtype, source: dict, prefix: str = "") -> None:
    """Build ``cfg``'s model for one process (not initialised), fill the parameters under
    ``prefix`` from ``files`` one at a time, and save them as iteration 0 of ``output``."""
    if (Path(output) / TRACKER).exists():
        raise ConversionError(f"--output {output} already holds a checkpoint ({TRACKER}); give a new directory")
    model = build_model(cfg, bf16=dtype == torch.bfloat16,
                        config_overrides=dict(params_dtype=dtype, perform_initialization=False))
    params = {k: v for k, v in model.state_dict(keep_vars=True).items()
              if k.startswith(prefix) and not k.endswith("_extra_state")}
    unfilled = set(params) - {name for name, _ in mapping}
    if unfilled:  # the map must cover the model megatron-core built, or a parameter would stay empty
        raise ConversionError(f"no HF tensor maps to {sorted(unfilled)[:5]}")
    with torch.no_grad():
        for name, hf_names in tqdm(mapping, desc="hf -> megatron", unit="tensor", mininterval=1.0):
            tensors = [files.get(n) for n in hf_names]
            value = fuse(name, tensors, qkv)
            if value.numel() != params[name].numel() or (value.dim() > 1 and value.shape != params[name].shape):
                raise ConversionError(f"{files.where[hf_names[0]]}: {', '.join(hf_names)} of shape "
                                      f"{[list(t.shape) for t in tensors]} do not fit {name} "
                                      f"{list(params[name].shape)}")
            params[name].copy_(value.reshape(params[name].shape))  # a 1-d class embedding becomes [1, 1, h]
            del tensors, value
    state = {k: v for k, v in model.sharded_state_dict().items() if k.startswith(prefix)}
    save(output, 0, {"model": state}, cfg, {SOURCE_FILE: json.dumps({**source, "dtype": str(dtype)}, indent=2)})


# --- checkpoint -> HF directory -------------------------------------------------------------------

def write_hf_directory(output: str | os.PathLike, config: PretrainedConfig, tensors: dict[str, torch.Tensor],
                       tokenizer_dir: Optional[str | os.PathLike] = None, extra: Sequence = ()) -> Path:
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
    for thing in extra:  # e.g. an image processor: anything with save_pretrained
        thing.save_pretrained(tmp)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(hf_directory(tokenizer_dir, "--tokenizer-dir"),
                                      local_files_only=True).save_pretrained(tmp)
    os.replace(tmp, final)
    return final


