"""The C++ packer equals the numpy reference; packed multipliers keep each caption's mass."""

import numpy as np
import pytest

from megatron_prior.data import packing

EOD, PAD = 0, 1
needs_ext = pytest.mark.skipif(not packing.HAVE_EXTENSION, reason="C++ packer not built")


def _corpus(rng, n_docs=60, max_len=40, vocab=500, token_dtype=np.uint16):
    lengths = rng.integers(1, max_len, n_docs)
    docs = [np.append(rng.integers(2, vocab, n - 1), EOD) for n in lengths]
    tokens = np.concatenate(docs).astype(token_dtype)
    # An EOD inside a few documents, so masking after EOD is exercised mid-document too.
    tokens[rng.random(len(tokens)) < 0.02] = EOD
    logprobs = -rng.exponential(2.0, len(tokens)).astype(np.float32)
    logprobs[rng.random(len(tokens)) < 0.05] = 0.0  # certain tokens: weight 0
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return tokens, logprobs, offsets


def _sample_index(rng, offsets, seq_len, epochs=2, index_dtype=np.int32):
    from megatron.core.datasets import helpers_cpp

    n_docs = len(offsets) - 1
    document_index = np.concatenate([rng.permutation(n_docs) for _ in range(epochs)]).astype(np.int32)
    sizes = np.diff(offsets).astype(np.int32)
    build = helpers_cpp.build_sample_idx_int32 if index_dtype == np.int32 else helpers_cpp.build_sample_idx_int64
    sample_index = build(sizes, document_index, seq_len, epochs, int(sizes.sum()), True, 1)
    return document_index, sample_index


def _loss_mask_flat(tokens, offsets, mask_eod):
    prev = np.concatenate([[EOD], tokens[:-1]]).astype(np.int64)
    prev[offsets[:-1][np.diff(offsets) > 0]] = EOD
    return packing.loss_token_mask(tokens, prev, EOD, mask_eod, PAD)


@needs_ext
@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("alpha,mask_eod", [(1.0, True), (0.5, False), (2.0, True)])
def test_cpp_equals_numpy(seed, alpha, mask_eod):
    rng = np.random.default_rng(seed)
    tokens, logprobs, offsets = _corpus(rng)
    seq_len = int(rng.integers(8, 64))  # shorter and longer than documents
    document_index, sample_index = _sample_index(rng, offsets, seq_len)
    scales_np = packing.document_scales_numpy(tokens, logprobs, offsets, alpha, EOD, mask_eod, PAD)
    scales = packing.document_scales(tokens, logprobs, offsets, alpha, EOD, mask_eod, PAD, num_threads=3)
    np.testing.assert_allclose(scales, scales_np, rtol=1e-12)
    samples = rng.permutation(len(sample_index) - 1)
    ref = packing.pack_batch_numpy(tokens, logprobs, offsets, scales, document_index, sample_index,
                                   samples, seq_len, alpha, EOD, mask_eod, PAD)
    got = packing.pack_batch(tokens, logprobs, offsets, scales, document_index, sample_index, samples,
                             seq_len, alpha, EOD, mask_eod, PAD, num_threads=3)
    np.testing.assert_array_equal(got[0], ref[0])
    # Both paths compute each weight in float64 (a few 1e-16 apart: expm1 vs 1 - exp) and round
    # it to float32 once, so they differ by at most one float32 ulp, 2^-23 of the value.
    np.testing.assert_allclose(got[1], ref[1], rtol=2.0 ** -23, atol=0)


@needs_ext
@pytest.mark.parametrize("token_dtype", [np.uint8, np.int32, np.int64])
def test_index_and_token_dtypes(token_dtype):
    """int64 sample indices (megatron's large-corpus case), mixed with int32 document indices."""
    rng = np.random.default_rng(5)
    tokens, logprobs, offsets = _corpus(rng, vocab=200, token_dtype=token_dtype)
    document_index, sample_index = _sample_index(rng, offsets, 16, index_dtype=np.int64)
    assert sample_index.dtype == np.int64 and document_index.dtype == np.int32
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, True, PAD)
    samples = np.arange(len(sample_index) - 1)
    ref = packing.pack_batch_numpy(tokens, logprobs, offsets, scales, document_index, sample_index,
                                   samples, 16, 1.0, EOD, True, PAD)
    got = packing.pack_batch(tokens, logprobs, offsets, scales, document_index, sample_index, samples,
                             16, 1.0, EOD, True, PAD)
    np.testing.assert_array_equal(got[0], ref[0])
    np.testing.assert_allclose(got[1], ref[1], rtol=2.0 ** -23, atol=0)  # one float32 ulp, as above


