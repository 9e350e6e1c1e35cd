"""What a trained vision-language model says about held-out data: per-token cross-entropy
by token kind, and caption log-likelihoods for the POPE-style probe; and, as an
image-conditioned scorer, the per-token scores ``--loss mi`` and ``--loss cal`` train on
(``score_dataset``, ``tools/score_with_images.py``).

Batches are built exactly as training builds them (``CaptionDataset``: ``tokens = [<image>,
c0, ..., <eod>, pad]``, ``labels = [c0, ..., <eod>, pad]``, images scaled to [0, 1] and
normalised with the dataset's defaults) and go through the architecture's ``forward_loss``,
the call training makes, so an evaluation loss is the training loss on unseen data. The model
returns per-token CE over the combined (image + text) sequence; text label ``j`` sits at
combined position ``image_offset + j`` (``megatron_prior.models.layout``).

Call ``megatron_prior.parallel.initialize()`` before loading a model and ``destroy()`` after.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_prior import parallel
from megatron_prior.checkpoint import checkpoint_dir, checkpoint_hash
from megatron_prior.data.caption_dataset import CaptionDataset
from megatron_prior.data.formats import IMAGE_SCORE_VALUES, ScoreMetadata
from megatron_prior.data.images import DEFAULT_ASPECT, load_image
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.data.writer import ImageScoreWriter
from megatron_prior.eval.kind_losses import kind_loss_sums, kind_mean_losses
from megatron_prior.eval.probe import PROBE_SPLITS, ProbeItem, probe_accuracy
from megatron_prior.models.arch import ARCHS, get_arch
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.pretrained import load_inference_model
from megatron_prior.tokenizer import load_tokenizer


class LVLMScorer:
    """Batched, gradient-free scoring with one vision-language model (an architecture with
    ``needs_images``).

    Args:
        model: the model from ``load_inference_model`` (eval mode).
        model_config: its ``ModelConfig``.
        tokenizer: the tokenizer the model was trained with (its fingerprint is checked).
        batch_size: captions per forward pass.
        image_aspect: how probe images are fitted to the model's size (``images.ASPECTS``): the
            rule its training images were fitted by. Held-out data are read at the model's own
            size and rule (``ModelConfig.image_size``, ``image_aspect``).
    """

    def __init__(self, model: torch.nn.Module, model_config: ModelConfig, tokenizer, batch_size: int = 64,
                 image_aspect: str = DEFAULT_ASPECT) -> None:
        self.arch = get_arch(model_config.arch)
        if not self.arch.needs_images:
            lvlms = ", ".join(a.name for a in ARCHS.values() if a.needs_images)
            raise ValueError(f"LVLMScorer scores vision-language models ({lvlms}), not {model_config.arch!r}")
        if model_config.tokenizer_fingerprint not in (None, tokenizer.fingerprint):
            raise ValueError(f"--tokenizer-model {tokenizer.path}: the model was trained with tokenizer "
                             f"{model_config.tokenizer_fingerprint}, not with this one ({tokenizer.fingerprint}); "
                             "give the --tokenizer-model, --tokenizer-type and --special-tokens it was trained with")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.config = model_config
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.image_aspect = image_aspect
        self.image_offset = model_config.image_offset
        # Text positions the model was built for (training's --seq-length).
        self.text_length = model_config.seq_length
        if self.text_length < 2:
            raise ValueError(f"model seq_length {model_config.seq_length} leaves no room for a caption token "
                             "after the <image> placeholder")
        self._mean = np.asarray(model_config.image_mean, dtype=np.float32).reshape(3, 1, 1)
        self._std = np.asarray(model_config.image_std, dtype=np.float32).reshape(3, 1, 1)

    # --- batches -------------------------------------------------------------------------
    def image_tensor(self, path: str) -> torch.Tensor:
        """An image file as the caption dataset feeds it: float32 ``[3, H, W]``, normalised."""
        size = self.config.image_size
        return self.pixels_tensor(load_image(path, size, size, self.image_aspect))

    def pixels_tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """Decoded ``[H, W, 3]`` pixels (0-255) as the caption dataset feeds them: float32
        ``[3, H, W]``, normalised."""
        image = np.asarray(pixels, dtype=np.float32).transpose(2, 0, 1) / 255.0
        return torch.from_numpy((image - self._mean) / self._std)

    def text_batch(self, captions: Sequence[Sequence[int]]) -> dict:
        """``tokens``/``labels``/``loss_mask``/``position_ids`` for token-id captions (each
        ending in EOD), padded to the longest, cut at the model's text length."""
        pad = self.tokenizer.pad
        s = min(self.text_length, max(len(c) for c in captions))
        text = np.full((len(captions), s + 1), pad, dtype=np.int64)
        text[:, 0] = self.tokenizer.image_token_id
        mask = np.zeros((len(captions), s), dtype=np.float32)
        for i, c in enumerate(captions):
            n = min(len(c), s)
            text[i, 1:1 + n] = c[:n]
            mask[i, :n] = 1.0
        # A pad id outside the vocabulary must still embed (as the datasets do).
        text = np.where(text == pad, 0, text)
        device = parallel.device()
        return {"tokens": torch.from_numpy(text[:, :-1]).to(device),
                "labels": torch.from_numpy(text[:, 1:]).to(device),
                "loss_mask": torch.from_numpy(mask).to(device),
                "position_ids": torch.arange(s, device=device).expand(len(captions), s)}

    # --- the forward pass ----------------------------------------------------------------
    @torch.no_grad()
    def per_token_ce(self, images: torch.Tensor, batch: dict) -> torch.Tensor:
        """Per-token CE ``[b, s]`` aligned with ``batch["labels"]`` (every position; apply the mask)."""
        images = images.to(parallel.device(), torch.float32)
        combined = self.arch.forward_loss(self.model, {**batch, "images": images})
        s = batch["labels"].shape[1]
        if combined.shape != (images.shape[0], self.image_offset + s):
            raise ValueError(f"the model returned per-token loss of shape {tuple(combined.shape)}, expected "
                             f"({images.shape[0]}, {self.image_offset + s}) for {s} text positions")
        return combined[:, self.image_offset:].float()

    @torch.no_grad()
    def token_scores(self, images: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The image-conditioned scores of every text label, float32 ``[b, s]`` aligned with
        ``batch["labels"]`` (every position; apply the mask), by ``formats.IMAGE_SCORE_VALUES``:

        - ``imglogprobs``: ``log p(label_j | image, text before)``, the log-softmax of the
          logits at the label's combined position (what training's cross-entropy negates);
        - ``imgdelta``: the label's logit with the image minus its logit without: the second
          forward pass is the model's language model (a GPTModel, ``language_model`` in every
          vision-language architecture here) on the text row alone, the ``<image>`` placeholder
          read as the token it is instead of being replaced by the image's positions.

        Both read the full vocabulary's logits: tensor-parallel size 1 only.
        """
        if parallel_state.get_tensor_model_parallel_world_size() != 1:
            raise ValueError("token_scores reads whole logit rows: run the scorer at tensor-parallel size 1")
        images = images.to(parallel.device(), torch.float32)
        labels = batch["labels"].unsqueeze(-1)
        s = labels.shape[1]
        logits = self.model(images, batch["tokens"], batch["position_ids"], None)
        if logits.shape[:2] != (images.shape[0], self.image_offset + s):
            raise ValueError(f"the model returned logits of shape {tuple(logits.shape)}, expected "
                             f"({images.shape[0]}, {self.image_offset + s}, vocab) for {s} text positions")
        with_image = logits[:, self.image_offset:].float()
        text_only = self.model.language_model(input_ids=batch["tokens"], position_ids=batch["position_ids"],
                                              attention_mask=None).float()
        target = with_image.gather(-1, labels).squeeze(-1)
        return {"imglogprobs": target - torch.logsumexp(with_image, dim=-1),
                "imgdelta": target - text_only.gather(-1, labels).squeeze(-1)}

    # --- held-out loss by kind -----------------------------------------------------------
    def heldout_kind_sums(self, data_prefix: str, progress: bool = False) -> torch.Tensor:
        """``[K, 2]`` (CE sum, token count) per kind over every caption of a preprocessed
        corpus (tokens, scores, ``.kinds`` and ``.images``), in training's sample layout."""
        dataset = self._caption_dataset(data_prefix)
        if not dataset.dataset.has_kinds:
            raise ValueError(f"{data_prefix}: no token kinds (.kinds.bin/.idx); preprocess with --kinds-key")
        sums = torch.zeros(len(KIND_NAMES), 2, dtype=torch.float64)
        for start in tqdm(range(0, len(dataset), self.batch_size), desc="held-out", unit="batch",
                          disable=not progress):
            samples = [dataset[i] for i in range(start, min(start + self.batch_size, len(dataset)))]
            batch = {k: torch.stack([s[k] for s in samples]).to(parallel.device()) for k in samples[0]}
            ce = self.per_token_ce(batch.pop("images"), batch)
            sums += kind_loss_sums(ce.cpu(), batch["token_kinds"].cpu(), batch["loss_mask"].cpu())
        return sums

    def _caption_dataset(self, data_prefix: str) -> CaptionDataset:
        # Images are read as training read them (the model's size and rule): an encoded store is
        # decoded to them, a raw store that holds others is refused, naming it.
        return CaptionDataset.of_prefix(data_prefix, self.tokenizer, self.text_length, self.config.image_mean,
                                        self.config.image_std, image_size=self.config.image_size,
                                        image_aspect=self.config.image_aspect)

    # --- caption likelihoods -------------------------------------------------------------
    @torch.no_grad()
    def caption_logprobs(self, image_paths: Sequence[str], captions: Sequence[str]) -> list[float]:
        """Total log-likelihood of each caption (its tokens and the closing EOD) given its image."""
        if len(image_paths) != len(captions):
            raise ValueError(f"{len(image_paths)} images for {len(captions)} captions")
        token_ids = [list(self.tokenizer.tokenize(c)) + [self.tokenizer.eod] for c in captions]
        images: dict[str, torch.Tensor] = {}
        out: list[float] = []
        for start in range(0, len(captions), self.batch_size):
            paths = image_paths[start:start + self.batch_size]
            for p in paths:
                if p not in images:
                    images[p] = self.image_tensor(p)
            batch = self.text_batch(token_ids[start:start + self.batch_size])
            ce = self.per_token_ce(torch.stack([images[p] for p in paths]), batch)
            out += (-(ce * batch["loss_mask"]).sum(dim=1)).double().cpu().tolist()
        return out

    def probe(self, items: Sequence[ProbeItem], progress: bool = False) -> dict[str, float]:
        """Probe accuracy per split and overall; each distinct (image, caption) is scored once
        (an image's positive caption is shared by its three items)."""
        pairs = sorted({(i.image, c) for i in items for c in (i.positive, i.negative)})
        scores: dict[tuple[str, str], float] = {}
        step = self.batch_size * 8
        for start in tqdm(range(0, len(pairs), step), desc="probe", unit="chunk", disable=not progress):
            chunk = pairs[start:start + step]
            scores.update(zip(chunk, self.caption_logprobs([p[0] for p in chunk], [p[1] for p in chunk])))
        return probe_accuracy(lambda image, caption: scores[(image, caption)], items)


