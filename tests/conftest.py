"""Shared fixtures: a tiny image-caption corpus through the real tools (generator, tokenizer,
preprocessing with unigram scores), built once per test session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_tool(args: list, cwd: Path) -> None:
    result = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))} failed:\n{result.stdout}\n{result.stderr}")


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """{"dir", "tokenizer", "data"}: 400 captions with 32x32 images, tokens + unigram scores + kinds."""
    root = tmp_path_factory.mktemp("corpus")
    run_tool(["-m", "megatron_prior.demo.generator", "--output-dir", "gen", "--num-train", "400",
              "--num-heldout", "40", "--seed", "3", "--no-progress"], root)
    run_tool([str(ROOT / "tools/train_tokenizer.py"), "--input", "gen/train.jsonl", "--json-keys", "caption",
              "--vocab-size", "200", "--model-type", "bpe", "--output-prefix", "tok"], root)
    run_tool([str(ROOT / "tools/preprocess_with_weights.py"), "--input", "gen/train.jsonl", "--json-keys", "caption",
              "--tokenizer-model", "tok.model", "--append-eod", "--output-prefix", "data/train",
              "--reference-type", "unigram", "--image-key", "image", "--image-size", "16", "--kinds-key", "kinds",
              "--workers", "1"], root)
    return {"dir": str(root), "tokenizer": str(root / "tok.model"), "data": str(root / "data/train_caption_document")}
