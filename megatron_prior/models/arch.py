"""An architecture as one object: how it is built, how a batch becomes per-token loss, what
its configuration must satisfy and how many positions an image takes.

In the spirit of torchtitan's ``TrainSpec`` and megatron-core's ``ModuleSpec``: the trainer,
evaluation, sweeps, demo and reports know an architecture only by its name in ``ARCHS`` and
through these fields, never by comparing names. Each architecture is defined and registered in
its own model file (``gpt.py``, ``hlvlm.py``, ``ulvlm.py``); ``megatron_prior.models`` imports
every module that registers one, so importing anything from the package fills the registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

from megatron.core import parallel_state

if TYPE_CHECKING:  # annotations only: config.py imports this module to validate itself
    import argparse

    import torch
    from megatron.core.transformer import TransformerConfig

    from megatron_prior.models.config import ModelConfig


@dataclass(frozen=True)
class BuildContext:
    """What a rank builds besides the architecture: its pipeline stage and its kernels."""

    pre_process: bool            # first pipeline stage: embeddings and the image input
    post_process: bool           # last pipeline stage: output layer and per-token loss
    vp_stage: Optional[int] = None
    use_te: bool = False         # Transformer Engine's layer spec (FP8 needs it)
    bf16: bool = False

    @classmethod
    def for_this_rank(cls, vp_stage: Optional[int] = None, use_te: bool = False,
                      bf16: bool = False) -> "BuildContext":
        """The context of this rank's (virtual) pipeline stage, from megatron-core's
        parallel_state: the one place a first or last stage is decided."""
        return cls(pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                   post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                   vp_stage=vp_stage, use_te=use_te, bf16=bf16)


def _no_problems(cfg: "ModelConfig") -> list[str]:
    return []


def _no_image(cfg: "ModelConfig") -> int:
    return 0


def _no_flag_problem(args: "argparse.Namespace") -> Optional[str]:
    return None


@dataclass(frozen=True)
class Arch:
    """One architecture.

    ``build(cfg, language_config, ctx)`` returns this rank's model chunk, whose language model
    is a megatron-core ``GPTModel`` (the builder installs the loss head on it).
    ``forward_loss(model, batch)`` runs the chunk on a training batch (``tokens``, ``labels``,
    ``position_ids``, ``images`` when ``needs_images``; ``attention_mask`` and
    ``packed_seq_params`` when the batch has them) and returns, on the last pipeline stage, the
    per-token cross-entropy ``[b, image_sequence_length - 1 + s]`` (``[b, s]`` without image),
    elsewhere the hidden states the schedule passes on. ``validate_config`` lists what is wrong
    with a ``ModelConfig`` of this architecture. ``only_flags`` are trainer flags (argparse
    dests) that only this architecture takes; ``check_args(args)`` names a flag combination it
    cannot be built with (e.g. a tensor-parallel size its vision encoder's heads do not divide).
    """

    name: str
    display_name: str
    description: str
    needs_images: bool
    build: Callable[["ModelConfig", "TransformerConfig", BuildContext], "torch.nn.Module"]
    forward_loss: Callable[["torch.nn.Module", dict], "torch.Tensor"]
    validate_config: Callable[["ModelConfig"], list[str]] = _no_problems
    image_sequence_length: Callable[["ModelConfig"], int] = _no_image
    supports_virtual_pipeline: bool = False
    supports_sequence_parallel: bool = False  # the input stream is GPTModel's own embedding, which SP scatters
    cuts_at_max_position_embeddings: bool = False  # the combined sequence is cut there (LLaVAModel)
    only_flags: tuple[str, ...] = ()
    check_args: Callable[["argparse.Namespace"], Optional[str]] = _no_flag_problem


ARCHS: dict[str, Arch] = {}


def register(arch: Arch) -> Arch:
    """Add ``arch`` to ``ARCHS`` (its name must be new); returns it."""
    if arch.name in ARCHS:
        raise ValueError(f"architecture {arch.name!r} is already registered")
    ARCHS[arch.name] = arch
    return arch


def get_arch(name: str) -> Arch:
    try:
        return ARCHS[name]
    except KeyError:
        raise ValueError(f"unknown architecture {name!r}; known: {', '.join(ARCHS)}") from None
