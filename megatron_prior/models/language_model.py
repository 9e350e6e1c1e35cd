"""Initialising the language model of any architecture from a GPT checkpoint (``--lm-load``).

The source is a checkpoint of the ``gpt`` architecture: trained here, or converted from Hugging
Face by ``tools/convert_hf_to_megatron.py``. Its tensors are GPTModel's own
(``embedding.*``, ``decoder.*``, ``output_layer.*``), which is what the language model inside
every architecture holds (the LVLMs under ``language_model.``), so they are read straight into
that GPTModel by the safe loader of ``megatron_prior.checkpoint``, resharded by megatron-core to
this run's tensor/pipeline layout. Weights only: no optimizer, iteration or RNG state.

Every tensor must have the checkpoint's global shape, with one exception: the vocabulary may
grow (a tokenizer with the LVLM's image markers added, Megatron's padding to a multiple of 128
x TP). Then the checkpoint's rows go to the first rows of the embedding and output layer and
the rows beyond keep their initialisation.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.models.gpt import GPTModel

from megatron_prior.checkpoint import CheckpointError, checkpoint_dir, load_state, load_weights, read_metadata, unwrap

# The tensors whose first axis is the vocabulary (GPTModel's names).
VOCAB_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight")


def language_model_of(model: torch.nn.Module) -> GPTModel:
    """The one GPTModel inside a model chunk (the chunk itself for ``gpt``)."""
    found = [m for m in unwrap(model).modules() if isinstance(m, GPTModel)]
    if len(found) != 1:
        raise ValueError(f"expected one GPTModel in the model, found {len(found)}")
    return found[0]


def _whole(sharded: ShardedTensor, shape: tuple) -> ShardedTensor:
    """A request for the whole checkpoint tensor of ``shape`` on this rank. One rank of the
    tensor's main replicas (tensor-parallel rank 0's) is its main replica, so megatron-core's
    integrity check sees it read exactly once."""
    replica = sharded.replica_id if isinstance(sharded.replica_id, tuple) else (sharded.replica_id,)
    return ShardedTensor.from_rank_offsets(
        sharded.key, torch.empty(shape, dtype=sharded.data.dtype),
        replica_id=(*replica, parallel_state.get_tensor_model_parallel_rank()))


def _request(lm: GPTModel, ckpt: Path) -> tuple[dict, dict]:
    """The sharded state dict to read and, for the vocabulary tensors that grow, the global row
    offset of this rank's shard; shapes checked against the checkpoint's metadata."""
    saved = {k: tuple(v.size) for k, v in read_metadata(ckpt).state_dict_metadata.items() if hasattr(v, "size")}
    request, grown = {}, {}
    for name, sharded in lm.sharded_state_dict().items():
        if not isinstance(sharded, ShardedTensor):
            request[name] = sharded
            continue
        shape, want = saved.get(sharded.key), tuple(sharded.global_shape)
        if shape is None:
            raise CheckpointError(f"{ckpt}: no tensor {sharded.key} (the language model's {name}); is it a "
                                  "checkpoint of --model gpt?")
        if shape != want:
            if not (name in VOCAB_ROWS and shape[1:] == want[1:] and shape[0] < want[0]):
                raise CheckpointError(f"{ckpt}: tensor {sharded.key} has shape {list(shape)}, the language model's "
                                      f"{name} has {list(want)}")
            request[name] = _whole(sharded, shape)
            grown[name] = sharded.global_offset[sharded.prepend_axis_num]
        else:
            request[name] = sharded
    return request, grown


def load_language_model(model: torch.nn.Module, load_dir: str | os.PathLike) -> int:
    """Copy a GPT checkpoint's weights into ``model``'s language model (this rank's part);
    returns the number of tensors loaded. Collective over the ranks."""
    lm = language_model_of(model)
    ckpt = checkpoint_dir(load_dir)
    request, grown = _request(lm, ckpt)
    state = load_state(ckpt, {"model": request})["model"]
    local = lm.state_dict(keep_vars=True)
    for name, start in grown.items():
        # The checkpoint's rows that fall into this rank's shard; the rest keep their values.
        full, param = state[name], local[name]
        rows = max(0, min(full.shape[0] - start, param.shape[0]))
        state[name] = param.detach().clone()
        state[name][:rows] = full[start:start + rows]
    load_weights(lm, state, ckpt)
    return len(state)
