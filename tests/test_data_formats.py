"""Token + log-prob (+ kinds) files: byte-exact with megatron-core, round trips, every refusal."""

import json
import os
import re

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, _IndexWriter

from megatron_prior.data import FormatError, WeightedIndexedDataset
from megatron_prior.data.formats import metadata_path
from megatron_prior.files import sha256_file
from megatron_prior.data.writer import WeightedDatasetWriter

FP = "sha256:tok"


def make_docs(seed=0, n=25, vocab=300):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, vocab, rng.integers(1, 30)).astype(np.int64) for _ in range(n)]
    lps = [-rng.exponential(1.5, len(d)).astype(np.float32) for d in docs]
    kinds = [rng.integers(0, 4, len(d)).astype(np.uint8) for d in docs]
    return docs, lps, kinds


def write_dataset(prefix, seed=0, with_kinds=True, fingerprint=FP, edit=None):
    """A dataset of ``make_docs(seed)``; ``edit(docs, lps, kinds)`` may change them in place first
    (values a writer does not judge, which only the reader's checks can refuse)."""
    docs, lps, kinds = make_docs(seed)
    if edit is not None:
        edit(docs, lps, kinds)
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
    assert meta["values"] == "log p_ref(t_i | t_<i)" and meta["format_version"] == 2
    assert meta["token_count"] == sum(map(len, docs)) and meta["reference"] == {"type": "unigram"}
    assert (meta["sequence_count"], meta["document_count"]) == (len(docs), len(docs))
    assert meta["tokenizer_fingerprint"] == FP
    suffixes = {"tokens.bin": ".bin", "tokens.idx": ".idx", "logprobs.bin": ".logprobs.bin",
                "logprobs.idx": ".logprobs.idx", "kinds.bin": ".kinds.bin", "kinds.idx": ".kinds.idx"}
    assert set(meta["files"]) == set(suffixes)
    for role, suffix in suffixes.items():
        path = str(tmp_path / "T") + suffix
        assert meta["files"][role] == {"size": os.path.getsize(path), "sha256": sha256_file(path)}
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


def _reverse_tokens(docs, lps, kinds):
    docs[:] = [d[::-1].copy() for d in docs]


def test_metadata_of_another_dataset_of_the_same_shape(tmp_path):
    write_dataset(tmp_path / "T")
    write_dataset(tmp_path / "U", edit=_reverse_tokens)  # same sizes everywhere, other tokens
    os.replace(tmp_path / "U.logprobs.json", tmp_path / "T.logprobs.json")
    _expect(tmp_path / "T", r"T\.bin: content differs from what .*T\.logprobs\.json binds")


def test_token_count_and_tokenizer_mismatch(tmp_path):
    write_dataset(tmp_path / "T")
    _expect(tmp_path / "T", r"scored with tokenizer sha256:tok, not with .*other", tokenizer_fingerprint="other")
    meta_path = tmp_path / "T.logprobs.json"
    meta = json.loads(meta_path.read_text())
    meta["token_count"] += 1
    meta_path.write_text(json.dumps(meta))
    _expect(tmp_path / "T", "token_count")
    meta_path.write_text("{not json")
    _expect(tmp_path / "T", r"T\.logprobs\.json: invalid JSON \(Expecting property name")
    meta_path.write_text(json.dumps(dict(meta, values="p_ref")))
    _expect(tmp_path / "T", "values 'p_ref'")


@pytest.mark.parametrize("value,match", [(np.nan, "NaN log-prob nan"),
                                         (0.25, "positive log-prob 0.25"), (np.inf, "infinite log-prob inf")])
def test_bad_values(tmp_path, value, match):
    def edit(docs, lps, kinds):
        lps[1][1] = value

    docs, _, _ = write_dataset(tmp_path / "T", edit=edit)
    _expect(tmp_path / "T", rf"T\.logprobs\.bin: {match} at token {len(docs[0]) + 1} \(sequence 1\)")


def test_bad_kinds(tmp_path):
    def edit(docs, lps, kinds):
        kinds[2][0] = 9

    docs, _, _ = write_dataset(tmp_path / "T", edit=edit)
    at = len(docs[0]) + len(docs[1])
    _expect(tmp_path / "T", rf"T\.kinds\.bin: unknown kind id 9 at token {at} \(sequence 2\)$")
    os.remove(tmp_path / "T.kinds.idx")
    _expect(tmp_path / "T", r"T\.kinds\.idx: missing file")


def test_not_an_index(tmp_path):
    write_dataset(tmp_path / "T")
    path = tmp_path / "T.idx"
    data = bytearray(path.read_bytes())
    data[:4] = b"JUNK"
    path.write_bytes(bytes(data))
    _expect(tmp_path / "T", r"T\.idx: not an MMIDIDX index")


def test_token_ids_outside_the_vocabulary(tmp_path):
    docs, _, _ = write_dataset(tmp_path / "T")  # ids in [0, 300)
    flat = np.concatenate(docs)
    assert len(WeightedIndexedDataset(str(tmp_path / "T"), vocab_size=int(flat.max()) + 1)) == len(docs)
    vocab = 200
    first = int(np.flatnonzero(flat >= vocab)[0])
    seq = int(np.searchsorted(np.cumsum([len(d) for d in docs]), first, side="right"))
    _expect(tmp_path / "T", rf"T\.bin: token id {flat[first]} at token {first} \(sequence {seq}\) outside the "
                            rf"tokenizer's vocabulary \[0, {vocab}\)$", vocab_size=vocab)


def _edit_metadata(prefix, **changes):
    path = metadata_path(str(prefix))
    meta = json.loads(open(path).read())
    meta.update(changes)
    open(path, "w").write(json.dumps(meta))
    return meta


