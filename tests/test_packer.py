"""The C++ packer equals the numpy reference; packed multipliers keep each caption's mass."""

import numpy as np
import pytest

from megatron_prior.data import packing


def _corpus(rng, n_docs=60, max_len=40, vocab=500, eod=0):
    lengths = rng.integers(1, max_len, n_docs)
    docs = [np.append(rng.integers(3, vocab, n - 1), eod) for n in lengths]
    tokens = np.concatenate(docs).astype(np.uint16)
    logprobs = -rng.exponential(2.0, len(tokens)).astype(np.float32)
    logprobs[rng.random(len(tokens)) < 0.05] = 0.0  # certain tokens: weight 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens, logprobs, offsets


def _sample_index(rng, offsets, seq_len, epochs=2):
    from megatron.core.datasets import helpers_cpp

    n_docs = len(offsets) - 1
    document_index = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int32)
    sizes = np.diff(offsets).astype(np.int32)
    n_samples = (sizes.sum() * epochs - 1) // seq_len
    sample_index = helpers_cpp.build_sample_idx_int32(sizes, document_index, seq_len, epochs,
                                                      int(sizes.sum()), True, 1)
    return document_index, sample_index[: n_samples + 1]


@pytest.mark.skipif(not packing.HAVE_EXTENSION, reason="C++ packer not built")
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("alpha,mask_eod", [(1.0, True), (0.5, False), (2.0, True)])
def test_cpp_equals_numpy(seed, alpha, mask_eod):
    rng = np.random.default_rng(seed)
    tokens, logprobs, offsets = _corpus(rng)
    seq_len = int(rng.integers(8, 64))  # shorter and longer than documents
    document_index, sample_index = _sample_index(rng, offsets, seq_len)
    scales_np = packing.document_scales_numpy(tokens, logprobs, offsets, alpha, 0, mask_eod, 1)
    scales = packing.document_scales(tokens, logprobs, offsets, alpha, 0, mask_eod, 1)
    np.testing.assert_allclose(scales, scales_np, rtol=1e-12)
    samples = rng.permutation(len(sample_index) - 1)
    ref = packing.pack_batch_numpy(tokens, logprobs, offsets, scales, document_index, sample_index,
                                   samples, seq_len, alpha, 0, mask_eod, 1)
    got = packing.pack_batch(tokens, logprobs, offsets, scales, document_index, sample_index, samples,
                             seq_len, alpha, 0, mask_eod, 1, num_threads=3)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-7, atol=1e-7)


def test_whole_caption_multipliers_sum_to_token_count():
    rng = np.random.default_rng(11)
    tokens, logprobs, offsets = _corpus(rng, n_docs=30)
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, 0, True, 1)
    # One epoch, in order, one sample spanning the whole corpus: every caption is whole.
    n = int(offsets[-1])
    sample_index = np.array([[0, 0], [len(offsets) - 2, int(offsets[-1] - offsets[-2]) - 1]])
    tok, w = packing.pack_batch(tokens, logprobs, offsets, scales, np.arange(len(offsets) - 1),
                                sample_index, np.array([0]), n - 1, 1.0, 0, True, 1)
    label_doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[1:]
    for d in range(1, len(offsets) - 1):
        in_doc = label_doc == d
        n_loss = int((tokens[offsets[d]:offsets[d + 1]] != 0).sum())
        assert abs(w[0][in_doc].sum() - n_loss) < 1e-3 * max(1, n_loss)
