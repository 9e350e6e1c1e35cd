"""Token + log-prob (+ kinds) files: byte-exact with megatron-core, round trips, every refusal."""

import json
import os

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, _IndexWriter

from megatron_prior.data import FormatError, WeightedIndexedDataset
from megatron_prior.data.formats import WeightedDatasetWriter, metadata_path

FP = "sha256:tok"


def make_docs(seed=0, n=25, vocab=300):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, rng.integers(1, 30)).astype(np.int64) for _ in range(n)]
    lps = [-rng.exponential(1.5, len(d)).astype(np.float32) for d in docs]
    kinds = [rng.integers(0, 4, len(d)).astype(np.uint8) for d in docs]
    return docs, lps, kinds


def write_dataset(prefix, seed=0, with_kinds=True, fingerprint=FP):
    docs, lps, kinds = make_docs(seed)
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=with_kinds) as w:
        for d, lp, k in zip(docs, lps, kinds):
            w.add_document(d, lp, k if with_kinds else None)
        w.finalize(fingerprint, {"type": "unigram"})
    return docs, lps, kinds


def test_tokens_byte_identical_to_megatron_builder_and_stock_reader(tmp_path):
    docs, lps, kinds = write_dataset(tmp_path / "T")
    builder = IndexedDatasetBuilder(str(tmp_path / "ref.bin"), dtype=np.uint16)
    for d in docs:
        builder.add_item(torch.from_numpy(d))
        builder.end_document()
    builder.finalize(str(tmp_path / "ref.idx"))
    for ext in (".bin", ".idx"):
        assert (tmp_path / f"T{ext}").read_bytes() == (tmp_path / f"ref{ext}").read_bytes()
    # Stock megatron-core reads all three, float32 scores (dtype code 7) included.
    stock_tokens = IndexedDataset(str(tmp_path / "T"))
    stock_scores = IndexedDataset(str(tmp_path / "T.logprobs"))
    stock_kinds = IndexedDataset(str(tmp_path / "T.kinds"))
    assert stock_scores.index.dtype == np.float32 and stock_kinds.index.dtype == np.uint8
    for i, (d, lp, k) in enumerate(zip(docs, lps, kinds)):
        np.testing.assert_array_equal(stock_tokens[i], d)
        np.testing.assert_array_equal(stock_scores[i], lp)
        np.testing.assert_array_equal(stock_kinds[i], k)
    np.testing.assert_array_equal(stock_scores.document_indices, stock_tokens.document_indices)


def test_round_trip_and_metadata(tmp_path):
    docs, lps, _ = write_dataset(tmp_path / "T")
    ds = WeightedIndexedDataset(str(tmp_path / "T"), tokenizer_fingerprint=FP)
    assert len(ds) == len(docs) and ds.has_kinds
    for i in range(len(docs)):
        tokens, logprobs = ds[i]
        np.testing.assert_array_equal(tokens, docs[i])
        assert logprobs.dtype == np.float32
        np.testing.assert_array_equal(logprobs, lps[i])
        if len(docs[i]) >= 3:
            np.testing.assert_array_equal(ds.get(i, 1, 2), docs[i][1:3])
    np.testing.assert_array_equal(ds.document_indices, np.arange(len(docs) + 1))
    meta = json.loads(open(metadata_path(str(tmp_path / "T"))).read())
    assert meta["values"] == "log p_ref(t_i | t_<i)" and meta["format_version"] == 1
    assert meta["token_count"] == sum(map(len, docs)) and meta["reference"] == {"type": "unigram"}
    assert meta["tokenizer_fingerprint"] == FP and len(meta["tokens_idx_sha256"]) == 64
    import pickle

    clone = pickle.loads(pickle.dumps(ds))
    np.testing.assert_array_equal(clone[3][1], lps[3])


def test_interrupted_writer_leaves_nothing(tmp_path):
    docs, lps, kinds = make_docs()
    with pytest.raises(RuntimeError):
        with WeightedDatasetWriter(str(tmp_path / "T"), np.uint16, with_kinds=True) as w:
            w.add_document(docs[0], lps[0], kinds[0])
            raise RuntimeError("killed")
    assert os.listdir(tmp_path) == []


def _expect(prefix, match, **kwargs):
    with pytest.raises(FormatError, match=match) as info:
        WeightedIndexedDataset(str(prefix), **kwargs)
    assert isinstance(info.value, ValueError)
    return info.value