def evaluate(scorer: LVLMScorer, heldout_prefix: Optional[str], probe_items: Optional[Sequence[ProbeItem]],
             progress: bool = False) -> dict:
    """The metrics the demo report and the sweeps read: ``heldout_ce_<kind>``, ``heldout_ce``
    (all caption tokens), ``heldout_tokens_<kind>``, ``probe_accuracy`` and
    ``probe_accuracy_<split>``."""
    result: dict = {}
    if heldout_prefix is not None:
        sums = scorer.heldout_kind_sums(heldout_prefix, progress)
        for kind, value in kind_mean_losses(sums).items():
            result[f"heldout_ce_{kind}"] = value
        for k, kind in enumerate(KIND_NAMES):
            result[f"heldout_tokens_{kind}"] = int(sums[k, 1])
        result["heldout_ce"] = float(sums[:, 0].sum() / sums[:, 1].sum())
    if probe_items is not None:
        acc = scorer.probe(probe_items, progress)
        result["probe_accuracy"] = acc["all"]
        for split in PROBE_SPLITS:
            if split in acc:
                result[f"probe_accuracy_{split}"] = acc[split]
    return result


def score_dataset(scorer: LVLMScorer, data_prefix: str, image_scorer: dict, progress: bool = False) -> ScoreMetadata:
    """Add ``T.imglogprobs`` and ``T.imgdelta`` (``LVLMScorer.token_scores``) to the preprocessed
    dataset ``data_prefix`` (tokens, reference log-probs and an image store; verified as training
    opens it), caption by caption with its image, as training lays it out (``[<image>, caption]``).
    ``image_scorer`` describes the model (``describe_scorer``); the sidecars are committed by
    ``ImageScoreWriter``, bound to the token files like the reference log-probs. A caption longer
    than the model's text length is refused before any scoring: its last tokens could not be
    scored with the image in view."""
    tok = scorer.tokenizer
    dataset = WeightedIndexedDataset(data_prefix, tokenizer_fingerprint=tok.fingerprint, vocab_size=tok.vocab_size)
    # Images are read as the model's training read them (its size and rule), as _caption_dataset reads them.
    size = scorer.config.image_size
    store = dataset.open_images().fitted_to(size, size, scorer.config.image_aspect)
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > scorer.text_length:
        longest = int(lengths.argmax())
        raise ValueError(f"{data_prefix}: caption {longest} has {lengths[longest]} tokens, more than the "
                         f"{scorer.text_length} text positions the model reads (its seq_length): score with a "
                         "model trained with a longer --seq-length")
    with ImageScoreWriter(data_prefix, dataset.metadata, lengths, dataset.document_indices) as writer:
        for start in tqdm(range(0, len(lengths), scorer.batch_size), desc="image scores", unit="batch",
                          disable=not progress):
            docs = range(start, min(start + scorer.batch_size, len(lengths)))
            scored = [d for d in docs if lengths[d]]
            rows: dict[int, dict] = {}
            if scored:
                batch = scorer.text_batch([dataset.tokens[d] for d in scored])
                images = torch.stack([scorer.pixels_tensor(store[d]) for d in scored])
                scores = {name: v.cpu().numpy() for name, v in scorer.token_scores(images, batch).items()}
                rows = {d: {name: v[i, :lengths[d]] for name, v in scores.items()} for i, d in enumerate(scored)}
            for d in docs:  # an empty caption has nothing to score
                writer.add_document(rows.get(d) or {name: np.zeros(0, np.float32) for name in IMAGE_SCORE_VALUES})
        return writer.finalize(image_scorer)