@needs_ext
@pytest.mark.parametrize("values_dtype", [np.uint8, np.float32])
def test_pack_values_equals_numpy_and_aligns_with_tokens(values_dtype):
    rng = np.random.default_rng(2)
    tokens, logprobs, offsets = _corpus(rng, max_len=90)  # documents longer than a sample
    document_index, sample_index = _sample_index(rng, offsets, 32)
    samples = rng.permutation(len(sample_index) - 1)[:20]
    values = (tokens % 4).astype(values_dtype)
    got = packing.pack_values(values, offsets, document_index, sample_index, samples, 32, 0, num_threads=2)
    ref = packing.pack_values_numpy(values, offsets, document_index, sample_index, samples, 32, 0)
    assert got.dtype == values_dtype
    np.testing.assert_array_equal(got, ref)
    rows, _ = packing.pack_batch(tokens, logprobs, offsets,
                                 packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, False, PAD),
                                 document_index, sample_index, samples, 32, 1.0, EOD, False, PAD)
    np.testing.assert_array_equal(got, (rows % 4).astype(values_dtype))


@pytest.mark.parametrize("mask_eod", [True, False])
def test_whole_caption_multipliers_sum_to_token_count(mask_eod):
    rng = np.random.default_rng(11)
    tokens, logprobs, offsets = _corpus(rng, n_docs=30)
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, mask_eod, PAD)
    # One epoch, in order, one sample spanning the whole corpus: every caption is whole.
    n = int(offsets[-1])
    sample_index = np.array([[0, 0], [len(offsets) - 2, int(offsets[-1] - offsets[-2]) - 1]], dtype=np.int32)
    _, w = packing.pack_batch(tokens, logprobs, offsets, scales, np.arange(len(offsets) - 1, dtype=np.int32),
                              sample_index, np.array([0]), n - 1, 1.0, EOD, mask_eod, PAD)
    keep = _loss_mask_flat(tokens, offsets, mask_eod)
    label_doc = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))[1:]
    for d in range(1, len(offsets) - 1):
        n_loss = int(keep[offsets[d]:offsets[d + 1]].sum())
        assert abs(w[0][label_doc == d].sum() - n_loss) < 1e-4 * max(1, n_loss)
        np.testing.assert_array_equal(w[0][label_doc == d] == 0, ~keep[offsets[d]:offsets[d + 1]]
                                      | (logprobs[offsets[d]:offsets[d + 1]] == 0))


def test_caption_split_across_samples_keeps_its_normaliser():
    """The pieces of a caption cut over several samples carry the whole caption's mass."""
    rng = np.random.default_rng(3)
    tokens, logprobs, offsets = _corpus(rng, n_docs=20, max_len=100)
    seq_len = 7
    document_index = np.arange(20, dtype=np.int32)
    from megatron.core.datasets import helpers_cpp

    sizes = np.diff(offsets).astype(np.int32)
    sample_index = helpers_cpp.build_sample_idx_int32(sizes, document_index, seq_len, 1, int(sizes.sum()), True, 1)
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, False, PAD)
    samples = np.arange(len(sample_index) - 1)
    rows, w = packing.pack_batch(tokens, logprobs, offsets, scales, document_index, sample_index, samples,
                                 seq_len, 1.0, EOD, False, PAD)
    # Labels in stream order are tokens 1 .. covered; sum them per document.
    flat_w = w.reshape(-1)
    covered = len(flat_w)
    label_doc = np.repeat(np.arange(20), sizes)[1:covered + 1]
    np.testing.assert_array_equal(rows[:, 1:].reshape(-1), tokens[1:covered + 1])
    for d in range(1, 20):
        if offsets[d + 1] - 1 <= covered:  # a whole caption, spread over several samples
            assert abs(flat_w[label_doc == d].sum() - sizes[d]) < 1e-4 * sizes[d]


