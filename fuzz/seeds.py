"""The real files every seed is cut from, made by the real writers.

``Corpus.create(root)`` runs the caption generator, the tokenizer trainer and the
preprocessing tool (``megatron_prior.testing.make_caption_corpus``: tokens, unigram scores,
kinds, images, metadata) and saves a tiny GPT through the trainer's checkpoint writer;
``corpus.json`` records where, so the driver's processes open the same corpus.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

CHECKPOINT_ITERATION = 3


def _save_checkpoint(load_dir: str, tokenizer_model: str) -> None:
    """One rank: a tiny GPT saved as the trainer saves it (runs under ``run_on_ranks``)."""
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.checkpointing import save_checkpoint

    tokenizer = load_tokenizer(tokenizer_model)
    parallel.initialize(seed=5)
    cfg = ModelConfig(arch="gpt", num_layers=1, hidden_size=16, num_attention_heads=2,
                      vocab_size=tokenizer.vocab_size, max_position_embeddings=8,
                      tokenizer_fingerprint=tokenizer.fingerprint)
    save_checkpoint(load_dir, CHECKPOINT_ITERATION, [build_model(cfg)], cfg, extra={"consumed_samples": 24})


@dataclass
class Corpus:
    dir: str  # the generated records (gen/train.jsonl) and their images are under it
    tokenizer: str  # the SentencePiece model
    data: str  # the token prefix (with scores, kinds, images, metadata)
    checkpoint: str  # a --save directory holding one checkpoint

    @property
    def jsonl(self) -> str:
        return os.path.join(self.dir, "gen", "train.jsonl")

    @classmethod
    def create(cls, root: str, caption_corpus: Optional[dict] = None) -> "Corpus":
        """Make (or, given ``make_caption_corpus``' result, reuse) the data, save the checkpoint."""
        from megatron_prior.testing import make_caption_corpus, run_on_ranks

        made = caption_corpus or make_caption_corpus(root, num_train=6, image_size=8, vocab_size=64)
        checkpoint = os.path.join(root, "checkpoint")
        run_on_ranks(_save_checkpoint, 1, checkpoint, made["tokenizer"])
        corpus = cls(made["dir"], made["tokenizer"], made["data"], checkpoint)
        Path(root, "corpus.json").write_text(json.dumps(asdict(corpus)))
        return corpus

    @classmethod
    def load(cls, root: str) -> "Corpus":
        return cls(**json.loads(Path(root, "corpus.json").read_text()))
