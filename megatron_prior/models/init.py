"""Weight initialisation that does not depend on the parallel layout.

Megatron seeds each pipeline stage differently and draws weights in construction order, so
the same model starts from different weights at PP=1 and PP=2. Here every parameter is drawn
as its full global tensor (as megatron-core's sharded state dict names and shapes it) from a
generator seeded by the run seed and the tensor's name, and each rank keeps its shard. Any
TP/PP/DP layout therefore starts from the same weights, which is what makes parallel runs
comparable with single-process ones, and a run reproducible on another cluster shape.

Distributions follow megatron-core: normal(0, std) weights, normal(0, std / sqrt(2 L)) for
the output projections of each layer (linear_proj, linear_fc2), zero biases, unit norms.
"""

from __future__ import annotations

import hashlib
import math

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor


def sharded_tensors(model: torch.nn.Module) -> list:
    return [v for v in nested_values(model.sharded_state_dict()) if isinstance(v, ShardedTensor)]


def shard_index(sharded_tensor) -> tuple:
    """Where a ShardedTensor's local data sits inside its global tensor (prepended axes as ints)."""
    p = sharded_tensor.prepend_axis_num
    lead = tuple(sharded_tensor.global_offset[:p])
    rest = tuple(slice(o, o + s) for o, s in zip(sharded_tensor.global_offset[p:], sharded_tensor.local_shape))
    return lead + rest


def parameter_shards(model: torch.nn.Module) -> list:
    """``(key, index, global shape, parameter)`` for every parameter of a megatron model.

    The key and index place the parameter inside the global tensor that a single-process
    model of the same architecture holds under that key, whatever the TP/PP layout.
    """
    by_ptr = {p.data_ptr(): p for p in model.parameters()}
    out = []
    for sh in sharded_tensors(model):
        if isinstance(sh.data, torch.Tensor) and sh.data.data_ptr() in by_ptr:
            out.append((sh.key, shard_index(sh), tuple(sh.global_shape), by_ptr[sh.data.data_ptr()]))
    return out


def _generator(seed: int, key: str) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{key}".encode()).hexdigest()
    return torch.Generator().manual_seed(int(digest[:15], 16))


def global_init(key: str, shape: tuple, seed: int, std: float, num_layers: int) -> torch.Tensor:
    """The full global tensor for ``key`` (float32, CPU)."""
    name = key.rsplit(".", 1)[-1]
    # Norms: "...layernorm.weight", TE's "layer_norm_weight", and the ViT's ln_pre/ln_post
    # (a ViT whose ln_pre starts at ~0 passes no image to the language model).
    is_norm = "norm" in key or any(part.startswith("ln_") for part in key.split("."))
    if is_norm and name in ("weight", "layer_norm_weight"):
        return torch.ones(shape)
    if name in ("bias", "layer_norm_bias"):
        return torch.zeros(shape)
    if key.endswith(("linear_proj.weight", "linear_fc2.weight")):
        std = std / math.sqrt(2.0 * num_layers)
    return torch.randn(shape, generator=_generator(seed, key)) * std


def initialize_weights(model: torch.nn.Module, seed: int, std: float = 0.02, num_layers: int = 1) -> None:
    """Overwrite every parameter shard with its slice of ``global_init``."""
    with torch.no_grad():
        for key, index, shape, param in parameter_shards(model):
            full = global_init(key, shape, seed, std, num_layers)
            param.copy_(full[index].reshape(param.shape).to(param.device, param.dtype))
