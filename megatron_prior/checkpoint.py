"""Checkpoints as files: finding one, reading it safely, the model config it carries, its hash,
writing it. Below models, training, scoring and evaluation, which all load through here.

Layout (Megatron-LM's): ``{save}/iter_{N:07d}/`` is a megatron-core ``dist_checkpointing``
directory (torch.distributed.checkpoint's ``.metadata`` and ``*.distcp`` files) holding the
model (``model``, or ``model0..`` with virtual pipeline stages) and whatever else the writer
adds (training adds the optimizer and RNG states); beside them, written by rank 0,
``model_config.json`` (the architecture) and the writer's JSON files.
``{save}/latest_checkpointed_iteration.txt`` names the newest complete one. Everything is
written into ``iter_N.tmp`` and renamed when complete, then the tracker is replaced by rename,
so a kill at any moment leaves the previous checkpoint as the latest.

A checkpoint is untrusted input, and nothing read from it is ever unpickled with plain pickle:

- ``.metadata`` (a pickle) is read once, by an unpickler that admits only the dataclasses,
  enums and dtypes torch.distributed.checkpoint writes there; its storage entries must name
  files inside the checkpoint and lie within them.
- Byte entries (megatron ``ShardedObject``s such as ``*._extra_state``, megatron-core 0.19's
  ``common_state``) and the ``common.pt`` of checkpoints written by megatron-core <= 0.16 go
  through torch's weights-only unpickler: tensors and plain data load, anything else is
  refused with ``CheckpointError`` naming the file. Tensors are read by torch's own weights-only path.
- Transformer Engine would ``pickle.loads`` its FP8 scaling state (``_extra_state``) when a
  model loads it, so that state is dropped, with a warning, before it reaches a module.

megatron-core's ``dist_checkpointing.load`` cannot be used as it is: its torch_dist strategy
builds torch's ``DefaultLoadPlanner`` (via ``MCoreLoadPlanner``), whose ``load_bytes`` calls
``torch.load(..., weights_only=False)``, and 0.19 also reads ``common_state`` through a default
planner that no argument replaces. ``load_state`` runs the same steps with megatron-core's own
pieces (``load_preprocess``, the access-integrity validation, ``mcore_to_pyt_state_dict``,
factory merges) and ``SafeLoadPlanner``, an ``MCoreLoadPlanner`` whose ``load_bytes`` is
weights-only.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import merge, nested_values
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor, apply_factory_merges
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess
from megatron.core.dist_checkpointing.strategies.filesystem_async import get_write_results_queue
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreLoadPlanner,
    _replace_sharded_keys_with_state_dict_keys,
    _replace_state_dict_keys_with_sharded_keys,
    _restore_dict_types,
    _unwrap_pyt_sharded_tensor,
    mcore_to_pyt_state_dict,
)
from megatron.core.dist_checkpointing.utils import extract_sharded_base
from megatron.core.dist_checkpointing.validation import (
    StrictHandling,
    determine_global_metadata,
    validate_integrity_and_strict_load,
)
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import ReadItem

from megatron_prior.files import atomic_write_text, parse_json
from megatron_prior.models.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.json"
# megatron-core <= 0.16 wrote the non-sharded state (optimizer param groups) to this file, and
# 0.19 still reads it when present; 0.19 writes the ShardedObject ``common_state`` instead.
COMMON_PT = "common.pt"
COMMON_STATE_KEY = ShardedObject("common_state", None, (1,), (0,)).unique_key

log = logging.getLogger("megatron_prior.checkpoint")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, mismatched or unsafe; the message names the file."""


# --- finding a checkpoint --------------------------------------------------------------------