@pytest.mark.parametrize("key", ["sequence_count", "document_count"])
def test_counts_that_disagree_with_the_files(tmp_path, key):
    docs, _, _ = write_dataset(tmp_path / "T")
    _edit_metadata(tmp_path / "T", **{key: len(docs) + 1})
    _expect(tmp_path / "T", rf"T\.logprobs\.json: {key} {len(docs) + 1}, but .*T\.idx holds {len(docs)}$")


@pytest.mark.parametrize("text,match", [
    ("[" * 200_000 + "]" * 200_000, r"invalid JSON \(nested too deeply\)"),
    ('{"token_count": ' + "7" * 5000 + "}", r"invalid JSON \(Exceeds the limit \(4300 digits\)"),
    ('{"a": "\\ud800"}', r"format_version None, expected 2"),
    (b"\xff{}", r"not valid UTF-8"),
])
def test_metadata_that_is_no_json(tmp_path, text, match):
    write_dataset(tmp_path / "T")
    path = tmp_path / "T.logprobs.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    _expect(tmp_path / "T", r"T\.logprobs\.json: " + match)


@pytest.mark.parametrize("change,match", [
    (dict(token_count=True), "'token_count' missing or not a natural number"),
    (dict(document_count=-1), "'document_count' missing or not a natural number"),
    (dict(notes=[]), "'notes' missing or not a dict"),
    (dict(files=[]), "'files' missing or not an object"),
    (dict(files={"tokens.bin": {}}), r"'files' must bind \['tokens.bin', 'tokens.idx', 'logprobs.bin'"),
    (dict(format_version=1), "format_version 1, expected 2"),
])
def test_metadata_fields(tmp_path, change, match):
    write_dataset(tmp_path / "T")
    _edit_metadata(tmp_path / "T", **change)
    _expect(tmp_path / "T", r"T\.logprobs\.json: " + match)


def test_metadata_file_entries(tmp_path):
    write_dataset(tmp_path / "T")
    meta = json.loads(open(metadata_path(str(tmp_path / "T"))).read())
    files = dict(meta["files"], **{"kinds.bin": dict(meta["files"]["kinds.bin"], sha256="XYZ")})
    _edit_metadata(tmp_path / "T", files=files)
    _expect(tmp_path / "T", r"'files' entry 'kinds.bin' must hold a 64-digit hex 'sha256'")
    files = {k: v for k, v in meta["files"].items() if k != "kinds.idx"}
    _edit_metadata(tmp_path / "T", files=files)
    _expect(tmp_path / "T", "both or neither of the kinds files")
    _edit_metadata(tmp_path / "T", files=dict(meta["files"], extra=meta["files"]["tokens.bin"]))
    _expect(tmp_path / "T", r"'files' binds unknown roles \['extra'\]")


def _flip(data: bytes, itemsize: int) -> bytes:
    """The same items in reverse order: same size, other content."""
    return np.frombuffer(data, dtype=f"V{itemsize}")[::-1].tobytes()


@pytest.mark.parametrize("suffix,itemsize", [(".bin", 2), (".logprobs.bin", 4), (".kinds.bin", 1)])
def test_same_size_replacement_is_refused(tmp_path, suffix, itemsize):
    """Shuffled values pass every structural check: only the content hash can tell."""
    write_dataset(tmp_path / "T")
    path = tmp_path / f"T{suffix}"
    before = os.stat(path)
    path.write_bytes(_flip(path.read_bytes(), itemsize))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # even with the old mtime
    _expect(tmp_path / "T", rf"T{re.escape(suffix)}: content differs from what .*T\.logprobs\.json binds")


def test_a_companion_not_bound_is_refused(tmp_path):
    write_dataset(tmp_path / "K", with_kinds=True)
    write_dataset(tmp_path / "T", with_kinds=False)
    for suffix in (".kinds.bin", ".kinds.idx"):
        os.link(tmp_path / f"K{suffix}", tmp_path / f"T{suffix}")
    _expect(tmp_path / "T", r"T\.kinds\.bin: not bound by .*T\.logprobs\.json: left over from another write")


def test_hashes_are_remembered_by_stat(tmp_path, monkeypatch):
    """Opening hashes nothing the writer or an earlier open hashed, unless a file's stat moved."""
    from megatron_prior.data import formats

    write_dataset(tmp_path / "T")
    hashed = []
    real = formats.sha256_file
    monkeypatch.setattr(formats, "sha256_file", lambda path: hashed.append(os.path.basename(path)) or real(path))
    WeightedIndexedDataset(str(tmp_path / "T"))
    assert hashed == []  # seeded by the writer
    os.utime(tmp_path / "T.logprobs.bin")  # touched: same bytes, new mtime/ctime
    WeightedIndexedDataset(str(tmp_path / "T"))
    assert hashed == ["T.logprobs.bin"]
    WeightedIndexedDataset(str(tmp_path / "T"))
    assert hashed == ["T.logprobs.bin"]  # remembered again
    # A damaged cache is only a cold one, and one that contradicts the metadata is read past.
    cache = json.loads((tmp_path / "T.verified.json").read_text())
    cache["tokens.bin"]["sha256"] = "0" * 64
    (tmp_path / "T.verified.json").write_text(json.dumps(cache))
    WeightedIndexedDataset(str(tmp_path / "T"))
    assert hashed == ["T.logprobs.bin", "T.bin"]
    (tmp_path / "T.verified.json").write_text("[[[")
    ds = WeightedIndexedDataset(str(tmp_path / "T"))
    assert len(hashed) == 2 + 6
    # A pickled copy (a DataLoader worker) trusts the stat its parent verified, cache or not.
    os.remove(tmp_path / "T.verified.json")
    import pickle

    pickle.loads(pickle.dumps(ds))
    assert len(hashed) == 8
