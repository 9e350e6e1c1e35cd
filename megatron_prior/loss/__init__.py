"""PRIOR's losses: vocab-parallel weighted cross-entropy (plain and fused with the output
layer), PRIOR weights in torch, and the training ``loss_func`` registry."""

from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
from megatron_prior.loss.fused_linear_ce import fused_linear_weighted_cross_entropy
from megatron_prior.loss.loss_func import loss_names, make_loss_func, register_loss
from megatron_prior.loss.prior_weights import prior_weights

__all__ = [
    "fused_linear_weighted_cross_entropy",
    "loss_names",
    "make_loss_func",
    "prior_weights",
    "register_loss",
    "vocab_parallel_weighted_cross_entropy",
]
