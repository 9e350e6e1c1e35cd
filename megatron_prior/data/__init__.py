"""Weighted indexed datasets, GPT/caption datasets and the packer that feeds PRIOR's weights."""

from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
from megatron_prior.data.formats import FormatError, ScoreMetadata
from megatron_prior.data.gpt_dataset import WeightedGPTDataset, WeightedGPTDatasetConfig
from megatron_prior.data.images import EncodedImageStore, ImageStore, open_image_store
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.data.writer import WeightedDatasetWriter

__all__ = [
    "CaptionDataset",
    "CaptionDatasetConfig",
    "FormatError",
    "EncodedImageStore",
    "ImageStore",
    "KIND_NAMES",
    "ScoreMetadata",
    "WeightedDatasetWriter",
    "WeightedGPTDataset",
    "WeightedGPTDatasetConfig",
    "WeightedIndexedDataset",
    "open_image_store",
]
