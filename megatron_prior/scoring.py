"""Reference scores: ``log p_ref(t_i | t_<i)`` for every token of every document.

The scoring rule, the same for every language-model reference: a document's first token is
scored given one start token (the tokenizer's BOS if it has one, else its EOS, the document
end ``eod``: ``Tokenizer.start_token``), each later token given the document before it; with
``--append-eod`` the document ends in ``eod``, which is then scored given the whole caption.
Documents longer than the scoring window are cut into windows of that length, each scored
from its own start (a later window reads the token before it instead of the start token), so
one pass over the tokens costs one forward pass. Windows are sorted by length and batched
under a token budget to limit padding (right padding: causal attention keeps real positions
blind to it), and run under ``torch.no_grad``. One loop (``WindowScorer.score``) does this
for both language-model references; they differ only in how a batch becomes log-probs:

- ``GPTScorer``: a text-only megatron-core GPTModel trained here (``--reference-type gpt``).
  The log-prob is minus megatron-core's own (vocab-parallel) per-token cross-entropy, so it
  works at any tensor-parallel size.
- ``HFScorer``: any causal LM ``transformers.AutoModelForCausalLM`` loads from a local
  directory (``--reference-type hf``): Llama, Qwen2, SmolLM2, GPT-2, ... in bfloat16 on a GPU,
  float32 on the CPU. The log-prob is the float32 ``log_softmax`` of the model's own logits.
- ``UnigramScorer``: token frequencies of the corpus itself, a context-free baseline (the
  rule above does not apply: it reads no context).

``load_reference`` turns ``--reference-type``/``--reference-load`` into a scorer and the
metadata that binds the scores to it (the content hash of the checkpoint, or of an HF
model's ``config.json`` and ``*.safetensors`` files).
"""

from __future__ import annotations

import hashlib
import logging
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

import numpy as np
import torch

from megatron_prior.checkpoint import checkpoint_dir, checkpoint_hash
from megatron_prior.files import sha256_file
from megatron_prior.models.arch import get_arch
from megatron_prior.models.pretrained import load_inference_model
from megatron_prior.tokenizer import HF_TOKENIZER_FILES, Tokenizer, load_tokenizer, require_local

log = logging.getLogger(__name__)

REFERENCE_TYPES = ("gpt", "hf", "unigram")


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