@pytest.mark.parametrize("suffix", [".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".logprobs.json"])
def test_missing_file(tmp_path, suffix):
    write_dataset(tmp_path / "T")
    os.remove(tmp_path / f"T{suffix}")
    err = _expect(tmp_path / "T", "missing file")
    assert err.path.endswith(f"T{suffix}")


@pytest.mark.parametrize("suffix", [".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".kinds.bin"])
def test_truncated_file(tmp_path, suffix):
    write_dataset(tmp_path / "T")
    path = tmp_path / f"T{suffix}"
    path.write_bytes(path.read_bytes()[:-3])
    err = _expect(tmp_path / "T", "truncated|bytes, expected")
    assert err.path.endswith(f"T{suffix}")


def _rewrite_index(prefix, dtype, lengths, docs):
    with _IndexWriter(str(prefix) + ".idx", dtype) as w:
        w.write(lengths, None, docs)


def test_lengths_differ(tmp_path):
    docs, _, _ = write_dataset(tmp_path / "T")
    lengths = [len(d) for d in docs]
    lengths[0], lengths[1] = lengths[0] + 1, lengths[1] - 1  # same total: only the index can tell
    assert lengths[1] >= 0
    _rewrite_index(tmp_path / "T.logprobs", np.float32, lengths, list(range(len(docs) + 1)))
    _expect(tmp_path / "T", r"T\.logprobs\.idx: sequence lengths differ .*first 0")


def test_document_indices_differ(tmp_path):
    docs, _, _ = write_dataset(tmp_path / "T")
    _rewrite_index(tmp_path / "T.logprobs", np.float32, [len(d) for d in docs], [0, 5, len(docs)])
    _expect(tmp_path / "T", r"T\.logprobs\.idx: document indices differ")


def test_scores_stored_as_another_dtype(tmp_path):
    docs, lps, _ = write_dataset(tmp_path / "T")
    (tmp_path / "T.logprobs.bin").write_bytes(np.concatenate(lps).astype(np.float64).tobytes())
    _rewrite_index(tmp_path / "T.logprobs", np.float64, [len(d) for d in docs], list(range(len(docs) + 1)))
    _expect(tmp_path / "T", r"T\.logprobs\.idx: dtype code 6 \(float64\), expected 7 \(float32\)")


def test_metadata_bound_to_another_token_file(tmp_path):
    write_dataset(tmp_path / "T", seed=0)
    write_dataset(tmp_path / "U", seed=1)
    os.replace(tmp_path / "U.logprobs.json", tmp_path / "T.logprobs.json")
    _expect(tmp_path / "T", r"T\.logprobs\.json: bound to another token file")


def test_token_count_and_tokenizer_mismatch(tmp_path):
    write_dataset(tmp_path / "T")
    _expect(tmp_path / "T", r"scored with tokenizer sha256:tok, not with .*other", tokenizer_fingerprint="other")
    meta_path = tmp_path / "T.logprobs.json"
    meta = json.loads(meta_path.read_text())
    meta["token_count"] += 1
    meta_path.write_text(json.dumps(meta))
    _expect(tmp_path / "T", "token_count")
    meta_path.write_text("{not json")
    _expect(tmp_path / "T", "not valid JSON")
    meta_path.write_text(json.dumps(dict(meta, values="p_ref")))
    _expect(tmp_path / "T", "values 'p_ref'")


@pytest.mark.parametrize("value,match", [(np.nan, "NaN"), (0.25, "positive"), (np.inf, "infinite")])
def test_bad_values(tmp_path, value, match):
    docs, lps, _ = write_dataset(tmp_path / "T")
    flat = np.concatenate(lps)
    flat[len(docs[0]) + 1] = value
    (tmp_path / "T.logprobs.bin").write_bytes(flat.tobytes())
    _expect(tmp_path / "T", rf"T\.logprobs\.bin: {match} .* at token {len(docs[0]) + 1} \(sequence 1\)")


def test_bad_kinds(tmp_path):
    docs, _, kinds = write_dataset(tmp_path / "T")
    flat = np.concatenate(kinds)
    flat[4] = 9
    (tmp_path / "T.kinds.bin").write_bytes(flat.tobytes())
    _expect(tmp_path / "T", r"T\.kinds\.bin: unknown kind id 9 at token 4")
    os.remove(tmp_path / "T.kinds.idx")
    _expect(tmp_path / "T", r"T\.kinds\.idx: missing file")


def test_not_an_index(tmp_path):
    write_dataset(tmp_path / "T")
    path = tmp_path / "T.idx"
    data = bytearray(path.read_bytes())
    data[:4] = b"JUNK"
    path.write_bytes(bytes(data))
    _expect(tmp_path / "T", r"T\.idx: not an MMIDIDX index")
