"""PRIOR's losses, the kernel layer: it imports nothing else from megatron_prior.

- ``cross_entropy``: vocab-parallel cross-entropy with per-token weights;
- ``fused_linear_ce``: the same fused with the output layer (no logits held);
- ``loss_func``: how each ``--loss`` weighs the per-token cross-entropy in training.

The package itself only names the losses, so that the argument parser can offer them
without importing torch or megatron-core.
"""

# ntp: plain next-token prediction, every loss token weighs 1; prior: the packer's
# per-caption normalised PRIOR multipliers (``batch["loss_weights"]``).
LOSSES: tuple[str, ...] = ("ntp", "prior")
