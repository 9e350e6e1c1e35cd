"""Reference scores: ``log p_ref(t_i | t_<i)`` for every token of every document.

Two references:

- ``GPTScorer``: a text-only megatron-core GPTModel (the reference LM). Each document is
  read as ``[eod] + doc``, so its first token is scored given the EOD context and every
  token gets a log-prob. Documents longer than the model's window are cut into windows of
  that length (each scored from its own start, so one pass over the tokens costs one
  forward pass). Windows are sorted by length and batched under a token budget to limit
  padding, and run under ``torch.no_grad``; the log-prob is minus megatron-core's own
  (vocab-parallel) per-token cross-entropy, so it works at any tensor-parallel size.
- ``UnigramScorer``: token frequencies of the corpus itself, a context-free baseline.

``load_reference`` turns ``--reference-type``/``--reference-load`` into a scorer and the
metadata that binds the scores to it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_prior.checkpoint import checkpoint_dir, checkpoint_hash
from megatron_prior.models.arch import get_arch
from megatron_prior.models.pretrained import load_inference_model
from megatron_prior.tokenizer import Tokenizer


@dataclass(frozen=True)
class _Window:
    doc: int
    start: int  # first target position inside the document
    length: int


def _windows(lengths: Sequence[int], window: int) -> list[_Window]:
    return [_Window(d, start, min(window, n - start))
            for d, n in enumerate(lengths) for start in range(0, n, window)]


def _batches(windows: list[_Window], max_batch_tokens: int) -> Iterator[list[_Window]]:
    """Longest first; each batch's padded size (rows x longest) stays within the budget."""
    order = sorted(windows, key=lambda w: -w.length)
    batch: list[_Window] = []
    for w in order:
        if batch and (len(batch) + 1) * batch[0].length > max_batch_tokens:
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


class GPTScorer:
    """Scores token documents with a GPTModel (eval mode, whole model on this rank)."""

    def __init__(self, model: torch.nn.Module, eod: int, window: int, max_batch_tokens: int = 16384) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        if max_batch_tokens < window:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must hold one full window ({window})")
        self.model = model.eval()
        self.eod, self.window, self.max_batch_tokens = eod, window, max_batch_tokens
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def score(self, documents: Sequence[np.ndarray],
              progress: Optional[Callable[[int], None]] = None) -> list[np.ndarray]:
        """float32 log-probs, one array per document; ``progress(n_tokens)`` after each batch."""
        out = [np.empty(len(d), dtype=np.float32) for d in documents]
        for batch in _batches(_windows([len(d) for d in documents], self.window), self.max_batch_tokens):
            width = batch[0].length
            inputs = np.zeros((len(batch), width), dtype=np.int64)
            targets = np.zeros((len(batch), width), dtype=np.int64)
            for row, w in enumerate(batch):
                doc = np.asarray(documents[w.doc], dtype=np.int64)
                targets[row, : w.length] = doc[w.start: w.start + w.length]
                # The input before target i is token i - 1; before a document's first, EOD.
                inputs[row, 0] = self.eod if w.start == 0 else doc[w.start - 1]
                inputs[row, 1: w.length] = doc[w.start: w.start + w.length - 1]
            tokens = torch.from_numpy(inputs).to(self.device)
            labels = torch.from_numpy(targets).to(self.device)
            positions = torch.arange(width, device=self.device).unsqueeze(0).expand_as(tokens)
            # Right padding: the causal mask keeps real positions blind to it.
            ce = self.model(tokens, positions, None, labels=labels)
            logprobs = (-ce.float()).cpu().numpy()
            for row, w in enumerate(batch):
                out[w.doc][w.start: w.start + w.length] = logprobs[row, : w.length]
            if progress is not None:
                progress(sum(w.length for w in batch))
        return out

    @torch.no_grad()
    def forward_only(self, tokens: np.ndarray, batch_size: int) -> None:
        """A bare forward pass (logits only) over ``tokens`` packed into full windows.

        The anchor that scoring is measured against: the least work that runs the reference
        over the same tokens.
        """
        n = len(tokens) // self.window * self.window
        rows = torch.from_numpy(np.asarray(tokens[:n], dtype=np.int64).reshape(-1, self.window))
        positions = torch.arange(self.window, device=self.device).unsqueeze(0)
        for start in range(0, len(rows), batch_size):
            chunk = rows[start: start + batch_size].to(self.device)
            self.model(chunk, positions.expand_as(chunk), None)
        if self.device.type == "cuda":
            torch.cuda.synchronize()


class UnigramScorer:
    """``log(count(t) / total)``: the corpus's own token frequencies, no context."""

    def __init__(self, vocab_size: int) -> None:
        self.counts = np.zeros(vocab_size, dtype=np.int64)

    def update(self, tokens: np.ndarray) -> None:
        tokens = np.asarray(tokens)
        if len(tokens) and (tokens.min() < 0 or tokens.max() >= len(self.counts)):
            raise ValueError(f"token ids outside the vocabulary [0, {len(self.counts)})")
        self.counts += np.bincount(tokens, minlength=len(self.counts))

    def __call__(self, tokens: np.ndarray) -> np.ndarray:
        total = self.counts.sum()
        if total == 0:
            raise ValueError("the unigram reference has seen no tokens")
        with np.errstate(divide="ignore"):
            table = np.log(self.counts / total)  # -inf only for ids never seen, never looked up
        return table[np.asarray(tokens)].astype(np.float32)


def load_reference(reference_type: str, load_dir: Optional[str], tokenizer: Tokenizer,
                   window: Optional[int] = None, max_batch_tokens: int = 16384
                   ) -> tuple[GPTScorer | UnigramScorer, dict]:
    """(scorer, reference metadata) for ``--reference-type``/``--reference-load``.

    A ``gpt`` reference is a text-only checkpoint of this package, checked against the tokenizer
    before anything is scored; it needs megatron's parallel state initialised (the caller owns
    the process group). ``window`` defaults to the model's ``seq_length`` (what it was trained on).
    """
    if reference_type == "unigram":
        return UnigramScorer(tokenizer.vocab_size), {"type": "unigram"}
    if reference_type != "gpt":
        raise ValueError(f"--reference-type {reference_type!r}: expected gpt or unigram")
    model, cfg = load_inference_model(load_dir)
    where = str(checkpoint_dir(load_dir))
    if get_arch(cfg.arch).needs_images:
        raise ValueError(f"--reference-load {where}: a {cfg.arch} checkpoint, the reference must be a text-only "
                         "language model")
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ValueError(f"--reference-load {where}: vocabulary of {cfg.vocab_size} tokens, smaller than the "
                         f"tokenizer's {tokenizer.vocab_size}")
    if cfg.tokenizer_fingerprint and cfg.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(f"--reference-load {where}: trained with tokenizer {cfg.tokenizer_fingerprint}, "
                         f"not {tokenizer.fingerprint} (--tokenizer-model)")
    window = window or cfg.seq_length
    scorer = GPTScorer(model, tokenizer.eod, window, max(max_batch_tokens, window))
    reference = {"type": "gpt", "path": os.path.abspath(load_dir), "checkpoint": where,
                 "checkpoint_sha256": checkpoint_hash(load_dir), "window": window,
                 "first_token_context": "eod"}
    return scorer, reference
