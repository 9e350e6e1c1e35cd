"""Checkpoints on megatron-core ``dist_checkpointing``: atomic, resharding, safe to open.

Layout (Megatron-LM's): ``{save}/iter_{N:07d}/`` is a dist_checkpointing directory holding
the model (``model`` or ``model0..`` with virtual pipeline stages), the optimizer and every
rank's RNG states as tensors; beside them, written by rank 0, ``model_config.json`` (the
architecture) and ``train_state.json`` (iteration, consumed samples, LR scheduler, parallel
layout, arguments). ``{save}/latest_checkpointed_iteration.txt`` names the newest complete one.

Atomicity: everything is written into ``iter_N.tmp`` and renamed when complete, then the
tracker file is replaced by rename, so a kill at any moment leaves the previous checkpoint
as the latest. A checkpoint is untrusted input: the JSON files are parsed as JSON, megatron's
common state goes through torch's weights-only loader, and the one plain pickle in the format
(torch.distributed.checkpoint's ``.metadata``) is first read with an unpickler that admits
only checkpoint-metadata classes.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shutil
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_prior.files import atomic_write_text
from megatron_prior.models.config import ModelConfig

TRACKER = "latest_checkpointed_iteration.txt"
MODEL_CONFIG = "model_config.json"
TRAIN_STATE = "train_state.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, mismatched or unsafe; the message says which."""


