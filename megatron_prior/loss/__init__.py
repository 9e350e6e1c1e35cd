"""PRIOR's losses, the kernel layer: it imports nothing else from megatron_prior.

- ``cross_entropy``: vocab-parallel cross-entropy with per-token weights;
- ``fused_linear_ce``: the same fused with the output layer (no logits held);
- ``loss_func``: how each ``--loss`` weighs the per-token cross-entropy in training.

The package itself only names the losses, so that the argument parser can offer them
without importing torch or megatron-core.
"""

# ntp: plain next-token prediction, every loss token weighs 1; prior, mi, cal: the packer's
# per-caption normalised multipliers (``batch["loss_weights"]``) of PRIOR, floored pointwise mutual
# information and CAL; rho1: Rho-1's top fraction of each micro-batch's tokens by excess loss.
LOSSES: tuple[str, ...] = ("ntp", "prior", "mi", "rho1", "cal")
# The losses whose token weights the data pipeline makes (``data.packing.WEIGHTING_SCORES``).
PACKED_WEIGHT_LOSSES: tuple[str, ...] = ("prior", "mi", "cal")