def test_zero_weight_caption_falls_back_to_one():
    tokens = np.array([5, 6, 7, EOD, 8, 9, EOD], dtype=np.uint16)
    logprobs = np.array([0, 0, 0, 0, -1, -2, -0.5], dtype=np.float32)
    offsets = np.array([0, 4, 7])
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, False, PAD)
    assert scales[0] == -1.0
    _, w = packing.pack_batch(tokens, logprobs, offsets, scales, np.array([0, 1], dtype=np.int32),
                              np.array([[0, 0], [1, 2]], dtype=np.int32), [0], 6, 1.0, EOD, False, PAD)
    np.testing.assert_array_equal(w[0, :3], [1, 1, 1])
    w_doc1 = 1 - np.exp(np.array([-1.0, -2.0, -0.5]))
    np.testing.assert_allclose(w[0, 3:], 3 * w_doc1 / w_doc1.sum(), rtol=1e-6)


@needs_ext
def test_bad_inputs_are_refused():
    rng = np.random.default_rng(0)
    tokens, logprobs, offsets = _corpus(rng, n_docs=10)
    document_index, sample_index = _sample_index(rng, offsets, 8)
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, True, PAD)
    args = (tokens, logprobs, offsets, scales, document_index, sample_index)
    with pytest.raises(IndexError, match="outside"):
        packing.pack_batch(*args, [len(sample_index) - 1], 8, 1.0, EOD, True, PAD)
    with pytest.raises(TypeError, match="logprobs: expected dtype float32"):
        packing.pack_batch(tokens, logprobs.astype(np.float64), *args[2:], [0], 8, 1.0, EOD, True, PAD)
    with pytest.raises(TypeError, match="tokens: dtype float32"):
        packing.document_scales(logprobs, logprobs, offsets, 1.0, EOD, True, PAD)
    bad_docs = document_index.copy()
    bad_docs[sample_index[0, 0]] = 99
    with pytest.raises(IndexError, match="document_index"):
        packing.pack_batch(tokens, logprobs, offsets, scales, bad_docs, sample_index, [0], 8, 1.0, EOD, True, PAD)
    with pytest.raises(ValueError, match="not monotone"):
        packing.document_scales(tokens, logprobs, offsets[::-1].copy(), 1.0, EOD, True, PAD)


def test_weights_of_near_certain_tokens_are_exact():
    """1 - p for p close to 1 (template tokens) keeps its relative precision."""
    lp = np.array([-1e-9, -1e-6, -3e-4], dtype=np.float32)
    exact = -np.expm1(lp.astype(np.float64))
    np.testing.assert_allclose(packing.token_weights(lp, 1.0), exact, rtol=1e-15)
    tokens = np.array([5, 6, 7, EOD], dtype=np.uint16)
    logprobs = np.append(lp, np.float32(-2.0))
    scales = packing.document_scales(tokens, logprobs, np.array([0, 4]), 1.0, EOD, False, PAD)
    _, w = packing.pack_batch(tokens, logprobs, np.array([0, 4]), scales, np.array([0], dtype=np.int32),
                              np.array([[0, 0], [0, 3]], dtype=np.int32), [0], 3, 1.0, EOD, False, PAD)
    w_all = -np.expm1(logprobs.astype(np.float64))
    np.testing.assert_allclose(w[0], (4 * w_all / w_all.sum())[1:], rtol=1e-6)


def _both_paths(call):
    """The message of ``call(numpy_fn)`` and ``call(cpp_fn)`` for each packer entry point."""
    from megatron_prior import _packer

    messages = []
    for module, suffix in ((packing, "_numpy"), (_packer, "")):
        with pytest.raises(ValueError) as info:
            call(lambda name: getattr(module, name + suffix))
        messages.append(str(info.value))
    return messages


