"""Image-caption samples for the LVLMs: one caption a row, or several packed, with PRIOR's weights.

A ``CaptionDataset`` is a megatron-core ``MegatronDataset`` (built by
``BlendedMegatronDatasetBuilder``, so splits and blends work) over a
``WeightedIndexedDataset`` whose documents are captions ending in EOD, and the image store
``T.images`` beside it (image ``i`` <-> caption ``i``). Row layout (contracts), for one
caption ``c`` of ``n`` tokens cut to ``m = min(n, s)``:

    tokens       = [<image>, c0, ..., c_{m-1}, pad, ...][:s]
    labels       = [c0, ..., c_{m-1}, pad, ...][:s]
    loss_mask    = 1 on caption labels, 0 on padding
    loss_weights = the weighting's multipliers (PRIOR's, MI's or CAL's: ``packing.Weighting``)
                   over the whole caption (normalised over all its loss tokens, even when the
                   caption is cut at s), aligned with labels
    ref_logprobs = the reference log-prob of each label (0 off captions), with
                   ``reference_logprobs`` (Rho-1's excess loss reads it)
    position_ids = 0 .. s-1
    images       = float32 [3, H, W], (pixel / 255 - mean) / std, H x W the config's
                   ``image_size`` (default: the store's)
    token_kinds  = per-label kind ids, when the corpus has a ``.kinds`` companion
    padding_positions = how many of the row's combined (image + text) input positions are
                   padding, when ``image_sequence_length`` is given

With ``pack_samples`` a row holds several captions, each laid out as above one after the
other (``[<image>, c..., <image>, c'..., pad, ...]``), each caption's position ids starting
again at 0 at its ``<image>`` (the padding continues the last caption's), and ``images`` is
``[k, 3, H, W]`` for its ``k`` captions in row order. The rows are each epoch's captions,
shuffled, filled in order (``packing.shuffled_rows``), never cutting a caption: a caption
costs ``m + image_sequence_length`` positions and a row has ``s + image_sequence_length``, the
combined length of one unpacked row plus the one label-only position at its end, so a caption
that fills an unpacked row fills a packed one. The language model sees the same
``image_sequence_length - 1 + s`` positions packed or not (``megatron_prior.models.packed``
keeps attention within each caption).

No attention mask is produced: the models build theirs for the combined image + text length.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Sequence, Tuple

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
    """BlendedMegatronDatasetConfig plus the token weighting, the image normalisation and packing."""

    prior_alpha: float = 1.0
    """Exponent of the token weight ``(1 - p_ref) ** alpha``."""

    loss_weighting: str = "prior"
    """Which ``packing.Weighting`` makes ``loss_weights``: prior, mi or cal."""

    mi_floor: float = 0.1
    """MI's floor: ``w = max(pmi, mi_floor)``."""

    reference_logprobs: bool = False
    """Samples also carry ``ref_logprobs`` (the reference log-prob per label)."""

    image_mean: Tuple[float, float, float] = (0.0, 0.0, 0.0)
    """Per-channel mean subtracted from pixels scaled to [0, 1] (CLIP: 0.481, 0.458, 0.408)."""

    image_std: Tuple[float, float, float] = (1.0, 1.0, 1.0)
    """Per-channel divisor after the mean (CLIP: 0.269, 0.261, 0.276)."""

    image_size: Optional[int] = None
    """Side of the square images are read at (training's ``--image-size``); None: the store's.
    An encoded store decodes to it; a raw store must already hold it (its pixels are fixed)."""

    image_aspect: Optional[str] = None
    """How images are fitted to that size (``images.ASPECTS``; ``--image-aspect``); None: the
    store's own rule. Likewise refused for a raw store fitted by another rule."""

    image_sequence_length: Optional[int] = None
    """Positions one image takes in the language model's sequence (the model's; it replaces the
    one ``<image>`` token). Given, rows count their padding; ``pack_samples`` needs it."""

    pack_samples: bool = False
    """Several captions with their images per row (``--pack-samples``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer is None or getattr(self.tokenizer, "image_token_id", None) is None:
            raise ValueError("CaptionDatasetConfig needs a tokenizer with an image_token_id")
        _ = self.weighting  # its constructor refuses settings out of range
        if self.sequence_length < 2:
            raise ValueError("sequence_length must be at least 2 (the image placeholder and a token)")
        if self.image_sequence_length is not None and self.image_sequence_length < 1:
            raise ValueError(f"image_sequence_length must be positive, got {self.image_sequence_length}")
        if self.pack_samples and self.image_sequence_length is None:
            raise ValueError("pack_samples needs image_sequence_length (an image's positions count in a row)")

    @property
    def weighting(self) -> packing.Weighting:
        return packing.Weighting(self.loss_weighting, self.prior_alpha, self.mi_floor)


class CaptionDataset(MegatronDataset):
    """Captions with their images, in the layout the H-LVLM and U-LVLM take."""

    def __init__(self, dataset: WeightedIndexedDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: CaptionDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        tok = config.tokenizer
        check_documents_end_in_eod(dataset, tok.eod, "a caption dataset")
        self.images = dataset.open_images().fitted_to(config.image_size, config.image_size, config.image_aspect)
        self.weighting = config.weighting
        # Every caption token is a loss token (c0 is predicted from the image): no EOD masking.
        self.scales = dataset.document_scales(config.weighting, tok.eod, False, self._pad_token_id)
        self.sample_documents, self.row_starts = self._rows()
        self._mean = np.asarray(config.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(config.image_std, dtype=np.float32).reshape(3, 1, 1)

    def _rows(self) -> tuple[np.ndarray, np.ndarray]:
        """The captions in row order (shuffled epochs of this split's) and where rows start."""
        if len(self.indices) == 0 and self.num_samples:
            raise ValueError(f"{self.dataset.path_prefix}: no captions in the {self.index_split.name} split")
        cfg = self.config
        costs, budget = None, 0
        if cfg.pack_samples:
            lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)[self.indices]
            costs = np.minimum(lengths, cfg.sequence_length) + cfg.image_sequence_length
            budget = cfg.sequence_length + cfg.image_sequence_length
        order, starts = packing.shuffled_rows(self.indices, self.num_samples, cfg.random_seed, costs, budget)
        return order.astype(np.int32 if len(self.dataset) < 2**31 else np.int64), starts

    @classmethod
    def of_prefix(cls, prefix: str, tokenizer, sequence_length: int, image_mean: Sequence[float] = (0.0, 0.0, 0.0),
                  image_std: Sequence[float] = (1.0, 1.0, 1.0), num_samples: Optional[int] = None,
                  seed: int = 0, image_size: Optional[int] = None,
                  image_aspect: Optional[str] = None) -> "CaptionDataset":
        """Every caption of one token prefix, unpacked, without megatron-core's split and blend
        machinery: one shuffled epoch (``num_samples`` None), or ``num_samples`` rows drawn from
        as many shuffled epochs as they take; images read at ``image_size`` by ``image_aspect``
        (None: the store's)."""
        config = CaptionDatasetConfig(random_seed=seed, sequence_length=sequence_length, blend=([prefix], None),
                                      split="100,0,0", tokenizer=tokenizer, path_to_cache=None, mmap_bin_files=True,
                                      image_mean=tuple(image_mean), image_std=tuple(image_std), image_size=image_size,
                                      image_aspect=image_aspect)
        low = cls.build_low_level_dataset(prefix, config)
        return cls(low, prefix, np.arange(len(low), dtype=np.int32), num_samples, Split.train, config)

    def row_documents(self, idx: int) -> np.ndarray:
        """The documents (captions, and their images) of row ``idx``, in row order."""
        return self.sample_documents[self.row_starts[idx]:self.row_starts[idx + 1]]

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: WeightedIndexedDataset) -> int:
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: CaptionDatasetConfig) -> WeightedIndexedDataset:
        return WeightedIndexedDataset(dataset_path,
                                      tokenizer_fingerprint=getattr(config.tokenizer, "fingerprint", None),
                                      vocab_size=config.tokenizer.vocab_size)

    def __len__(self) -> int:
        return len(self.row_starts) - 1

    def _image(self, doc: int) -> np.ndarray:
        image = np.asarray(self.images[doc], dtype=np.float32).transpose(2, 0, 1) / 255.0
        return (image - self._mean) / self._std

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        # idx None is megatron's batch-padding sample: any row, no loss.
        row = 0 if idx is None else idx
        cfg, pad = self.config, self._pad_token_id
        s = cfg.sequence_length
        text = np.full(s + 1, pad, dtype=np.int64)
        keep = np.zeros(s + 1, dtype=bool)
        weights = np.zeros(s + 1, dtype=np.float32)
        ref_logprobs = np.zeros(s + 1, dtype=np.float32)
        kinds = np.zeros(s + 1, dtype=np.int64)
        positions = np.arange(s + 1, dtype=np.int64)
        images, at, used = [], 0, 0
        for doc in self.row_documents(row).tolist():
            caption, logprobs = self.dataset[doc]
            m = min(len(caption), s)
            end = at + 1 + m  # <= s + 1: the packing budget
            text[at] = cfg.tokenizer.image_token_id
            text[at + 1:end] = caption[:m]
            positions[at:] = np.arange(s + 1 - at)
            keep[at + 1:end] = caption[:m].astype(np.int64) != pad
            scale = self.scales[doc]
            w = np.ones(m) if scale < 0 else scale * self.dataset.token_weights(doc, self.weighting, m)
            weights[at + 1:end] = np.where(keep[at + 1:end], w, 0.0)
            ref_logprobs[at + 1:end] = logprobs[:m]
            if self.dataset.has_kinds:
                kinds[at + 1:end] = self.dataset.kinds[doc][:m]
            images.append(self._image(doc))
            used += m + (cfg.image_sequence_length or 0)
            at = end
        tokens, labels = text[:-1], text[1:]
        loss_mask = keep[1:].astype(np.float32)
        weights = weights[1:]
        if idx is None:
            loss_mask[:] = 0.0
            weights[:] = 0.0
        # As GPTDataset does: a pad id outside the vocabulary must still embed.
        tokens = np.where(tokens == pad, 0, tokens)
        labels = np.where(labels == pad, 0, labels)
        sample = {
            "tokens": torch.from_numpy(tokens),
            "labels": torch.from_numpy(labels),
            "loss_mask": torch.from_numpy(loss_mask),
            "loss_weights": torch.from_numpy(weights),
            "position_ids": torch.from_numpy(positions[:-1]),
            "images": torch.from_numpy(np.stack(images) if cfg.pack_samples else images[0]),
        }
        if cfg.image_sequence_length is not None:
            combined = cfg.image_sequence_length - 1 + s
            sample["padding_positions"] = torch.tensor(combined - min(combined, used))
        if self.dataset.has_kinds:
            sample["token_kinds"] = torch.from_numpy(kinds[1:])
        if cfg.reference_logprobs:
            sample["ref_logprobs"] = torch.from_numpy(ref_logprobs[1:])
        return sample
