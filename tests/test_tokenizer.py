"""tools/train_tokenizer.py and the tokenizer wrapper: special tokens, offsets, fingerprints."""

import json
import os
import pickle
import shutil

import pytest

from megatron_prior.tokenizer import SPECIAL_PIECES, load_tokenizer

WORDS = "a red blue green cube sphere cone on the left right of near big small café naïve".split()


def write_captions(path, n=300, seed=0, key="caption"):
    import random

    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            f.write(json.dumps({key: " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))}) + "\n")
    return path


def train(tmp_path, vocab=64, key="caption"):
    from tools.train_tokenizer import main

    data = write_captions(tmp_path / "c.jsonl", key=key)
    assert main(["--input", str(data), "--json-keys", key, "--vocab-size", str(vocab),
                 "--output-prefix", str(tmp_path / "tok")]) == 0
    return tmp_path / "tok.model"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return train(tmp_path_factory.mktemp("tok"))


def test_special_tokens_and_round_trip(model_path):
    tok = load_tokenizer(str(model_path))
    ids = {name: getattr(tok, name) for name in SPECIAL_PIECES}
    assert len(set(ids.values())) == len(ids)
    assert all(0 <= i < tok.vocab_size for i in ids.values())
    text = "a red cube near the big café"
    tokens = tok.tokenize(text)
    assert tok.detokenize(tokens) == text
    # Text that spells a special piece never produces it: they are control symbols.
    assert not set(tok.tokenize("<image> <eod> <pad>")) & set(ids.values())
    assert tok.unique_identifiers["fingerprint"] == tok.fingerprint
    json.dumps(tok.unique_identifiers)  # megatron-core hashes it as JSON


def test_offsets_point_at_the_first_visible_character(model_path):
    tok = load_tokenizer(str(model_path))
    text = "the café  is naïve"
    ids, starts = tok.tokenize_with_offsets(text)
    assert ids == tok.tokenize(text)
    # A piece with visible characters is placed on its first one (not on the space before it).
    assert all(not text[s].isspace() for i, s in zip(ids, starts) if tok.detokenize([i]).strip())
    assert starts == sorted(starts)
    word_starts = {i for i, ch in enumerate(text) if not ch.isspace() and (i == 0 or text[i - 1] == " ")}
    assert word_starts <= set(starts)


def test_fingerprint_is_stable_and_tracks_the_model(model_path, tmp_path):
    a = load_tokenizer(str(model_path))
    copy = tmp_path / "moved.model"
    shutil.copy(model_path, copy)
    assert load_tokenizer(str(copy)).fingerprint == a.fingerprint  # content, not path
    other = train(tmp_path, vocab=50)
    assert load_tokenizer(str(other)).fingerprint != a.fingerprint
    clone = pickle.loads(pickle.dumps(a))
    assert clone.fingerprint == a.fingerprint and clone.tokenize("a red cube") == a.tokenize("a red cube")


def test_bad_inputs(model_path, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or directory$"):
        load_tokenizer(str(tmp_path / "nope.model"))
    with pytest.raises(ValueError, match="unknown tokenizer type"):
        load_tokenizer(str(model_path), "GPT2BPETokenizer")
    with pytest.raises(ValueError, match="no piece '<nope>' for image_token_id"):
        load_tokenizer(str(model_path), special_pieces={"image_token_id": "<nope>"})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n{"caption": 3}\n')
    from tools.train_tokenizer import main

    assert main(["--input", str(bad), "--json-keys", "caption", "--vocab-size", "30",
                 "--output-prefix", str(tmp_path / "t")]) == 1
    assert not (tmp_path / "t.model").exists()


@pytest.mark.parametrize("line,reason", [
    ('{"caption": "a \\ud800 b"}', "'caption' holds a lone surrogate ('\\ud800' at character 2), not text"),
    ('{"caption": "a", "x": ' + "[" * 200_000 + "]" * 200_000 + "}", "invalid JSON (nested too deeply)"),
    ('{"caption": "a", "n": ' + "7" * 5000 + "}", "invalid JSON (Exceeds the limit (4300 digits) for integer "
                                                 "string conversion: value has 5000 digits)"),
])
def test_train_tokenizer_names_the_bad_record(tmp_path, capsys, line, reason):
    """Not SentencePiece's RuntimeError or Python's RecursionError: file:line: reason."""
    from tools.train_tokenizer import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"caption": "ok"}\n' + line + "\n")
    assert main(["--input", str(bad), "--json-keys", "caption", "--vocab-size", "30",
                 "--output-prefix", str(tmp_path / "t")]) == 1
    assert capsys.readouterr().err == f"error: {bad}:2: {reason}\n"
    assert os.listdir(tmp_path) == ["bad.jsonl"]


def test_huggingface_tokenizer(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import models, pre_tokenizers, trainers

    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=80, special_tokens=["<unk>"] + list(SPECIAL_PIECES.values()))
    hf.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    tok = load_tokenizer(str(tmp_path))
    assert type(tok).__name__ == "HuggingFaceTokenizer"
    assert tok.eod == hf.token_to_id("<eod>") and tok.image_token_id == hf.token_to_id("<image>")
    ids, starts = tok.tokenize_with_offsets("red  cube")
    assert ids == tok.tokenize("red  cube") and starts[0] == 0 and 5 in starts
    assert tok.fingerprint != load_tokenizer(str(path), special_pieces={"pad": "<unk>"}).fingerprint


def test_a_killed_runs_temporary_files_are_removed(tmp_path, caplog):
    import logging
    import socket
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    left = [f"tok.tmp-{socket.gethostname()}-{dead}{ext}" for ext in (".model", ".vocab")]
    for name in left:
        (tmp_path / name).write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="megatron_prior.files"):
        train(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["c.jsonl", "tok.model", "tok.vocab"]
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"removed {tmp_path / name}, left by an interrupted writer (process {dead} is gone)" for name in left]
