"""Shared fixtures."""

import pytest

from megatron_prior.testing import make_caption_corpus


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory) -> dict:
    """400 captions with 16x16 images through the real tools: tokens, unigram scores, kinds, images."""
    return make_caption_corpus(str(tmp_path_factory.mktemp("corpus")))
