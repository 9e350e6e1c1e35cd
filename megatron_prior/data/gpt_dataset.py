"""megatron-core's GPTDataset with sample packing and PRIOR's per-token loss weights.

``PackedGPTDataset`` is a ``GPTDataset`` (same document, sample and shuffle indices, same
tokens, labels, masks and position ids, built by ``BlendedMegatronDatasetBuilder`` so blends
and splits work as usual) that can also pack whole documents into rows
(``pack_samples``): each epoch's documents, shuffled, fill rows of ``sequence_length + 1``
tokens in order (``packing.shuffled_rows``), a document never cut across rows (one longer
than a row is cut at the row's end, as an unpacked row would cut it), the position ids
restarting at every document and at the padding, which the model side turns into attention
kept within each document (``megatron_prior.models.packed``). Its rows, packed or not, also
count their padding (``padding_positions``, input positions holding the pad token).

``WeightedGPTDataset`` is a ``PackedGPTDataset`` whose low-level dataset is a
``WeightedIndexedDataset``. Each sample also carries ``loss_weights`` (float32, aligned with
``labels``, 0 where the loss is masked) from the packer, by the config's ``packing.Weighting``
(PRIOR, MI or CAL), with each caption normalised over all its loss tokens, ``token_kinds`` when
the corpus has a ``.kinds`` companion, and with ``reference_logprobs`` the reference log-prob
of each label (``ref_logprobs``, for Rho-1). The
per-caption normalisers are computed once per corpus and setting, and shared by the splits
built on it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

import numpy as np
import torch
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_prior.data import packing
from megatron_prior.data.formats import TOKEN_DTYPE_CODES, read_index
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset

log = logging.getLogger(__name__)

@dataclass
class PackedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig plus sample packing."""

    pack_samples: bool = False
    """Rows of whole documents, attention kept within each (``--pack-samples``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.pack_samples and not self.add_extra_token_to_sequence:
            raise ValueError("pack_samples needs add_extra_token_to_sequence=True (a row is sequence_length + 1 "
                             "tokens: inputs and labels shifted by one)")


@dataclass
class WeightedGPTDatasetConfig(PackedGPTDatasetConfig):
    """PackedGPTDatasetConfig plus the token weighting's settings."""

    prior_alpha: float = 1.0
    """Exponent of the token weight ``(1 - p_ref) ** alpha``; the paper uses 1, > 2 hurts."""

    loss_weighting: str = "prior"
    """Which ``packing.Weighting`` makes ``loss_weights``: prior, mi or cal."""

    mi_floor: float = 0.1
    """MI's floor: ``w = max(pmi, mi_floor)``."""

    reference_logprobs: bool = False
    """Samples also carry ``ref_logprobs`` (the reference log-prob per label)."""

    packer_threads: Optional[int] = None
    """Threads of one batched packing call (``__getitems__``); default: up to 8 cores.
    Single samples pack on one thread (DataLoader workers already run in parallel)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.add_extra_token_to_sequence:
            raise ValueError("WeightedGPTDatasetConfig needs add_extra_token_to_sequence=True "
                             "(loss weights are aligned with labels = tokens shifted by one)")
        _ = self.weighting  # its constructor refuses settings out of range

    @property
    def weighting(self) -> packing.Weighting:
        return packing.Weighting(self.loss_weighting, self.prior_alpha, self.mi_floor)


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


class PackedGPTDataset(GPTDataset):
    """A GPTDataset whose rows can be whole documents packed together (``pack_samples``)."""

    def __init__(self, indexed_dataset, dataset_path: Optional[str], indexed_indices: np.ndarray,
                 num_samples: Optional[int], index_split, config: PackedGPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        self._flat: Optional[tuple[np.ndarray, np.ndarray]] = None
        if config.pack_samples:
            self._build_rows()

    def _build_rows(self) -> None:
        """Rows of whole documents; in the packer's terms, row ``r`` is sample ``2 r`` of
        ``row_sample_index`` (its first document's start, its last document's last token)."""
        row = self.config.sequence_length + 1
        lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)
        documents = np.asarray(self.indices, dtype=np.int64)
        documents = documents[lengths[documents] > 0]  # an empty document holds no sample
        if self.num_samples and not len(documents):
            raise ValueError(f"{self.dataset.path_prefix}: no documents in the {self.index_split.name} split")
        longer = int((lengths[documents] > row).sum())
        if longer:
            # Unpacked rows continue a long document in the next sample; a packed row holds
            # whole documents, so such a document is cut where its row ends.
            log.warning("%s: %d of %d documents of the %s split are longer than a packed row (--seq-length + 1 = "
                        "%d tokens): each is cut at its row's end", self.dataset.path_prefix, longer, len(documents),
                        self.index_split.name, row)
        self.row_documents, starts = packing.shuffled_rows(
            documents, self.num_samples, self.config.random_seed,
            costs=np.minimum(lengths[documents], row), budget=row)
        last = starts[1:] - 1
        self.row_sample_index = np.zeros((2 * (len(starts) - 1), 2), dtype=np.int64)
        self.row_sample_index[0::2, 0] = starts[:-1]
        self.row_sample_index[1::2, 0] = last
        self.row_sample_index[1::2, 1] = lengths[self.row_documents[last]] - 1
        self.row_starts = starts

    def __len__(self) -> int:
        if self.config.pack_samples:
            return len(self.row_starts) - 1
        return super().__len__()

    def _flat_tokens(self) -> tuple[np.ndarray, np.ndarray]:
        """The corpus as one memory-mapped token array and its document offsets."""
        if self._flat is None:
            if isinstance(self.dataset, WeightedIndexedDataset):
                self._flat = self.dataset.token_array, self.dataset.sequence_offsets
            else:
                info = read_index(self.dataset.path_prefix, TOKEN_DTYPE_CODES)
                self._flat = info.data(), info.offsets()
        return self._flat

    def __getstate__(self) -> dict:
        # A DataLoader worker reopens the memory map rather than receiving a copy of the corpus.
        return {**self.__dict__, "_flat": None}

    def packer_rows(self, indices: List[Optional[int]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(document_index, sample_index, samples)`` of ``indices`` in the packer's terms
        (megatron-core's batch-padding index None reads sample 0, as GPTDataset does)."""
        indices = [0 if i is None else i for i in indices]
        if self.config.pack_samples:
            return self.row_documents, self.row_sample_index, 2 * np.asarray(indices, dtype=np.int64)
        return self.document_index, self.sample_index, np.asarray(self.shuffle_index[indices], dtype=np.int64)

    def _row_documents(self, idx: int) -> np.ndarray:
        return self.row_documents[self.row_starts[idx]:self.row_starts[idx + 1]]

    def _query_document_sample_shuffle_indices(self, idx: int):
        """A packed row's tokens (``sequence_length + 1``, padded) to GPTDataset.__getitem__."""
        if not self.config.pack_samples:
            return super()._query_document_sample_shuffle_indices(idx)
        tokens, offsets = self._flat_tokens()
        documents, sample_index, samples = self.packer_rows([idx])
        row = packing.pack_values(tokens, offsets, documents, sample_index, samples, self.config.sequence_length,
                                  0, num_threads=1)[0].astype(np.int64)
        parts = self._row_parts(idx)
        row[int(parts.sum()):] = self._pad_token_id
        ids = self._row_documents(idx)
        # The documents' lengths too: megatron-core's inter_document_masking reads them.
        return row, ids, parts.tolist()

    def _row_parts(self, idx: int) -> np.ndarray:
        """Tokens each document of row ``idx`` puts in it (the last one cut at the row's end)."""
        lengths = np.asarray(self.dataset.sequence_lengths, dtype=np.int64)[self._row_documents(idx)]
        ends = np.minimum(np.cumsum(lengths), self.config.sequence_length + 1)
        return np.diff(ends, prepend=0)

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        sample = super().__getitem__(idx)
        s, row = self.config.sequence_length, 0 if idx is None else idx
        if self.config.pack_samples:
            parts = self._row_parts(row)
            # Every document, and the padding after them, starts again at position 0.
            starts = np.repeat(np.cumsum(parts) - parts, parts)
            positions = np.arange(s + 1) - np.concatenate([starts, np.full(s + 1 - len(starts), len(starts))])
            sample["position_ids"] = torch.from_numpy(positions[:s])
        else:
            # megatron-core pads an unpacked row only where the documents run out, and its tokens
            # no longer show the pad (mapped to id 0): the row's document parts say how long it is.
            _, _, parts = super()._query_document_sample_shuffle_indices(row)
        sample["padding_positions"] = torch.tensor(s - min(s, int(np.sum(parts))))
        return sample


