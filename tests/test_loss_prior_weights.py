"""PRIOR weights in torch agree with the packer, and follow DESIGN.md section 1 on their own."""

import numpy as np
import pytest
import torch

from megatron_prior.data import packing
from megatron_prior.loss import prior_weights

EOD, PAD = 0, 1


def _packed_epoch(seed: int, alpha: float, seq_len: int):
    """One epoch of megatron-core samples over captions ending in EOD: every token is a label
    exactly once, captions are cut across rows, and the batch holds every piece of each."""
    from megatron.core.datasets import helpers_cpp

    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, 30, 40)
    tokens = np.concatenate([np.append(rng.integers(2, 300, n - 1), EOD) for n in lengths]).astype(np.int32)
    logprobs = -rng.exponential(1.5, len(tokens)).astype(np.float32)
    logprobs[rng.random(len(tokens)) < 0.05] = 0.0
    # One caption the reference predicts perfectly: its weights sum to 0 (fallback m = 1).
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    logprobs[offsets[3]:offsets[4]] = 0.0
    doc_of_token = np.repeat(np.arange(len(lengths)), lengths)
    document_index = rng.permutation(len(lengths)).astype(np.int32)
    sample_index = helpers_cpp.build_sample_idx_int32(lengths.astype(np.int32), document_index, seq_len, 1,
                                                      int(lengths.sum()), False, 1)
    samples = np.arange(len(sample_index) - 1)
    args = (offsets, document_index, sample_index, samples, seq_len)
    scales = packing.document_scales_numpy(tokens, logprobs, offsets, alpha, EOD, True, PAD)
    rows, weights = packing.pack_batch_numpy(tokens, logprobs, offsets, scales, document_index, sample_index,
                                             samples, seq_len, alpha, EOD, True, PAD)
    docs = packing.pack_values_numpy(doc_of_token, *args, pad_value=-1)[:, 1:]
    lps = packing.pack_values_numpy(logprobs, *args, pad_value=0.0)[:, 1:]
    labels, previous = rows[:, 1:], rows[:, :-1]
    # The packer's loss tokens: not pad, and not the first token of a document (after EOD).
    mask = (labels != PAD) & (previous != EOD)
    return tokens, logprobs, offsets, scales, document_index, sample_index, samples, (
        torch.from_numpy(lps), torch.from_numpy(docs), torch.from_numpy(mask.astype(np.float32)), weights)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_equals_packer_on_whole_captions(seed, alpha):
    seq_len = 24
    *corpus, (lps, docs, mask, expected) = _packed_epoch(seed, alpha, seq_len)
    assert len(np.unique(docs[docs >= 0])) == 40 and expected.shape[0] > 10
    rows_per_caption = [len(np.unique(np.nonzero(docs.numpy() == d)[0])) for d in range(40)]
    assert max(rows_per_caption) > 1  # some captions are cut across rows
    m = prior_weights(lps, docs, mask, alpha)
    assert m.dtype == torch.float32
    np.testing.assert_allclose(m.numpy(), expected, rtol=1e-6, atol=1e-7)
    if packing.HAVE_EXTENSION:  # the fast path agrees too
        tokens, logprobs, offsets, scales, document_index, sample_index, samples = corpus
        _, fast = packing.pack_batch(tokens, logprobs, offsets, scales, document_index, sample_index,
                                     samples, seq_len, alpha, EOD, True, PAD)
        np.testing.assert_allclose(m.numpy(), fast, rtol=1e-6, atol=1e-7)


def test_formula_fallback_and_mask():
    p = torch.tensor([[0.03, 0.88, 0.5, 0.2], [1.0, 1.0, 0.4, 0.9]], dtype=torch.float64)
    docs = torch.tensor([[7, 7, 7, 9], [9, 9, 4, 4]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.float32)
    m = prior_weights(torch.log(p), docs, mask, alpha=1.0).double()
    w = 1 - p
    # caption 7: 3 tokens; caption 9 spans both rows (w = 0.8, 0, 0); caption 4: one loss token.
    np.testing.assert_allclose(m[0, :3], 3 * w[0, :3] / w[0, :3].sum(), rtol=1e-6)
    np.testing.assert_allclose([m[0, 3], m[1, 0], m[1, 1]], [3.0, 0.0, 0.0], rtol=1e-6)
    assert m[1, 2] == 0 and abs(float(m[1, 3]) - 1.0) < 1e-6
    # Every caption keeps its token count as total mass (the loss keeps NTP's scale).
    assert abs(float(m.sum()) - float(mask.sum())) < 1e-5
    # A caption the reference predicts perfectly falls back to 1 per loss token.
    flat = prior_weights(torch.zeros(1, 3), torch.zeros(1, 3, dtype=torch.long), torch.tensor([[1.0, 0.0, 1.0]]))
    assert flat.tolist() == [[1.0, 0.0, 1.0]]
    # alpha = 2 sharpens: template-like tokens lose more.
    m2 = prior_weights(torch.log(p), docs, mask, alpha=2.0)
    assert m2[0, 1] < m[0, 1] and m2[0, 0] > m[0, 0]


def test_bad_inputs():
    lp, docs, mask = torch.full((2, 3), -1.0), torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3)
    with pytest.raises(ValueError, match="same shape"):
        prior_weights(lp, docs[:1], mask)
    with pytest.raises(TypeError, match="document_ids must be integers"):
        prior_weights(lp, docs.float(), mask)
    bad = lp.clone()
    bad[1, 2] = 0.5
    with pytest.raises(ValueError, match=r"1 value\(s\) > 0"):
        prior_weights(bad, docs, mask)
    bad[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        prior_weights(bad, docs, mask)
    with pytest.raises(ValueError, match="alpha"):
        prior_weights(lp, docs, mask, alpha=-1.0)
