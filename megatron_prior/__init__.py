"""megatron-prior: PRIOR (image-related-token-prioritised) vision-language pre-training on megatron-core."""

__version__ = "0.1.0"