def describe_scorer(load_dir: str | os.PathLike, config: ModelConfig, iteration: Optional[int] = None) -> dict:
    """What binds image scores to the checkpoint that made them (its path, iteration and content hash)."""
    ckpt = checkpoint_dir(load_dir, iteration)
    return {"type": config.arch, "path": os.path.abspath(load_dir), "checkpoint": str(ckpt),
            "checkpoint_sha256": checkpoint_hash(load_dir, iteration),
            "without_image": "the language model on the text row, <image> read as a token"}


def load_scorer(load_dir: str | os.PathLike, tokenizer_model: str, batch_size: int = 64,
                iteration: Optional[int] = None, tokenizer_type: Optional[str] = None,
                special_tokens: Optional[Mapping[str, str]] = None,
                image_aspect: str = DEFAULT_ASPECT) -> LVLMScorer:
    """Load a checkpoint (latest iteration unless given) and its tokenizer (as the trainer's
    ``--tokenizer-model``, ``--tokenizer-type`` and ``--special-tokens`` give it) into a scorer;
    ``megatron_prior.parallel`` must be initialised. The tokenizer is loaded first: a wrong one
    is refused before the weights are read."""
    tokenizer = load_tokenizer(tokenizer_model, tokenizer_type, special_tokens)
    model, model_config = load_inference_model(load_dir, iteration)
    return LVLMScorer(model, model_config, tokenizer, batch_size, image_aspect)
