"""Image-caption samples for the LVLMs: one caption a sample, padded, with PRIOR's weights.

A ``CaptionDataset`` is a megatron-core ``MegatronDataset`` (built by
``BlendedMegatronDatasetBuilder``, so splits and blends work) over a
``WeightedIndexedDataset`` whose documents are captions ending in EOD, and the image store
``T.images`` beside it (image ``i`` <-> caption ``i``). Sample layout (contracts):

    tokens       = [<image>, c0, ..., c_{n-1}, <eod>, pad, ...][:s]
    labels       = [c0, ..., c_{n-1}, <eod>, pad, ...][:s]
    loss_mask    = 1 on caption labels, 0 on padding
    loss_weights = PRIOR multipliers over the whole caption (normalised over all its loss
                   tokens, even when the caption is cut at s), aligned with labels
    position_ids = 0 .. s-1
    images       = float32 [3, H, W], (pixel / 255 - mean) / std
    token_kinds  = per-label kind ids, when the corpus has a ``.kinds`` companion

No attention mask is produced: the models build theirs for the combined image + text length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_prior.data import packing
from megatron_prior.data.gpt_dataset import check_documents_end_in_eod
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset


@dataclass
class CaptionDatasetConfig(BlendedMegatronDatasetConfig):
    """BlendedMegatronDatasetConfig plus PRIOR's alpha and the image normalisation."""

    prior_alpha: float = 1.0
    """Exponent of the token weight ``(1 - p_ref) ** alpha``."""

    image_mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel mean subtracted from pixels scaled to [0, 1] (CLIP: 0.481, 0.458, 0.408)."""

    image_std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel divisor after the mean (CLIP: 0.269, 0.261, 0.276)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is None or getattr(self.tokenizer, "image_token_id", None) is None:
            raise ValueError("CaptionDatasetConfig needs a tokenizer with an image_token_id")
        packing.check_alpha(self.prior_alpha)
        if self.sequence_length < 2:
            raise ValueError("sequence_length must be at least 2 (the image placeholder and a token)")


class CaptionDataset(MegatronDataset):
    """Captions with their images, in the layout the H-LVLM and U-LVLM take."""

    def __init__(self, dataset: WeightedIndexedDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: CaptionDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        tok = config.tokenizer
        check_documents_end_in_eod(dataset, tok.eod, "a caption dataset")
        self.images = dataset.open_images()
        # Every caption token is a loss token (c0 is predicted from the image): no EOD masking.
        self.scales = dataset.document_scales(config.prior_alpha, tok.eod, False, self._pad_token_id)
        self.sample_documents = self._sample_documents()
        self._mean = np.asarray(config.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.image_std, dtype=np.float32).reshape(3, 1, 1)

    def _sample_documents(self) -> np.ndarray:
        """The caption of each sample: shuffled epochs of this split's captions."""
        n = len(self.indices)
        wanted = n if self.num_samples is None else self.num_samples
        if n == 0 and wanted:
            raise ValueError(f"{self.dataset.path_prefix}: no captions in the {self.index_split.name} split")
        if wanted == 0:
            return np.zeros(0, dtype=np.int32)
        rng = np.random.RandomState(self.config.random_seed)
        epochs = -(-wanted // n)
        order = np.concatenate([rng.permutation(self.indices) for _ in range(epochs)])
        return order[:wanted].astype(np.int32 if len(self.dataset) < 2**31 else np.int64)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: WeightedIndexedDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: CaptionDatasetConfig) -> WeightedIndexedDataset:
        return WeightedIndexedDataset(dataset_path,
                                      tokenizer_fingerprint=getattr(config.tokenizer, "fingerprint", None),
                                      vocab_size=config.tokenizer.vocab_size)

    def __len__(self) -> int:
        return len(self.sample_documents)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        # idx None is megatron's batch-padding sample: any caption, no loss.
        doc = int(self.sample_documents[0 if idx is None else idx])
        caption, logprobs = self.dataset[doc]
        s, pad = self.config.sequence_length, self._pad_token_id
        n = min(len(caption), s)
        text = np.full(s + 1, pad, dtype=np.int64)
        text[0] = self.config.tokenizer.image_token_id
        text[1:1 + n] = caption[:n]
        tokens, labels = text[:-1], text[1:]

        keep = caption[:n].astype(np.int64) != pad
        loss_mask = np.zeros(s, dtype=np.float32)
        loss_mask[:n] = keep
        weights = np.zeros(s, dtype=np.float32)
        scale = self.scales[doc]
        m = np.ones(n) if scale < 0 else scale * packing.token_weights(logprobs[:n], self.config.prior_alpha)
        weights[:n] = np.where(keep, m, 0.0)
        if idx is None:
            loss_mask[:] = 0.0
            weights[:] = 0.0
        # As GPTDataset does: a pad id outside the vocabulary must still embed.
        tokens = np.where(tokens == pad, 0, tokens)
        labels = np.where(labels == pad, 0, labels)

        image = np.asarray(self.images[doc], dtype=np.float32).transpose(2, 0, 1) / 255.0
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "loss_weights": torch.from_numpy(weights),
            "position_ids": torch.arange(s, dtype=torch.int64),
            "images": torch.from_numpy((image - self._mean) / self._std),
        }
        if self.dataset.has_kinds:
            kinds = np.zeros(s, dtype=np.int64)
            kinds[:n] = self.dataset.kinds[doc][:n]
            sample["token_kinds"] = torch.from_numpy(kinds)
        return sample