class WindowScorer(ABC):
    """Scores token documents with a language model by the module's rule (whole model on this
    rank, eval mode). ``vocab_size`` is the model's: a document id outside it is refused."""

    def __init__(self, model: torch.nn.Module, start_token: int, window: int, max_batch_tokens: int,
                 vocab_size: Optional[int] = None) -> None:
        if window < 1:
            raise ValueError(f"window must be positive, got {window}")
        if max_batch_tokens < window:
            raise ValueError(f"max_batch_tokens ({max_batch_tokens}) must hold one full window ({window})")
        self.model = model.eval()
        self.start_token, self.window, self.max_batch_tokens = start_token, window, max_batch_tokens
        self.vocab_size = vocab_size
        self.device = next(model.parameters()).device

    @abstractmethod
    def _batch_logprobs(self, tokens: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[b, w]`` log-probs of ``labels`` given ``tokens`` (row ``r`` real up to ``lengths[r]``)."""

    @torch.no_grad()
    def score(self, documents: Sequence[np.ndarray],
              progress: Optional[Callable[[int], None]] = None) -> list[np.ndarray]:
        """float32 log-probs, one array per document; ``progress(n_tokens)`` after each batch."""
        if self.vocab_size is not None:
            for i, doc in enumerate(documents):
                if len(doc) and (int(np.min(doc)) < 0 or int(np.max(doc)) >= self.vocab_size):
                    bad = int(np.max(doc)) if int(np.max(doc)) >= self.vocab_size else int(np.min(doc))
                    raise ValueError(f"document {i} of this scoring chunk holds token id {bad}, outside the "
                                     f"reference's vocabulary [0, {self.vocab_size}) (tokens added to the "
                                     "tokenizer here, such as the image markers, are not the reference's)")
        out = [np.empty(len(d), dtype=np.float32) for d in documents]
        for batch in _batches(_windows([len(d) for d in documents], self.window), self.max_batch_tokens):
            width = batch[0].length
            inputs = np.zeros((len(batch), width), dtype=np.int64)
            targets = np.zeros((len(batch), width), dtype=np.int64)
            for row, w in enumerate(batch):
                doc = np.asarray(documents[w.doc], dtype=np.int64)
                targets[row, : w.length] = doc[w.start: w.start + w.length]
                # The input before target i is token i - 1; before a document's first, the start token.
                inputs[row, 0] = self.start_token if w.start == 0 else doc[w.start - 1]
                inputs[row, 1: w.length] = doc[w.start: w.start + w.length - 1]
            lengths = torch.tensor([w.length for w in batch], device=self.device)
            logprobs = self._batch_logprobs(torch.from_numpy(inputs).to(self.device),
                                            torch.from_numpy(targets).to(self.device), lengths)
            logprobs = logprobs.float().cpu().numpy()
            for row, w in enumerate(batch):
                out[w.doc][w.start: w.start + w.length] = logprobs[row, : w.length]
            if progress is not None:
                progress(sum(w.length for w in batch))
        return out


class GPTScorer(WindowScorer):
    """A megatron-core GPTModel of this package as the reference."""

    def __init__(self, model: torch.nn.Module, start_token: int, window: int, max_batch_tokens: int = 16384,
                 vocab_size: Optional[int] = None) -> None:
        super().__init__(model, start_token, window, max_batch_tokens, vocab_size)

    def _batch_logprobs(self, tokens: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0).expand_as(tokens)
        return -self.model(tokens, positions, None, labels=labels).float()

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


class HFScorer(WindowScorer):
    """A Hugging Face causal LM (``transformers`` ``PreTrainedModel``) as the reference."""

    def _batch_logprobs(self, tokens: torch.Tensor, labels: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=self.device).unsqueeze(0)
        attention_mask = (positions < lengths.unsqueeze(1)).long()
        logits = self.model(input_ids=tokens, attention_mask=attention_mask, use_cache=False).logits
        out = torch.empty(labels.shape, dtype=torch.float32, device=logits.device)
        # One row's float32 log-softmax at a time: [b, w, vocab] in float32 would double the
        # logits' memory for a large vocabulary.
        for row in range(len(logits)):
            logp = torch.log_softmax(logits[row].float(), dim=-1)
            out[row] = logp.gather(-1, labels[row].unsqueeze(-1)).squeeze(-1)
        return out


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


def hf_model_files(load_dir: str | os.PathLike) -> list[Path]:
    """What an HF reference is made of: ``config.json`` and its ``*.safetensors`` weights."""
    folder = Path(load_dir)
    return [folder / "config.json"] + sorted(folder.glob("*.safetensors"))


def hf_model_hash(load_dir: str | os.PathLike) -> str:
    """A content hash of an HF model directory's ``config.json`` and ``*.safetensors`` files
    (names and bytes): binds scores to the model that made them."""
    h = hashlib.sha256()
    for path in hf_model_files(load_dir):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def _start_context(tokenizer: Tokenizer) -> dict:
    return {"first_token_context": "bos" if tokenizer.bos is not None else "eod",
            "start_token_id": tokenizer.start_token}


def _check_vocabulary(where: str, vocab_size: int, tokenizer: Tokenizer) -> None:
    """The reference must score every id of the tokenizer's own; the tokens added here (image
    markers, a pad) never occur in a caption, so a model converted from the tokenizer's LM,
    which lacks them, qualifies."""
    if vocab_size < tokenizer.own_vocab_size:
        raise ValueError(f"--reference-load {where}: vocabulary of {vocab_size} tokens, smaller than the "
                         f"{tokenizer.own_vocab_size} ids of the tokenizer (--tokenizer-model)")


def _load_gpt(load_dir: str, tokenizer: Tokenizer, window: Optional[int],
              max_batch_tokens: int) -> tuple[GPTScorer, dict]:
    model, cfg = load_inference_model(load_dir)
    where = str(checkpoint_dir(load_dir))
    if get_arch(cfg.arch).needs_images:
        raise ValueError(f"--reference-load {where}: a {cfg.arch} checkpoint, the reference must be a text-only "
                         "language model")
    _check_vocabulary(where, cfg.vocab_size, tokenizer)
    if cfg.tokenizer_fingerprint and cfg.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(f"--reference-load {where}: trained with tokenizer {cfg.tokenizer_fingerprint}, "
                         f"not {tokenizer.fingerprint} (--tokenizer-model)")
    window = window or cfg.seq_length
    scorer = GPTScorer(model, tokenizer.start_token, window, max(max_batch_tokens, window), cfg.vocab_size)
    reference = {"type": "gpt", "path": os.path.abspath(load_dir), "checkpoint": where,
                 "checkpoint_sha256": checkpoint_hash(load_dir), "window": window, **_start_context(tokenizer)}
    return scorer, reference


def _load_hf(load_dir: str, tokenizer: Tokenizer, window: Optional[int],
             max_batch_tokens: int) -> tuple[HFScorer, dict]:
    """Every check (files, vocabulary, tokenizer, window) before the weights are read."""
    require_local(load_dir, "--reference-load")
    if not os.path.isdir(load_dir):
        raise ValueError(f"--reference-load {load_dir}: not a directory (an HF reference is a directory as "
                         "save_pretrained writes it: config.json and *.safetensors)")
    # Optional for the gpt and unigram references: transformers takes seconds to import.
    from transformers import AutoConfig, AutoModelForCausalLM

    files = hf_model_files(load_dir)
    if not files[0].is_file() or len(files) == 1:
        raise ValueError(f"--reference-load {load_dir}: needs config.json and *.safetensors weights (pickled "
                         "*.bin weights are not read: a checkpoint is untrusted input)")
    try:
        config = AutoConfig.from_pretrained(load_dir, local_files_only=True).get_text_config()
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--reference-load {load_dir}: transformers cannot read its config.json: {err}") from None
    _check_vocabulary(load_dir, config.vocab_size, tokenizer)
    if os.path.isfile(os.path.join(load_dir, HF_TOKENIZER_FILES[0])):
        own = load_tokenizer(load_dir, "HuggingFaceTokenizer", tokenizer.special_pieces)
        if own.fingerprint != tokenizer.fingerprint:
            raise ValueError(f"--reference-load {load_dir}: its tokenizer ({own.fingerprint}) is not the one of "
                             f"--tokenizer-model {tokenizer.path} ({tokenizer.fingerprint}); the reference must "
                             "read the data's tokens (pass the reference directory as --tokenizer-model)")
    else:
        log.warning("--reference-load %s holds no tokenizer.json: only its vocabulary size (%d) was checked "
                    "against --tokenizer-model", load_dir, config.vocab_size)
    max_positions = getattr(config, "max_position_embeddings", None)
    if window is None:
        window = min(max_positions or max_batch_tokens, max_batch_tokens)
    elif max_positions is not None and window > max_positions:
        raise ValueError(f"--reference-window {window}: more than the {max_positions} positions of "
                         f"--reference-load {load_dir}")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    try:
        model = AutoModelForCausalLM.from_pretrained(load_dir, local_files_only=True, use_safetensors=True,
                                                     dtype=dtype)
    except (OSError, ValueError) as err:
        raise ValueError(f"--reference-load {load_dir}: AutoModelForCausalLM cannot load it: {err}") from None
    model.to("cuda" if cuda else "cpu")
    scorer = HFScorer(model, tokenizer.start_token, window, max(max_batch_tokens, window), config.vocab_size)
    reference = {"type": "hf", "path": os.path.abspath(load_dir), "model_type": config.model_type,
                 "model_sha256": hf_model_hash(load_dir), "dtype": str(dtype).removeprefix("torch."),
                 "window": window, **_start_context(tokenizer)}
    return scorer, reference


def load_reference(reference_type: str, load_dir: Optional[str], tokenizer: Tokenizer,
                   window: Optional[int] = None, max_batch_tokens: int = 16384
                   ) -> tuple[WindowScorer | UnigramScorer, dict]:
    """(scorer, reference metadata) for ``--reference-type``/``--reference-load``.

    ``gpt``: a text-only checkpoint of this package, checked against the tokenizer before
    anything is scored; it needs megatron's parallel state initialised (the caller owns the
    process group); ``window`` defaults to the model's ``seq_length`` (what it was trained on).
    ``hf``: a local ``save_pretrained`` directory of a causal LM, whose vocabulary must cover
    the tokenizer's ids and whose tokenizer, when it holds one, must be the data's;
    ``window`` defaults to its positions, at most ``max_batch_tokens``.
    """
    if reference_type == "unigram":
        return UnigramScorer(tokenizer.vocab_size), {"type": "unigram"}
    if reference_type == "gpt":
        return _load_gpt(load_dir, tokenizer, window, max_batch_tokens)
    if reference_type == "hf":
        return _load_hf(load_dir, tokenizer, window, max_batch_tokens)
    raise ValueError(f"--reference-type {reference_type!r}: expected one of {', '.join(REFERENCE_TYPES)}")