def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def resolve_iteration(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> Optional[int]:
    """The iteration to load: the given one, else the tracker's; None if nothing was saved."""
    if iteration is not None:
        return iteration
    tracker = Path(load_dir) / TRACKER
    if not tracker.exists():
        return None
    try:
        text = tracker.read_bytes().strip()
    except OSError as err:
        raise CheckpointError(f"{tracker}: cannot read ({err.strerror or err})") from None
    # bytes.isdigit is ASCII only (str.isdigit admits "²", which int() refuses); 18 digits fit int64.
    if not text.isdigit() or len(text) > 18:
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def checkpoint_iterations(load_dir: str | os.PathLike) -> list[int]:
    """Every complete checkpoint under ``load_dir`` up to the tracker's, in training order (an
    interrupted save leaves ``iter_N.tmp``, which is not one; a directory past the tracker's is
    from a save that never finished replacing it)."""
    latest = resolve_iteration(load_dir)
    if latest is None:
        return []
    found = sorted(int(p.name[len("iter_"):]) for p in Path(load_dir).glob("iter_*")
                   if p.is_dir() and p.name[len("iter_"):].isdigit() and p.name.isascii())
    return [it for it in found if it <= latest]


def checkpoint_dir(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    """The iteration directory to load (the tracker's unless given), its metadata checked."""
    it = resolve_iteration(load_dir, iteration)
    if it is None:
        raise CheckpointError(f"{load_dir}: no {TRACKER} (nothing saved there)")
    ckpt = iteration_dir(load_dir, it)
    if not ckpt.is_dir():
        raise CheckpointError(f"{load_dir}: iteration {it} has no directory {ckpt.name}")
    read_metadata(ckpt)  # refuse an unsafe or damaged checkpoint before any heavy work
    return ckpt


def read_json(ckpt: Path, name: str) -> dict:
    """A JSON object written beside the tensors (``model_config.json``, the writer's files)."""
    path = ckpt / name
    if not path.exists():
        raise CheckpointError(f"{ckpt}: missing {name}")
    try:
        data = parse_json(path.read_bytes())
    except ValueError as err:  # also bad UTF-8, deep nesting, numbers past the digit limit
        raise CheckpointError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def read_model_config(ckpt: Path) -> ModelConfig:
    data = read_json(ckpt, MODEL_CONFIG)
    path = ckpt / MODEL_CONFIG
    try:
        return ModelConfig.from_dict(data)  # its messages get the path below, once
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def checkpoint_hash(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> str:
    """A content hash of a checkpoint's files (binds scores to the model that made them)."""
    ckpt = checkpoint_dir(load_dir, iteration)
    h = hashlib.sha256()
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        h.update(path.relative_to(ckpt).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


# --- .metadata: the one plain pickle of the format -------------------------------------------

_DCP = "torch.distributed.checkpoint."


class _MetadataUnpickler(pickle._Unpickler):
    """Admits exactly the classes torch.distributed.checkpoint writes into ``.metadata``
    (dataclasses, enums, dtypes): nothing callable with side effects.

    The pure-Python unpickler, not the C one: the C unpickler's memo is an array sized by the
    largest index a PUT opcode names, so a 9-byte pickle could make it allocate tens of GB;
    here the memo is a dict. (About 6 ms per 10 kB of metadata, six times the C one.)"""

    ALLOWED = {
        (_DCP + "metadata", name) for name in (
            "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
            "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING")
    } | {
        (_DCP + "planner", name) for name in ("SavePlan", "WriteItem", "WriteItemType", "TensorWriteData")
    } | {
        (_DCP + "filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
        ("torch", "Size"), ("collections", "OrderedDict"),
    } | {
        ("torch", name) for name in ("float32", "float64", "float16", "bfloat16", "int64", "int32",
                                     "int16", "int8", "uint8", "bool")
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise CheckpointError(f"refusing to unpickle {module}.{name}")


def read_metadata(ckpt: Path) -> Metadata:
    """``.metadata`` through the restricted unpickler, each storage entry checked to be a file
    of this checkpoint and to lie within it."""
    path = ckpt / ".metadata"
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no .metadata file (incomplete or not a torch_dist checkpoint)")
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except CheckpointError as err:
        raise CheckpointError(f"{path}: {err}") from None
    except Exception as err:  # truncated or corrupt pickle
        raise CheckpointError(f"{path}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None
    # Unpickling builds the admitted dataclasses without their __init__: any field may be missing.
    if not (isinstance(metadata, Metadata) and isinstance(getattr(metadata, "storage_data", None), dict)
            and isinstance(getattr(metadata, "state_dict_metadata", None), dict)):
        raise CheckpointError(f"{path}: not torch.distributed.checkpoint metadata")
    sizes: dict[str, int] = {}
    for index, info in metadata.storage_data.items():
        if not (isinstance(index, MetadataIndex) and isinstance(getattr(index, "fqn", None), str)):
            raise CheckpointError(f"{path}: a storage entry is keyed by {type(index).__name__}, not a MetadataIndex")
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or name in ("", ".", "..") or name != os.path.basename(name):
            raise CheckpointError(f"{path}: entry {index.fqn} points outside the checkpoint ({name!r})")
        if name not in sizes:
            file = ckpt / name
            if not file.is_file():
                raise CheckpointError(f"{path}: entry {index.fqn} is in {file}, which does not exist")
            sizes[name] = file.stat().st_size
        offset, length = getattr(info, "offset", None), getattr(info, "length", None)
        if not (isinstance(offset, int) and isinstance(length, int) and 0 <= offset and 0 <= length):
            raise CheckpointError(f"{path}: entry {index.fqn} has offset {offset!r}, length {length!r}")
        if offset + length > sizes[name]:
            raise CheckpointError(f"{ckpt / name}: truncated: entry {index.fqn} ends at byte "
                                  f"{offset + length}, the file has {sizes[name]}")
    return metadata


# --- loading ------------------------------------------------------------------------------------

def _weights_only(data: io.BytesIO | Path, where: str) -> Any:
    """``torch.load`` restricted to tensors and plain data; anything else is a CheckpointError."""
    try:
        return torch.load(data, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # what the weights-only unpickler raises for what it refuses
        # torch's message is a paragraph; the line naming the refused global or opcode is the news.
        detail = next((line for line in str(err).splitlines() if line.startswith(("Trying to load", "Unsupported"))),
                      " ".join(str(err).split()))
        raise CheckpointError(f"{where}: refusing to load a pickled object that is not tensors and plain "
                              f"data ({detail.strip()})") from None
    except Exception as err:  # damaged bytes: not a torch.save archive, truncated zip, ...
        raise CheckpointError(f"{where}: unreadable ({type(err).__name__}: {' '.join(str(err).split())})") from None


class SafeLoadPlanner(MCoreLoadPlanner):
    """megatron-core's load planner (global shape validation and all), with byte entries read
    by torch's weights-only unpickler instead of ``torch.load(weights_only=False)``."""

    def __init__(self, ckpt: Path, **kwargs: Any) -> None:
        # The state dict arrives flat (sharded keys), as megatron-core 0.19's strategy passes it.
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False, **kwargs)
        self.ckpt = ckpt

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        file = self.ckpt / self.metadata.storage_data[read_item.storage_index].relative_path
        self.state_dict[fqn] = _weights_only(value, f"{file} (entry {fqn})")


class _Reader(FileSystemReader):
    """torch's file reader, handed the metadata ``read_metadata`` checked: torch's own
    ``read_metadata`` would unpickle ``.metadata`` again, with plain pickle."""

    def __init__(self, ckpt: Path, metadata: Metadata) -> None:
        super().__init__(ckpt)
        self._metadata = metadata

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        return self._metadata


def _dcp_read(pyt_state: dict, ckpt: Path, metadata: Metadata, **planner_kwargs: Any) -> None:
    """torch.distributed.checkpoint's load of ``pyt_state`` in place, on this rank alone (as
    megatron-core 0.19 does), through the safe planner and reader."""
    try:
        dcp_load(pyt_state, storage_reader=_Reader(ckpt, metadata), planner=SafeLoadPlanner(ckpt, **planner_kwargs),
                 no_dist=True)
    except CheckpointException as err:  # torch wraps the exception with its traceback as text
        raise next(exc for exc, _ in err.failures.values()) from None


def _read_common_state(ckpt: Path, metadata: Metadata) -> dict:
    legacy = ckpt / COMMON_PT
    if legacy.exists():
        common = _weights_only(legacy, str(legacy))
    elif COMMON_STATE_KEY in metadata.state_dict_metadata:
        state: dict[str, Any] = {COMMON_STATE_KEY: io.BytesIO()}
        _dcp_read(state, ckpt, metadata)
        common = state[COMMON_STATE_KEY]
        common = common[0] if isinstance(common, list) and len(common) == 1 else None
    else:
        raise CheckpointError(f"{ckpt}: no {COMMON_PT} and no common_state entry (not a megatron-core checkpoint)")
    if not isinstance(common, dict):
        raise CheckpointError(f"{ckpt}: the common state is a {type(common).__name__}, not a dict")
    return common


def _read_sharded(sharded: dict, ckpt: Path, metadata: Metadata) -> dict:
    """megatron-core's ``TorchDistLoadShardedStrategy.load``, with the safe planner and reader."""
    flat, flat_mapping, rename_mapping = _replace_state_dict_keys_with_sharded_keys(sharded)
    pyt_state = mcore_to_pyt_state_dict(flat, True)
    tensors = [t for t in nested_values(sharded) if isinstance(t, ShardedTensor)]
    _dcp_read(pyt_state, ckpt, metadata,
              shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
              allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch})
    state = {k: _unwrap_pyt_sharded_tensor(v) for k, v in pyt_state.items()}
    state = _replace_sharded_keys_with_state_dict_keys(state, flat_mapping, rename_mapping)
    _restore_dict_types(state, sharded)
    return state


def load_state(ckpt: Path, sharded_state_dict: dict) -> dict:
    """``dist_checkpointing.load(sharded_state_dict, ckpt)`` that never unpickles anything but
    tensors and plain data (collective: every rank calls it). Reshards as megatron-core does."""
    metadata = read_metadata(ckpt)
    try:
        sharded, nonpersistent, factories = load_preprocess(sharded_state_dict)
        state = _read_common_state(ckpt, metadata)
        merge(state, nonpersistent)
        sharded, _ = extract_sharded_base(sharded)
        local, global_ = determine_global_metadata(sharded)
        sharded, _, _ = validate_integrity_and_strict_load(
            sharded, StrictHandling.ASSUME_OK_UNEXPECTED, True, local, global_)
        merge(state, _read_sharded(sharded, ckpt, metadata))
        return apply_factory_merges(state, factories)
    except CheckpointError:
        raise
    except Exception as err:
        # One line: megatron-core's messages list keys over several lines.
        raise CheckpointError(f"{ckpt}: cannot load ({type(err).__name__}: {' '.join(str(err).split())})") from err


# --- the model part -----------------------------------------------------------------------------

def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside its DDP / Float16Module wrappers."""
    while hasattr(model, "module"):
        model = model.module
    return model


def model_state(model_chunks: Sequence[torch.nn.Module]) -> dict:
    """The model part of a checkpoint's sharded state, keyed as Megatron-LM keys it."""
    return {_model_key(i, len(model_chunks)): unwrap(chunk).sharded_state_dict()
            for i, chunk in enumerate(model_chunks)}


def load_weights(module: torch.nn.Module, weights: dict, ckpt: Path, strict: bool = True):
    """``module.load_state_dict(weights)`` for weights from ``load_state``; returns its result.

    Transformer Engine's ``set_extra_state`` runs ``pickle.loads`` on a non-empty
    ``_extra_state`` tensor (and ``torch.load`` on a BytesIO), so checkpoint bytes must not
    reach it: such entries become None. megatron-core's own layers save None there, so only
    TE's FP8 scaling state (amax history) is lost, and it recalibrates within a few iterations.
    """
    dropped = {k for k, v in weights.items() if k.endswith("_extra_state") and (
        isinstance(v, io.BytesIO) or (isinstance(v, torch.Tensor) and v.numel() > 0))}
    if dropped:
        log.warning("%s: not restoring the Transformer Engine FP8 state of %d modules (it would be unpickled "
                    "with plain pickle); FP8 scales recalibrate from the next iterations", ckpt, len(dropped))
    return unwrap(module).load_state_dict({k: (None if k in dropped else v) for k, v in weights.items()},
                                          strict=strict)


def restore_model(model_chunks: Sequence[torch.nn.Module], state: dict, ckpt: Path) -> None:
    """Load the model part of ``load_state``'s result into the chunks (strict)."""
    for i, chunk in enumerate(model_chunks):
        load_weights(chunk, state[_model_key(i, len(model_chunks))], ckpt)


# --- saving -------------------------------------------------------------------------------------

def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def save(save_dir: str | os.PathLike, iteration: int, sharded_state: dict, model_config: ModelConfig,
         files: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``sharded_state`` (``model_state`` plus whatever the caller adds) as iteration
    ``iteration`` of ``save_dir``, with ``model_config.json`` and ``files`` (name -> text)
    beside it, atomically; then point the tracker at it. Collective; returns the directory."""
    root = Path(save_dir)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted save
        tmp.mkdir()
    _barrier()
    # The torch_dist writer hands its results over a multiprocessing.Manager queue, made once
    # per process. megatron-core's default starts that Manager with "spawn": a fresh
    # interpreter that re-imports the training script (about 9 s of CPU on first save here).
    # Saves are synchronous, so the queue never crosses to another writer process: a Manager
    # forked from this one serves it as well and starts in about 0.1 s.
    get_write_results_queue(mp_mode="fork")
    dist_checkpointing.save(sharded_state, str(tmp))
    if _rank() == 0:
        atomic_write_text(tmp / MODEL_CONFIG, model_config.to_json(), fsync=True)
        for name, text in (files or {}).items():
            atomic_write_text(tmp / name, text, fsync=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / TRACKER, str(iteration), fsync=True)
    _barrier()
    return final
