"""Weighted indexed datasets, GPT/caption datasets and the packer that feeds PRIOR's weights.

The names below load on first use (PEP 562): the datasets import megatron-core, whose import
costs 5-10 s, and the light users of this package (tokenizer training, the demo's generator,
the record readers) must not pay it in every process they start.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CaptionDataset": "caption_dataset",
    "CaptionDatasetConfig": "caption_dataset",
    "FormatError": "formats",
    "ScoreMetadata": "formats",
    "WeightedGPTDataset": "gpt_dataset",
    "WeightedGPTDatasetConfig": "gpt_dataset",
    "EncodedImageStore": "images",
    "ImageStore": "images",
    "open_image_store": "images",
    "KIND_NAMES": "kinds",
    "WeightedIndexedDataset": "weighted_dataset",
    "WeightedDatasetWriter": "writer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