@needs_ext
@pytest.mark.parametrize("alpha", [float("nan"), -0.5, float("inf"), float("-inf")])
def test_alpha_must_be_finite_and_not_negative_in_both_paths(alpha):
    rng = np.random.default_rng(0)
    tokens, logprobs, offsets = _corpus(rng)
    document_index, sample_index = _sample_index(rng, offsets, 16)
    scales = packing.document_scales(tokens, logprobs, offsets, 1.0, EOD, True, PAD)
    samples = np.arange(4, dtype=np.int64)
    expected = f"alpha must be a finite number >= 0, got {alpha!r}"
    assert _both_paths(lambda fn: fn("document_scales")(
        tokens, logprobs, offsets, alpha, EOD, True, PAD)) == [expected] * 2
    assert _both_paths(lambda fn: fn("pack_batch")(
        tokens, logprobs, offsets, scales, document_index, sample_index, samples, 16, alpha, EOD, True,
        PAD)) == [expected] * 2


@needs_ext
@pytest.mark.parametrize("values_dtype,pad,name", [
    (np.float32, float("nan"), "float32"), (np.uint8, float("nan"), "uint8"), (np.uint8, -1.0, "uint8"),
    (np.uint8, 256.0, "uint8"), (np.uint8, 0.5, "uint8"), (np.int32, 2.0**31, "int32"),
])
def test_pad_value_must_be_a_value_of_the_dtype_in_both_paths(values_dtype, pad, name):
    rng = np.random.default_rng(0)
    _, _, offsets = _corpus(rng)
    values = np.zeros(int(offsets[-1]), dtype=values_dtype)
    document_index, sample_index = _sample_index(rng, offsets, 16)
    samples = np.arange(4, dtype=np.int64)
    assert _both_paths(lambda fn: fn("pack_values")(
        values, offsets, document_index, sample_index, samples, 16, pad)) == [
        f"pad_value {pad!r} is not a value of dtype {name}"] * 2


_THREAD_LIMIT_CHILD = r"""
import re, resource
import numpy as np
from megatron_prior import _packer

n = 64
tokens, logprobs = np.zeros(4 * n, np.uint16), np.full(4 * n, -1.0, np.float32)
offsets = np.arange(0, 4 * n + 1, 4, dtype=np.int64)
vm = int(re.search(r"VmSize:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024
# Room for two 8 MiB thread stacks (RLIMIT_STACK, set by the parent), not for a third.
resource.setrlimit(resource.RLIMIT_AS, (vm + 20 * 2**20, resource.RLIM_INFINITY))
try:
    _packer.document_scales(tokens, logprobs, offsets, 1.0, 2, False, 1, 8)
except RuntimeError as err:
    print("raised:", err)
resource.setrlimit(resource.RLIMIT_AS, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
print("after:", _packer.document_scales(tokens, logprobs, offsets, 1.0, 2, False, 1, 8)[0])
"""


@needs_ext
def test_a_thread_that_cannot_start_is_an_error_not_an_abort():
    """Under an address-space limit the third thread's stack cannot be mapped: the two already
    running are joined and Python gets the error (the interpreter used to abort with
    'terminate called without an active exception')."""
    import resource
    import subprocess
    import sys

    def limit_stack():  # glibc sizes thread stacks from RLIMIT_STACK at process start
        resource.setrlimit(resource.RLIMIT_STACK, (8 * 2**20, resource.getrlimit(resource.RLIMIT_STACK)[1]))

    proc = subprocess.run([sys.executable, "-c", _THREAD_LIMIT_CHILD], capture_output=True, text=True,
                          preexec_fn=limit_stack, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == ("raised: packer: could not start thread 3 of 8 (Resource temporarily unavailable); "
                        "use fewer threads"), proc.stdout
    # The process carries on: 4 tokens of weight w = 1 - e^-1 give scale 4 / (w + w + w + w), within a
    # few roundings (the sum's and C's exp against numpy's) of 1 / w.
    assert lines[1].startswith("after: ")
    assert float(lines[1][len("after: "):]) == pytest.approx(1 / (1 - np.exp(-1.0)), rel=4 * np.finfo(float).eps)
