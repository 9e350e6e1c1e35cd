"""tools/merge_weighted_datasets.py: shards merge into what one preprocessing run writes."""

import json
import os

import numpy as np
import pytest

from megatron_prior.data import FormatError, WeightedDatasetWriter, WeightedIndexedDataset
from tools.merge_weighted_datasets import main as merge_main

FP = "sha256:tok"


def _docs(seed, n):
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 15))
        out.append((rng.integers(0, 500, k), -rng.exponential(1.0, k).astype(np.float32),
                    rng.integers(0, 4, k).astype(np.uint8), rng.integers(0, 256, (4, 3, 3), dtype=np.uint8)))
    return out


def write(prefix, docs, fingerprint=FP, reference=None, kinds=True, image_size=(4, 3)):
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=kinds, image_size=image_size) as w:
        for tokens, lp, k, image in docs:
            w.add_document(tokens, lp, k if kinds else None, np.resize(image, (*image_size, 3)) if image_size else None)
        w.finalize(fingerprint, reference or {"type": "unigram"})
    return str(prefix)


def test_merge_equals_single_run(tmp_path):
    parts = [_docs(s, n) for s, n in ((0, 7), (1, 12), (2, 1))]
    shards = [write(tmp_path / f"shard{i}", p) for i, p in enumerate(parts)]
    whole = write(tmp_path / "whole", [d for p in parts for d in p])
    assert merge_main(["--input", *shards, "--output-prefix", str(tmp_path / "merged")]) == 0
    merged = str(tmp_path / "merged")
    for suffix in (".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".kinds.bin", ".kinds.idx", ".images"):
        assert open(merged + suffix, "rb").read() == open(whole + suffix, "rb").read(), suffix
    meta = json.load(open(merged + ".logprobs.json"))
    assert meta["token_count"] == sum(len(d[0]) for p in parts for d in p)
    assert [m["prefix"] for m in meta["notes"]["merged_from"]] == shards
    ds = WeightedIndexedDataset(merged, tokenizer_fingerprint=FP)
    assert len(ds) == 20 and len(ds.open_images()) == 20
    # A folder merges its datasets in name order.
    os.makedirs(tmp_path / "dir")
    for i, p in enumerate(parts):
        write(tmp_path / "dir" / f"s{i}", p)
    assert merge_main(["--input", str(tmp_path / "dir"), "--output-prefix", str(tmp_path / "from_dir")]) == 0
    assert open(str(tmp_path / "from_dir.logprobs.bin"), "rb").read() == open(whole + ".logprobs.bin", "rb").read()


@pytest.mark.parametrize("change,match", [
    (dict(fingerprint="sha256:other"), "tokenizer sha256:other differs"),
    (dict(reference={"type": "gpt", "path": "x"}), "reference model"),
    (dict(kinds=False), "kinds False differs"),
    (dict(image_size=(5, 3)), r"images \(store, shape, aspect\) \('raw', \(5, 3, 3\), None\) differs"),
])
def test_refused_mixes(tmp_path, capsys, change, match):
    a = write(tmp_path / "a", _docs(0, 3))
    b = write(tmp_path / "b", _docs(1, 3), **change)
    assert merge_main(["--input", a, b, "--output-prefix", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert f"{b}: " in err and __import__("re").search(match, err), err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("m.")]


def test_damaged_shard_is_named(tmp_path, capsys):
    a = write(tmp_path / "a", _docs(0, 3))
    b = write(tmp_path / "b", _docs(1, 3))
    open(b + ".logprobs.bin", "ab").write(b"\x00\x00")
    assert merge_main(["--input", a, b, "--output-prefix", str(tmp_path / "m")]) == 1
    assert f"{b}.logprobs.bin: " in capsys.readouterr().err
    with pytest.raises(FormatError):
        WeightedIndexedDataset(b)


def test_output_that_resolves_to_an_input_is_refused(tmp_path, capsys, monkeypatch):
    """``./dir/a`` is ``dir/a``: comparing resolved paths, not strings, keeps the input intact."""
    os.makedirs(tmp_path / "dir")
    a = write(tmp_path / "dir" / "a", _docs(0, 3))
    b = write(tmp_path / "b", _docs(1, 3))
    before = {f: open(tmp_path / "dir" / f, "rb").read() for f in os.listdir(tmp_path / "dir")}
    monkeypatch.chdir(tmp_path)
    assert merge_main(["--input", "dir/a", b, "--output-prefix", "./dir/a"]) == 1
    assert capsys.readouterr().err == ("error: --output-prefix ./dir/a would overwrite ./dir/a.bin, a file of the "
                                       "input dir/a\n")
    os.symlink(tmp_path / "dir", tmp_path / "link")
    assert merge_main(["--input", a, b, "--output-prefix", "link/a"]) == 1
    assert "would overwrite link/a.bin, a file of the input " in capsys.readouterr().err
    assert {f: open(tmp_path / "dir" / f, "rb").read() for f in os.listdir(tmp_path / "dir")} == before
