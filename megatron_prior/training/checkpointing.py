"""What resuming a run needs on top of ``megatron_prior.checkpoint``: optimizer, LR
scheduler, every rank's RNG states and the train state.

A training checkpoint is a ``megatron_prior.checkpoint`` checkpoint whose sharded state holds,
beside the model, the optimizer (``optimizer``) and every rank's RNG states as tensors
(``rng_state``, no pickles), with ``train_state.json`` (iteration, consumed samples, LR
scheduler, parallel layout, arguments) beside ``model_config.json``. It is read with the same
safe loader as every other checkpoint.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedTensor

from megatron_prior.checkpoint import (
    CheckpointError,
    checkpoint_dir,
    iteration_dir,
    load_state,
    model_state,
    read_json,
    read_model_config,
    resolve_iteration,
    restore_model,
    save,
)
from megatron_prior.models.config import ModelConfig

TRAIN_STATE = "train_state.json"


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


# --- the training state dict ------------------------------------------------------------------

def _training_state(model_chunks: Sequence[torch.nn.Module], optimizer, with_rng: bool, is_loading: bool) -> dict:
    state = model_state(model_chunks)
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
    train_state = dict(
        iteration=iteration,
        layout=_layout(),
        scheduler=scheduler.state_dict() if scheduler is not None else None,
        **(extra or {}),
    )
    state = _training_state(model_chunks, optimizer, with_rng=True, is_loading=False)
    return save(save_dir, iteration, state, model_config,
                {TRAIN_STATE: json.dumps(train_state, indent=2, sort_keys=True, default=str)})


# --- loading ---------------------------------------------------------------------------------

def read_train_state(ckpt: Path) -> dict:
    """``train_state.json``, with what a resume reads from it checked: the iteration (that of
    its directory), the samples consumed, the LR scheduler's state (an object or null)."""
    state = read_json(ckpt, TRAIN_STATE)
    path = ckpt / TRAIN_STATE
    iteration = state.get("iteration")
    if not (type(iteration) is int and iteration >= 0 and iteration_dir(ckpt.parent, iteration) == ckpt):
        raise CheckpointError(f"{path}: 'iteration' {repr(iteration)[:40]} is not the iteration of {ckpt.name}")
    consumed = state.get("consumed_samples", 0)
    if not (type(consumed) is int and consumed >= 0):
        raise CheckpointError(f"{path}: 'consumed_samples' {repr(consumed)[:40]} is not a natural number")
    for key in ("loss_tokens", "image_positions", "padding_positions"):  # metrics.PositionCounts; null: not counted
        value = state.get(key)
        if not (value is None or (type(value) is int and value >= 0)):
            raise CheckpointError(f"{path}: '{key}' {repr(value)[:40]} is not a natural number or null")
    if not isinstance(state.get("scheduler"), (dict, type(None))):
        raise CheckpointError(f"{path}: 'scheduler' is a {type(state['scheduler']).__name__}, not an object or null")
    return state


def _compare_configs(saved: ModelConfig, current: ModelConfig, ckpt: Path) -> None:
    ignore = {"tokenizer_fingerprint", "extra"}
    diffs = [
        f"{k}: checkpoint {v!r} vs run {getattr(current, k)!r}"
        for k, v in saved.to_dict().items()
        # A checkpoint from before image_aspect was recorded (None) trained on the stores' own
        # rules, which is what a run without --image-aspect reads.
        if k not in ignore and getattr(current, k) != v and not (k == "image_aspect" and v is None)
    ]
    if diffs:
        raise CheckpointError(f"{ckpt}: model does not match the checkpoint: " + "; ".join(diffs))
    if saved.tokenizer_fingerprint and current.tokenizer_fingerprint and \
            saved.tokenizer_fingerprint != current.tokenizer_fingerprint:
        raise CheckpointError(f"{ckpt}: saved with another tokenizer ({saved.tokenizer_fingerprint[:12]} "
                              f"vs {current.tokenizer_fingerprint[:12]})")


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
    state = load_state(ckpt, _training_state(model_chunks, optimizer, with_rng=same_layout, is_loading=True))
    restore_model(model_chunks, state, ckpt)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and train_state.get("scheduler") is not None:
        scheduler.load_state_dict(train_state["scheduler"])
    if same_layout:
        _set_rng_tensors({k: v[0] for k, v in state["rng_state"].items()})
    train_state["rng_restored"] = same_layout
    train_state["checkpoint"] = str(ckpt)
    return train_state