class WeightedGPTDataset(PackedGPTDataset):
    """A PackedGPTDataset whose samples also hold ``loss_weights`` (and ``token_kinds``)."""

    def __init__(self, indexed_dataset: WeightedIndexedDataset, dataset_path: Optional[str],
                 indexed_indices: np.ndarray, num_samples: Optional[int], index_split,
                 config: WeightedGPTDatasetConfig) -> None:
        super().__init__(indexed_dataset, dataset_path, indexed_indices, num_samples, index_split, config)
        eod = config.tokenizer.eod
        if config.eod_mask_loss:
            # The packer counts a document's first token as following an EOD; megatron-core
            # masks after the EOD actually there. They agree when every document ends in one.
            check_documents_end_in_eod(indexed_dataset, eod, "eod_mask_loss")
        self.scales = indexed_dataset.document_scales(config.weighting, eod, config.eod_mask_loss,
                                                      self._pad_token_id)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: WeightedGPTDatasetConfig) -> WeightedIndexedDataset:
        return WeightedIndexedDataset(dataset_path,
                                      tokenizer_fingerprint=getattr(config.tokenizer, "fingerprint", None),
                                      vocab_size=config.tokenizer.vocab_size)

    def _pack(self, indices: List[Optional[int]], threads: int) -> tuple[np.ndarray, np.ndarray, dict]:
        """Token rows ``[b, s + 1]``, loss weights ``[b, s]`` (labels-aligned) and the other
        labels-aligned rows ``[b, s]``: ``token_kinds``, ``ref_logprobs`` (where configured)."""
        ds: WeightedIndexedDataset = self.dataset
        cfg: WeightedGPTDatasetConfig = self.config
        documents, sample_index, samples = self.packer_rows(indices)
        scores, minus = ds.weighting_scores(cfg.weighting)
        tokens, weights = packing.pack_batch(
            ds.token_array, scores, ds.sequence_offsets, self.scales, documents, sample_index, samples,
            cfg.sequence_length, cfg.weighting, cfg.tokenizer.eod, cfg.eod_mask_loss, self._pad_token_id,
            num_threads=threads, minus=minus)
        extra = {}
        if ds.has_kinds:
            extra["token_kinds"] = packing.pack_values(ds.kind_array, ds.sequence_offsets, documents, sample_index,
                                                       samples, cfg.sequence_length, 0, num_threads=threads)[:, 1:]
        if cfg.reference_logprobs:
            extra["ref_logprobs"] = packing.pack_values(ds.logprob_array, ds.sequence_offsets, documents,
                                                        sample_index, samples, cfg.sequence_length, 0.0,
                                                        num_threads=threads)[:, 1:]
        return tokens, weights, extra

    def _with_weights(self, samples: List[Dict[str, torch.Tensor]], indices: List[Optional[int]],
                      threads: int) -> List[Dict[str, torch.Tensor]]:
        # GPTDataset packs the batch-padding sample (idx None) from sample 0 and masks it.
        _, weights, extra = self._pack(indices, threads)
        for row, (sample, idx) in enumerate(zip(samples, indices)):
            w = torch.from_numpy(weights[row])
            sample["loss_weights"] = torch.zeros_like(w) if idx is None else w
            if "token_kinds" in extra:
                sample["token_kinds"] = torch.from_numpy(extra["token_kinds"][row].astype(np.int64))
            if "ref_logprobs" in extra:
                sample["ref_logprobs"] = torch.from_numpy(extra["ref_logprobs"][row])
        return samples

    def __getitem__(self, idx: Optional[int]) -> Dict[str, torch.Tensor]:
        return self._with_weights([super().__getitem__(idx)], [idx], threads=1)[0]

    def __getitems__(self, indices: List[Optional[int]]) -> List[Dict[str, torch.Tensor]]:
        """A whole batch, its weights packed in one call (torch's DataLoader uses this)."""
        samples = [super(WeightedGPTDataset, self).__getitem__(i) for i in indices]
        threads = self.config.packer_threads or packing.default_threads()
        return self._with_weights(samples, list(indices), threads)