def iteration_dir(root: str | os.PathLike, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# --- RNG states as tensors (no pickles) --------------------------------------------------

def _layout() -> dict:
    return dict(
        tp=parallel_state.get_tensor_model_parallel_world_size(),
        pp=parallel_state.get_pipeline_model_parallel_world_size(),
        dp=parallel_state.get_data_parallel_world_size(),
    )


def _rng_tensors() -> dict[str, torch.Tensor]:
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    out = {
        "torch_cpu": torch.get_rng_state(),
        "python": torch.tensor(list(py_state) + [py_version, 0 if py_gauss is None else 1], dtype=torch.int64),
        "python_gauss": torch.tensor([0.0 if py_gauss is None else py_gauss], dtype=torch.float64),
        "numpy": torch.tensor(np.concatenate([np_keys.astype(np.int64), [np_pos, np_has_gauss]]), dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    for name, state in tensor_parallel.get_cuda_rng_tracker().get_states().items():
        out[f"tracker.{name}"] = state if isinstance(state, torch.Tensor) else torch.as_tensor(state)
    return out


def _set_rng_tensors(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"].cpu().to(torch.uint8))
    py = states["python"].tolist()
    gauss = states["python_gauss"].item() if py[-1] else None
    random.setstate((py[-2], tuple(py[:-2]), gauss))
    npv = states["numpy"].numpy()
    np.random.set_state(("MT19937", npv[:-2].astype(np.uint32), int(npv[-2]), int(npv[-1]),
                         float(states["numpy_gauss"].item())))
    if torch.cuda.is_available() and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"].cpu().to(torch.uint8))
    tracker = {k[len("tracker."):]: v.cpu().to(torch.uint8) for k, v in states.items() if k.startswith("tracker.")}
    if tracker:
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


def _rng_sharded(states: dict[str, torch.Tensor]) -> dict[str, ShardedTensor]:
    """One row per (pp, tp, dp) rank of a ``[world, n]`` tensor per generator."""
    layout = _layout()
    world = layout["pp"] * layout["tp"] * layout["dp"]
    index = (
        parallel_state.get_pipeline_model_parallel_rank() * layout["tp"] * layout["dp"]
        + parallel_state.get_tensor_model_parallel_rank() * layout["dp"]
        + parallel_state.get_data_parallel_rank()
    )
    return {
        name: ShardedTensor.from_rank_offsets(f"rng_state.{name}", t.detach().clone().unsqueeze(0), (0, index, world))
        for name, t in states.items()
    }


# --- the state dict ------------------------------------------------------------------------

def _model_key(i: int, n: int) -> str:
    return "model" if n == 1 else f"model{i}"


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module"):
        model = model.module
    return model


def _sharded_state(model_chunks: Sequence[torch.nn.Module], optimizer, with_rng: bool, is_loading: bool) -> dict:
    state: dict[str, Any] = {}
    for i, chunk in enumerate(model_chunks):
        state[_model_key(i, len(model_chunks))] = _unwrap(chunk).sharded_state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading)
    if with_rng:
        state["rng_state"] = _rng_sharded(_rng_tensors())
    return state


def save_checkpoint(
    save_dir: str | os.PathLike,
    iteration: int,
    model_chunks: Sequence[torch.nn.Module],
    model_config: ModelConfig,
    optimizer=None,
    scheduler=None,
    extra: Optional[dict] = None,
) -> Path:
    """Save on every rank (collective); returns the final iteration directory."""
    root = Path(save_dir)
    final = iteration_dir(root, iteration)
    tmp = final.with_name(final.name + ".tmp")
    if _rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # debris of an interrupted save
        tmp.mkdir()
    _barrier()
    state = _sharded_state(model_chunks, optimizer, with_rng=True, is_loading=False)
    dist_checkpointing.save(state, str(tmp))
    if _rank() == 0:
        train_state = dict(
            iteration=iteration,
            layout=_layout(),
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            **(extra or {}),
        )
        atomic_write_text(tmp / MODEL_CONFIG, model_config.to_json(), fsync=True)
        atomic_write_text(tmp / TRAIN_STATE, json.dumps(train_state, indent=2, sort_keys=True, default=str), fsync=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / TRACKER, str(iteration), fsync=True)
    _barrier()
    return final


# --- loading ---------------------------------------------------------------------------------

_DCP = "torch.distributed.checkpoint."


class _MetadataUnpickler(pickle.Unpickler):
    """Admits exactly the classes torch.distributed.checkpoint writes into ``.metadata``
    (dataclasses, enums, dtypes): nothing callable with side effects."""

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


def _check_metadata_safe(ckpt: Path) -> None:
    meta = ckpt / ".metadata"
    if not meta.exists():
        raise CheckpointError(f"{ckpt}: no .metadata file (incomplete or not a torch_dist checkpoint)")
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(io.BytesIO(f.read())).load()
    except CheckpointError as err:
        raise CheckpointError(f"{meta}: {err}") from None
    except Exception as err:  # truncated / corrupt pickle
        raise CheckpointError(f"{meta}: unreadable checkpoint metadata ({type(err).__name__}: {err})") from None


def resolve_iteration(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> Optional[int]:
    """The iteration to load: the given one, else the tracker's; None if nothing was saved."""
    root = Path(load_dir)
    if iteration is not None:
        return iteration
    tracker = root / TRACKER
    if not tracker.exists():
        return None
    text = tracker.read_text().strip()
    if not text.isdigit():
        raise CheckpointError(f"{tracker}: expected an iteration number, found {text[:40]!r}")
    return int(text)


def read_model_config(ckpt: Path) -> ModelConfig:
    path = ckpt / MODEL_CONFIG
    if not path.exists():
        raise CheckpointError(f"{ckpt}: missing {MODEL_CONFIG}")
    try:
        return ModelConfig.from_dict(json.loads(path.read_text()), source=str(path))
    except (json.JSONDecodeError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: {err}") from None


def read_train_state(ckpt: Path) -> dict:
    path = ckpt / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{ckpt}: missing {TRAIN_STATE}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def checkpoint_dir(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> Path:
    it = resolve_iteration(load_dir, iteration)
    if it is None:
        raise CheckpointError(f"{load_dir}: no {TRACKER} (nothing saved there)")
    ckpt = iteration_dir(load_dir, it)
    if not ckpt.is_dir():
        raise CheckpointError(f"{load_dir}: iteration {it} has no directory {ckpt.name}")
    _check_metadata_safe(ckpt)
    return ckpt


def _compare_configs(saved: ModelConfig, current: ModelConfig, ckpt: Path) -> None:
    ignore = {"tokenizer_fingerprint", "extra"}
    diffs = [
        f"{k}: checkpoint {v!r} vs run {getattr(current, k)!r}"
        for k, v in saved.to_dict().items()
        if k not in ignore and getattr(current, k) != v
    ]
    if diffs:
        raise CheckpointError(f"{ckpt}: model does not match the checkpoint: " + "; ".join(diffs))
    if saved.tokenizer_fingerprint and current.tokenizer_fingerprint and \
            saved.tokenizer_fingerprint != current.tokenizer_fingerprint:
        raise CheckpointError(f"{ckpt}: saved with another tokenizer ({saved.tokenizer_fingerprint[:12]} "
                              f"vs {current.tokenizer_fingerprint[:12]})")


def _load(ckpt: Path, sharded: dict) -> dict:
    from torch.distributed.checkpoint.api import CheckpointException  # a BaseException

    try:
        return dist_checkpointing.load(sharded, str(ckpt))
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:
        raise CheckpointError(f"{ckpt}: cannot load ({type(err).__name__}: {err})") from err


def load_checkpoint(
    load_dir: str | os.PathLike,
    model_chunks: Sequence[torch.nn.Module],
    model_config: ModelConfig,
    optimizer=None,
    scheduler=None,
    iteration: Optional[int] = None,
) -> Optional[dict]:
    """Restore model (and optimizer, scheduler, RNG when the layout matches) in place.

    Returns the saved train state, or None when ``load_dir`` holds no checkpoint yet.
    RNG states are per rank, so they are restored only under the same parallel layout;
    model and optimizer reshard (a TP=2 checkpoint loads at TP=1).
    """
    if resolve_iteration(load_dir, iteration) is None:
        return None
    ckpt = checkpoint_dir(load_dir, iteration)
    _compare_configs(read_model_config(ckpt), model_config, ckpt)
    train_state = read_train_state(ckpt)
    same_layout = train_state.get("layout") == _layout()
    sharded = _sharded_state(model_chunks, optimizer, with_rng=same_layout, is_loading=True)
    state = _load(ckpt, sharded)
    for i, chunk in enumerate(model_chunks):
        _unwrap(chunk).load_state_dict(state[_model_key(i, len(model_chunks))], strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and train_state.get("scheduler") is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if same_layout:
        _set_rng_tensors({k: v[0] for k, v in state["rng_state"].items()})
    train_state["rng_restored"] = same_layout
    train_state["checkpoint"] = str(ckpt)
    return train_state


def load_inference_model(load_dir: str | os.PathLike, iteration: Optional[int] = None, bf16: bool = False):
    """Build the saved architecture for the current parallel layout and load its weights.

    Returns ``(model, model_config)`` with the model in eval mode; for scoring and evaluation.
    Pipeline parallelism is not supported here (scoring runs the whole model per rank).
    """
    from megatron_prior.models.builder import build_model

    if parallel_state.get_pipeline_model_parallel_world_size() != 1:
        raise ValueError("load_inference_model needs pipeline parallel size 1")
    ckpt = checkpoint_dir(load_dir, iteration)
    model_config = read_model_config(ckpt)
    model = build_model(model_config, bf16=bf16)
    state = _load(ckpt, {"model": model.sharded_state_dict()})
    model.load_state_dict(state["model"], strict=True)
    model.eval()
    return model, model_config


def checkpoint_hash(load_dir: str | os.PathLike, iteration: Optional[int] = None) -> str:
    """A content hash of a checkpoint's files (for binding scores to the model that made them)."""
    import hashlib

    ckpt = checkpoint_dir(load_dir, iteration)
    h = hashlib.sha256()
    for path in sorted(p for p in ckpt.rglob("*") if p.is_file()):
        h.update(path.relative_to(ckpt).as_posix().encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
