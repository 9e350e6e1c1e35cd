"""Checkpoint metadata (``megatron_prior.checkpoint``, ``training/checkpointing.py``): the
tracker file, ``.metadata`` (through the restricted unpickler and its storage checks),
``model_config.json`` and ``train_state.json`` of a real checkpoint whose tensor files stay
as saved; read in the order a load reads them."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import CHECKPOINT_ITERATION, Corpus
from megatron_prior.checkpoint import (
    MODEL_CONFIG,
    TRACKER,
    CheckpointError,
    checkpoint_dir,
    iteration_dir,
    read_model_config,
)
from megatron_prior.training.checkpointing import TRAIN_STATE, read_train_state

ERRORS = (CheckpointError,)


def _paths(root: str) -> list[Path]:
    ckpt = iteration_dir(root, CHECKPOINT_ITERATION)
    return [Path(root, TRACKER), ckpt / ".metadata", ckpt / MODEL_CONFIG, ckpt / TRAIN_STATE]


def seeds(corpus: Corpus) -> list[bytes]:
    return [pack(0, [p.read_bytes() for p in _paths(corpus.checkpoint)])]


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    root = os.path.join(workdir, "save")
    shutil.copytree(iteration_dir(corpus.checkpoint, CHECKPOINT_ITERATION), iteration_dir(root, CHECKPOINT_ITERATION))
    paths = _paths(root)

    def one(data: bytes) -> None:
        _, parts = unpack(data, len(paths))
        write_files([str(p) for p in paths], parts)
        ckpt = checkpoint_dir(root)
        config = read_model_config(ckpt)
        assert config.image_sequence_length >= 0 and type(config.to_json()) is str
        state = read_train_state(ckpt)
        assert isinstance(state, dict)

    return one
