"""Megatron-style training: arguments, the loop, checkpoints, logging."""
