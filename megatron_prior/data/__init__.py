"""Weighted indexed datasets, GPT/caption datasets and the packer that feeds PRIOR's weights."""
