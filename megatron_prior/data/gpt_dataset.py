"""megatron-core's GPTDataset with PRIOR's per-token loss weights.

``WeightedGPTDataset`` is a ``GPTDataset`` (same document, sample and shuffle indices, same
tokens, labels, masks and position ids, built by ``BlendedMegatronDatasetBuilder`` so blends
and splits work as usual) whose low-level dataset is a ``WeightedIndexedDataset``. Each
sample also carries ``loss_weights`` (float32, aligned with ``labels``, 0 where the loss is
masked) from the packer, with each caption normalised over all its loss tokens, and
``token_kinds`` when the corpus has a ``.kinds`` companion. The per-caption normalisers are
computed once per corpus and setting, and shared by the splits built on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_prior.data import packing
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset


@dataclass
class WeightedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus PRIOR's settings."""

    prior_alpha: float = 1.0
    """Exponent of the token weight ``(1 - p_ref) ** alpha``; the paper uses 1, > 2 hurts."""

    packer_threads: Optional[int] = None
    """Threads of one batched packing call (``__getitems__``); default: up to 8 cores.
    Single samples pack on one thread (DataLoader workers already run in parallel)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.add_extra_token_to_sequence:
            raise ValueError("WeightedGPTDatasetConfig needs add_extra_token_to_sequence=True "
                             "(loss weights are aligned with labels = tokens shifted by one)")
        packing.check_alpha(self.prior_alpha)


def check_documents_end_in_eod(dataset: WeightedIndexedDataset, eod: int, why: str) -> None:
    """Raise ValueError unless every non-empty sequence of ``dataset`` ends with ``eod``."""
    lengths = np.asarray(dataset.sequence_lengths)
    ends = dataset.sequence_offsets[1:][lengths > 0] - 1
    last = np.asarray(dataset.token_array[ends]) if len(ends) else np.zeros(0)
    bad = np.flatnonzero(last != eod)
    if len(bad):
        seq = int(np.flatnonzero(lengths > 0)[bad[0]])
        raise ValueError(f"{dataset.path_prefix}: {why} needs documents that end in EOD ({eod}); "
                         f"sequence {seq} ends in token {int(last[bad[0]])} (preprocess with --append-eod)")


class WeightedGPTDataset(GPTDataset):
    """A GPTDataset whose samples also hold ``loss_weights`` (and ``token_kinds``)."""

    def __init__(self, indexed_dataset: WeightedIndexedDataset, dataset_path: Optional[str],
                 indexed_indices: np.ndarray, num_samples: Optional[int], index_split,
                 config: WeightedGPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        eod = config.tokenizer.eod
        if config.eod_mask_loss:
            # The packer counts a document's first token as following an EOD; megatron-core
            # masks after the EOD actually there. They agree when every document ends in one.
            check_documents_end_in_eod(indexed_dataset, eod, "eod_mask_loss")
        self.scales = indexed_dataset.document_scales(config.prior_alpha, eod, config.eod_mask_loss,
                                                      self._pad_token_id)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: WeightedGPTDatasetConfig) -> WeightedIndexedDataset:
        return WeightedIndexedDataset(dataset_path,
                                      tokenizer_fingerprint=getattr(config.tokenizer, "fingerprint", None),
                                      vocab_size=config.tokenizer.vocab_size)

    def _pack(self, rows: np.ndarray, threads: int) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Loss weights ``[b, s]`` (and kinds ``[b, s]``) of shuffled sample rows, labels-aligned."""
        ds: WeightedIndexedDataset = self.dataset
        cfg: WeightedGPTDatasetConfig = self.config
        _, weights = packing.pack_batch(
            ds.token_array, ds.logprob_array, ds.sequence_offsets, self.scales, self.document_index,
            self.sample_index, rows, cfg.sequence_length, cfg.prior_alpha, cfg.tokenizer.eod,
            cfg.eod_mask_loss, self._pad_token_id, num_threads=threads)
        kinds = None
        if ds.has_kinds:
            kinds = packing.pack_values(ds.kind_array, ds.sequence_offsets, self.document_index,
                                        self.sample_index, rows, cfg.sequence_length, 0,
                                        num_threads=threads)[:, 1:]
        return weights, kinds

    def _with_weights(self, samples: List[Dict[str, torch.Tensor]], indices: List[Optional[int]],
                      threads: int) -> List[Dict[str, torch.Tensor]]:
        # GPTDataset packs the batch-padding sample (idx None) from sample 0 and masks it.
        rows = np.asarray([self.shuffle_index[0 if i is None else i] for i in indices], dtype=np.int64)
        weights, kinds = self._pack(rows, threads)
        for row, (sample, idx) in enumerate(zip(samples, indices)):
            w = torch.from_numpy(weights[row])
            sample["loss_weights"] = torch.zeros_like(w) if idx is None else w
            if kinds is not None:
                sample["token_kinds"] = torch.from_numpy(kinds[row].astype(np.int64))
        return samples

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        return self._with_weights([super().__getitem__(idx)], [idx], threads=1)[0]

    def __getitems__(self, indices: List[Optional[int]]) -> List[Dict[str, torch.Tensor]]:
        """A whole batch, its weights packed in one call (torch's DataLoader uses this)."""
        samples = [super(WeightedGPTDataset, self).__getitem__(i) for i in indices]
        threads = self.config.packer_threads or packing.default_threads()
        return self._with_weights(samples, list(indices), threads)
