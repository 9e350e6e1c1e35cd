"""Training and validation batches for this rank, from the position the run has reached.

Samples come from megatron-prior's datasets (megatron-core GPTDataset extended with PRIOR
weights for the text model; one caption per sample with its image for the LVLMs); their
order is fixed by the dataset's own shuffle index and seed. An iteration consumes the
global batch ``[consumed, consumed + global_batch)``; micro-batch ``k`` of data-parallel
rank ``r`` takes rows ``[k * mbs * dp + r * mbs, ... + mbs)`` of it, as Megatron-LM's
pretraining sampler does. The position is a single number (``consumed_samples``), saved
with every checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import argparse
import os
import signal
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import numpy as np
import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.utils import get_blend_from_list

from megatron_prior import parallel
from megatron_prior.data import WeightedGPTDataset, WeightedGPTDatasetConfig
from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
from megatron_prior.data.gpt_dataset import PackedGPTDataset, PackedGPTDatasetConfig
from megatron_prior.loss import PACKED_WEIGHT_LOSSES
from megatron_prior.models.arch import get_arch
from megatron_prior.models.config import ModelConfig
from megatron_prior.tokenizer import load_tokenizer

_INT_KEYS = {"tokens", "labels", "position_ids", "token_kinds"}


def stack(samples: list[dict]) -> dict:
    """Batch-first CPU tensors from a list of samples (runs in DataLoader workers)."""
    batch = {}
    for key in samples[0]:
        if key == "attention_mask":
            continue  # causal masks are built inside the model
        values = [torch.as_tensor(np.asarray(s[key])) for s in samples]
        # A packed row holds its captions' images, [k, 3, H, W]: the batch's are all of them, row
        # after row, the order in which the models give them to the rows' <image> tokens.
        stacked = torch.cat(values) if key == "images" and values[0].dim() == 4 else torch.stack(values)
        if key in _INT_KEYS:
            stacked = stacked.long()
        elif stacked.is_floating_point():
            stacked = stacked.float()
        batch[key] = stacked
    return batch


class MicroBatchSampler(torch.utils.data.Sampler):
    """This data-parallel rank's micro-batches (index lists), from global sample ``start`` on.

    Global micro-batch ``k`` (counting over all ranks) starts at ``start + k * mbs * dp``; rank
    ``r`` takes the ``mbs`` samples after ``r * mbs`` of it. Endless; indices wrap at ``n``.
    """

    def __init__(self, n: int, start: int, micro_batch_size: int, dp_size: int, dp_rank: int):
        self.n, self.start, self.mbs, self.dp, self.rank = n, start, micro_batch_size, dp_size, dp_rank

    def __iter__(self) -> Iterator[list[int]]:
        k = 0
        while True:
            first = self.start + k * self.mbs * self.dp + self.rank * self.mbs
            yield [(first + j) % self.n for j in range(self.mbs)]
            k += 1


# Workers start as fresh interpreters that unpickle the dataset: a fork of a training process
# would copy its communication and thread-pool state (gloo/NCCL threads, OpenMP) mid-flight.
WORKER_START_METHOD = "spawn"


def _ignore_sigterm(worker_id: int) -> None:
    # SLURM signals every process of a job step at the walltime, DataLoader workers included.
    # The training process decides when to stop (--exit-signal-handler: after the iteration it
    # is in) and shuts its workers down itself; a worker that died first would make torch raise
    # in the middle of that iteration. Workers still exit when the training process dies.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class BatchStream:
    """Micro-batches of one dataset, in order, from any sample position.

    Positions wrap at ``length`` (default: the dataset's). One DataLoader (``num_workers``
    processes, prefetching) stays alive while the caller asks for consecutive positions, as
    training does step after step and evaluation does eval after eval (its positions cycle
    through ``length`` = its samples); a jump (a resumed run) restarts it.
    """

    def __init__(self, dataset, micro_batch_size: int, num_workers: int, length: Optional[int] = None):
        self.dataset, self.micro_batch_size, self.num_workers = dataset, micro_batch_size, num_workers
        self.length = length or len(dataset)
        if self.length > len(dataset):
            raise ValueError(f"a stream of {self.length} samples over a dataset of {len(dataset)}")
        self._loader: Optional[Iterator[dict]] = None
        self._position: Optional[int] = None  # sample the next micro-batch starts at, mod length

    def take(self, start: int, count: int) -> Iterator[dict]:
        """``count`` micro-batches of this rank from global sample ``start``, on this rank's device."""
        dp = parallel_state.get_data_parallel_world_size()
        if self._position != start % self.length:
            self._restart(start % self.length, dp)
        device = parallel.device()
        for _ in range(count):
            batch = next(self._loader)
            self._position = (self._position + self.micro_batch_size * dp) % self.length
            yield {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def _restart(self, start: int, dp: int) -> None:
        sampler = MicroBatchSampler(self.length, start, self.micro_batch_size, dp,
                                    parallel_state.get_data_parallel_rank())
        workers = (dict(num_workers=self.num_workers, multiprocessing_context=WORKER_START_METHOD,
                        worker_init_fn=_ignore_sigterm) if self.num_workers else {})
        # Each DataLoader iterator draws its workers' base seed from ``generator``; left unset,
        # that is torch's global generator, which dropout also draws from. A resumed run starts
        # its loader after the RNG state is restored, the uninterrupted run long before, so the
        # draw would shift every later dropout mask. A private generator keeps resume exact.
        self._loader = iter(torch.utils.data.DataLoader(
            self.dataset, batch_sampler=sampler, collate_fn=stack, generator=torch.Generator().manual_seed(start),
            pin_memory=parallel.device().type == "cuda", **workers))
        self._position = start


@dataclass
class TrainingData:
    tokenizer: Any
    train: Any
    valid: Optional[Any]
    micro_batch_size: int
    num_microbatches: int
    global_batch_size: int
    eval_iters: int = 0
    num_workers: int = 0

    def __post_init__(self) -> None:
        # Every evaluation reads the same eval_iters global batches of the validation split.
        self._streams = {"train": BatchStream(self.train, self.micro_batch_size, self.num_workers)}
        if self.valid is not None and self.eval_iters > 0:
            self._streams["valid"] = BatchStream(self.valid, self.micro_batch_size, self.num_workers,
                                                 length=self.eval_iters * self.global_batch_size)

    def train_batches(self, consumed_samples: int) -> Iterator[dict]:
        """The micro-batches of the iteration that starts at ``consumed_samples``."""
        return self._streams["train"].take(consumed_samples, self.num_microbatches)

    def valid_batches(self, offset: int) -> Iterator[dict]:
        if "valid" not in self._streams:
            raise ValueError("no validation split: set --split with a non-zero validation share or --eval-iters 0")
        return self._streams["valid"].take(offset, self.num_microbatches)


def _dataset_config(args: argparse.Namespace, tokenizer, image_sequence_length: Optional[int]):
    # ntp and rho1 weigh tokens in the loss; the datasets still pack PRIOR's (unused) weights.
    weighting = dict(prior_alpha=args.prior_alpha, mi_floor=args.mi_floor,
                     loss_weighting=args.loss if args.loss in PACKED_WEIGHT_LOSSES else "prior",
                     reference_logprobs=args.loss == "rho1")
    common = dict(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        blend=get_blend_from_list(args.data_path),
        split=args.split,
        tokenizer=tokenizer,
        path_to_cache=args.data_cache_path,
    )
    if get_arch(args.model).needs_images:
        return CaptionDataset, CaptionDatasetConfig(**weighting, pack_samples=args.pack_samples,
                                                    image_mean=tuple(args.image_mean), image_std=tuple(args.image_std),
                                                    image_size=args.image_size, image_aspect=args.image_aspect,
                                                    image_sequence_length=image_sequence_length, **common)
    gpt = dict(reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=args.mask_eod,
               create_attention_mask=False, pack_samples=args.pack_samples)
    if args.loss == "ntp" and not _has_scores(args.data_path):
        # Plain NTP on tokens without reference scores (e.g. the reference LM itself).
        return PackedGPTDataset, PackedGPTDatasetConfig(**common, **gpt)
    return WeightedGPTDataset, WeightedGPTDatasetConfig(**weighting, **common, **gpt)


def _has_scores(data_path: list[str]) -> bool:
    prefixes, _ = get_blend_from_list(data_path)
    return all(os.path.exists(p + ".logprobs.idx") for p in prefixes)


def build_training_data(args: argparse.Namespace,
                        model_config_for: Optional[Callable[[Any], ModelConfig]] = None) -> TrainingData:
    """Tokenizer and the train/validation datasets of ``--data-path`` (a Megatron blend).

    Images are read at ``--image-size`` per ``--image-aspect`` (``validate_args`` resolves them,
    the stores' own when not given), the size ``model_config_for(tokenizer)``, the model the
    batches are for, is built for; the positions its image takes budget packed rows
    (``--pack-samples``) and count the rows' padding."""
    tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type, args.special_tokens)
    image_sequence_length = None
    if get_arch(args.model).needs_images and model_config_for is not None:
        image_sequence_length = model_config_for(tokenizer).image_sequence_length
    train_samples = args.train_iters * args.global_batch_size
    valid_samples = max(1, args.eval_iters) * args.global_batch_size if args.eval_iters > 0 else 0
    cls, config = _dataset_config(args, tokenizer, image_sequence_length)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        cls, [train_samples, valid_samples, 0], lambda: True, config).build()
    if train is None:
        raise ValueError(f"--split {args.split} leaves no training data")
    if args.eval_iters > 0 and valid is None:
        raise ValueError(f"--split {args.split} leaves no validation data: give it a validation share "
                         "or pass --eval-iters 0")
    return TrainingData(tokenizer, train, valid, args.micro_batch_size, args.num_microbatches,
                        args.global_batch_size, args.eval_iters, args.num_workers)
