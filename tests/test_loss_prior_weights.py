"""The packer's PRIOR multipliers (numpy reference and C++) equal the per-caption formula,
written here in float64 on its own: ``w_i = (1 - p_i) ** alpha`` over a caption's loss tokens,
``m_i = n_c * w_i / sum_c w``, ``m_i = 1`` where the caption's weights sum to 0, 0 off the mask."""

import numpy as np
import pytest

from megatron_prior.data import packing

EOD, PAD = 0, 1
N_CAPTIONS = 40


def prior_multipliers(logprobs: np.ndarray, caption_ids: np.ndarray, loss_mask: np.ndarray,
                      alpha: float) -> np.ndarray:
    """The formula, caption by caption, wherever the caption's tokens sit in the array."""
    keep = loss_mask != 0
    m = np.zeros(logprobs.shape, dtype=np.float64)
    for caption in np.unique(caption_ids[keep]):
        at = keep & (caption_ids == caption)
        w = (1.0 - np.exp(logprobs[at].astype(np.float64))) ** alpha
        m[at] = at.sum() * w / w.sum() if w.sum() > 0 else 1.0
    return m


def _packed_epoch(seed: int, alpha: float, seq_len: int):
    """One epoch of megatron-core samples over captions ending in EOD: every token is a label
    exactly once, captions are cut across rows, and the batch holds every piece of each."""
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 30, N_CAPTIONS)
    tokens = np.concatenate([np.append(rng.integers(2, 300, n - 1), EOD) for n in lengths]).astype(np.int32)
    logprobs = -rng.exponential(1.5, len(tokens)).astype(np.float32)
    logprobs[rng.random(len(tokens)) < 0.05] = 0.0
    # One caption the reference predicts perfectly: its weights sum to 0 (fallback m = 1).
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    logprobs[offsets[3]:offsets[4]] = 0.0
    caption_of_token = np.repeat(np.arange(N_CAPTIONS), lengths)
    document_index = rng.permutation(N_CAPTIONS).astype(np.int32)
    sample_index = helpers_cpp.build_sample_idx_int32(lengths.astype(np.int32), document_index, seq_len, 1,
                                                      int(lengths.sum()), False, 1)
    samples = np.arange(len(sample_index) - 1)
    cut = (offsets, document_index, sample_index, samples, seq_len)
    scales = packing.document_scales_numpy(tokens, logprobs, offsets, alpha, EOD, True, PAD)
    pack_args = (tokens, logprobs, offsets, scales, document_index, sample_index, samples, seq_len, alpha,
                 EOD, True, PAD)
    captions = packing.pack_values_numpy(caption_of_token, *cut, pad_value=-1)[:, 1:]
    label_logprobs = packing.pack_values_numpy(logprobs, *cut, pad_value=0.0)[:, 1:]
    return pack_args, captions, label_logprobs


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_packer_equals_the_per_caption_formula(seed, alpha):
    pack_args, captions, label_logprobs = _packed_epoch(seed, alpha, seq_len=24)
    rows, weights = packing.pack_batch_numpy(*pack_args)
    assert weights.dtype == np.float32 and weights.shape[0] > 10
    rows_per_caption = [len(np.unique(np.nonzero(captions == c)[0])) for c in range(N_CAPTIONS)]
    assert min(rows_per_caption) >= 1 and max(rows_per_caption) > 1  # some captions are cut across rows
    # The packer's loss tokens: not pad, and not the first token of a caption (after EOD).
    loss_mask = (rows[:, 1:] != PAD) & (rows[:, :-1] != EOD)
    expected = prior_multipliers(label_logprobs, captions, loss_mask, alpha)
    assert (expected[captions == 3] == loss_mask[captions == 3]).all()  # the fallback caption
    # The packer rounds a float64 value to float32 once (half an ulp, 2^-24 relative); the two
    # float64 computations differ by a few 1e-16.
    np.testing.assert_allclose(weights, expected, rtol=2.0 ** -23, atol=0)
    if packing.HAVE_EXTENSION:
        _, fast = packing.pack_batch(*pack_args)
        np.testing.assert_allclose(fast, expected, rtol=2.0 ** -23, atol=0)
