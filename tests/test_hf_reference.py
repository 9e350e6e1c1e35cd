"""``--reference-type hf``: captions scored by Hugging Face causal LMs (a Llama with grouped-query
attention, a GPT-2) through ``tools/preprocess_with_weights.py`` equal the model's own float32
``log_softmax`` under the one scoring rule (start token: BOS, else EOS); scores are bound to the
model's files; a reference that does not fit the tokenizer is refused by name."""

import json
import logging
import os
import re
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from megatron_prior.data import WeightedIndexedDataset
from megatron_prior.scoring import hf_model_hash
from megatron_prior.tokenizer import load_tokenizer
from tests.hf_helpers import make_hf_causal_lm, make_hf_tokenizer
from tests.test_preprocess import run_tool, write_jsonl

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Captions; a tokenizer with BOS and a Llama on it; one without BOS and a GPT-2 on it."""
    root = tmp_path_factory.mktemp("hf_ref")
    jsonl = write_jsonl(root, 24)
    texts = [json.loads(line)["caption"] for line in open(jsonl)]
    tok_bos = make_hf_tokenizer(root / "tok_bos", texts)
    tok_eos = make_hf_tokenizer(root / "tok_eos", texts, bos=False)
    llama = make_hf_causal_lm(root / "llama", "llama", load_tokenizer(tok_bos).own_vocab_size, seed=1,
                              tokenizer_dir=tok_bos)
    gpt2 = make_hf_causal_lm(root / "gpt2", "gpt2", load_tokenizer(tok_eos).own_vocab_size + 3, seed=2,
                             tokenizer_dir=tok_eos)
    return {"root": root, "jsonl": jsonl, "llama": (llama, tok_bos), "gpt2": (gpt2, tok_eos)}


def _args(jsonl, tok, out, model, *extra):
    return ["--input", jsonl, "--json-keys", "caption", "--tokenizer-type", "HuggingFaceTokenizer",
            "--tokenizer-model", tok, "--output-prefix", out, "--reference-type", "hf", "--reference-load", model,
            *extra]


def _model_logprobs(model, doc: np.ndarray, start: int, window: int) -> np.ndarray:
    """The model's own log_softmax, one unpadded sequence per window: the first window reads
    ``start`` before its first token, a later one the token before it."""
    out = []
    with torch.no_grad():
        for s in range(0, len(doc), window):
            target = torch.from_numpy(doc[s:s + window].astype(np.int64))
            inputs = torch.cat([torch.tensor([start if s == 0 else int(doc[s - 1])]), target[:-1]])
            logits = model(input_ids=inputs.unsqueeze(0)).logits[0]
            out.append(torch.log_softmax(logits.float(), dim=-1)[torch.arange(len(target)), target].numpy())
    return np.concatenate(out)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("append_eod", [True, False])
def test_scores_equal_the_models_own_log_softmax(setup, tmp_path, capsys, family, append_eod):
    model_dir, tok_dir = setup[family]
    tok = load_tokenizer(tok_dir)
    out = tmp_path / "d"
    # A small batch budget: several length-sorted batches, right-padded.
    run_tool(*_args(setup["jsonl"], tok_dir, out, model_dir, "--score-batch-tokens", "24",
                    *(["--append-eod"] if append_eod else [])))
    start = tok.bos if family == "llama" else tok.eod  # Llama's tokenizer has a BOS, GPT-2's here none
    assert f"first token scored after token {start} ({'bos' if family == 'llama' else 'eod'})" in \
        capsys.readouterr().err
    ds = WeightedIndexedDataset(f"{out}_caption_document", tok.fingerprint, tok.vocab_size)
    meta = ds.metadata.reference
    assert meta == {"type": "hf", "path": os.path.abspath(model_dir), "model_type": family,
                    "model_sha256": hf_model_hash(model_dir), "dtype": "float32", "window": 24,
                    "first_token_context": "bos" if family == "llama" else "eod", "start_token_id": start}
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    captions = [json.loads(line)["caption"] for line in open(setup["jsonl"])]
    for i, caption in enumerate(captions):
        tokens, logprobs = ds[i]
        assert list(tokens) == tok.tokenize(caption) + ([tok.eod] if append_eod else [])
        assert logprobs.dtype == np.float32
        np.testing.assert_allclose(logprobs, _model_logprobs(model, tokens, start, 24), rtol=0, atol=1e-5)
    # The random model is far from uniform: the comparison is not of near-constant numbers.
    assert np.ptp(ds.logprob_array) > 1.0


def test_windows_and_start_token(setup, tmp_path):
    model_dir, tok_dir = setup["llama"]
    tok = load_tokenizer(tok_dir)
    out = tmp_path / "w"
    run_tool(*_args(setup["jsonl"], tok_dir, out, model_dir, "--append-eod", "--reference-window", "4"))
    ds = WeightedIndexedDataset(f"{out}_caption_document", tok.fingerprint, tok.vocab_size)
    assert ds.metadata.reference["window"] == 4
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    for i in range(len(ds)):
        tokens, logprobs = ds[i]
        assert len(tokens) > 4  # two windows or more
        np.testing.assert_allclose(logprobs, _model_logprobs(model, tokens, tok.bos, 4), rtol=0, atol=1e-5)


def test_scores_are_bound_to_the_model_files(setup, tmp_path):
    model_dir, _ = setup["llama"]
    copy = shutil.copytree(model_dir, tmp_path / "copy")
    assert hf_model_hash(copy) == hf_model_hash(model_dir)
    (copy / "generation_config.json").write_text("{}")  # not part of the model's numbers
    assert hf_model_hash(copy) == hf_model_hash(model_dir)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "rms_norm_eps": 1e-5}))
    assert hf_model_hash(copy) != hf_model_hash(model_dir)
    shutil.copy(os.path.join(model_dir, "config.json"), copy / "config.json")
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert hf_model_hash(copy) != hf_model_hash(model_dir)


def test_references_that_do_not_fit_are_refused_by_name(setup, tmp_path, capsys, caplog):
    root, jsonl = setup["root"], setup["jsonl"]
    llama, tok_bos = setup["llama"]
    _, tok_eos = setup["gpt2"]
    own = load_tokenizer(tok_bos).own_vocab_size

    def refused(tok, model, message, *extra):
        assert run_tool(*_args(jsonl, tok, tmp_path / "o", model, *extra), check=False) == 1
        err = capsys.readouterr().err
        assert message in err, err
        assert not list(tmp_path.glob("o_*"))  # nothing written

    # Its tokenizer is not the data's.
    mixed = shutil.copytree(llama, tmp_path / "mixed")
    for name in os.listdir(tok_eos):
        shutil.copy(os.path.join(tok_eos, name), mixed / name)
    refused(tok_bos, mixed, f"--reference-load {mixed}: its tokenizer ({load_tokenizer(tok_eos).fingerprint}) is "
                            f"not the one of --tokenizer-model {tok_bos} ({load_tokenizer(tok_bos).fingerprint})")
    # Its vocabulary does not cover the tokenizer's ids.
    small = make_hf_causal_lm(tmp_path / "small", "llama", own - 1)
    refused(tok_bos, small, f"--reference-load {small}: vocabulary of {own - 1} tokens, smaller than the {own} "
                            "ids of the tokenizer (--tokenizer-model)")
    # A hub id, a folder without safetensors weights, a window past the model's positions.
    refused(tok_bos, "meta-llama/Llama-3.2-3B", "--reference-load meta-llama/Llama-3.2-3B: no such file or "
                                                "directory; if 'meta-llama/Llama-3.2-3B' is a Hugging Face hub id, "
                                                "download it first (huggingface-cli download meta-llama/Llama-3.2-3B "
                                                "--local-dir DIR)")
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(os.path.join(llama, "config.json"), bare / "config.json")
    refused(tok_bos, bare, f"--reference-load {bare}: needs config.json and *.safetensors weights")
    refused(tok_bos, llama, f"--reference-window 65: more than the 64 positions of --reference-load {llama}",
            "--reference-window", "65")
    with pytest.raises(SystemExit):
        run_tool(*_args(jsonl, tok_bos, tmp_path / "o", llama)[:-2])
    assert "--reference-type hf needs --reference-load DIR" in capsys.readouterr().err
    # Without a tokenizer beside it only the vocabulary can be checked, and the log says so.
    untokenized = make_hf_causal_lm(tmp_path / "untokenized", "llama", own)
    with caplog.at_level(logging.WARNING, logger="megatron_prior.scoring"):
        run_tool(*_args(jsonl, tok_bos, tmp_path / "u", untokenized))
    assert any(re.search(rf"{untokenized} holds no tokenizer.json: only its vocabulary size \({own}\) was checked",
                         r.getMessage()) for r in caplog.records)


def _convert(hf_dir: str, output: str) -> None:
    from megatron_prior import parallel
    from megatron_prior.convert import convert_hf_to_megatron

    parallel.initialize()
    convert_hf_to_megatron(hf_dir, output)


def test_the_converted_gpt_scores_as_the_hf_model(setup, tmp_path):
    """One rule for both references: the Llama converted into this project's GPT (its own
    vocabulary, without the markers the tokenizer adds) and scored as ``--reference-type gpt``
    gives the HF model's log-probs (float32; the two sum in other orders)."""
    from megatron_prior.testing import run_on_ranks

    model_dir, tok_dir = setup["llama"]
    tok = load_tokenizer(tok_dir)
    ckpt = str(tmp_path / "ckpt")
    run_on_ranks(_convert, 1, model_dir, ckpt)
    out = {}
    for kind, load in (("hf", model_dir), ("gpt", ckpt)):
        args = _args(setup["jsonl"], tok_dir, tmp_path / kind, load, "--append-eod", "--reference-window", "24")
        args[args.index("--reference-type") + 1] = kind
        run_tool(*args)
        out[kind] = WeightedIndexedDataset(f"{tmp_path / kind}_caption_document", tok.fingerprint, tok.vocab_size)
    assert out["gpt"].metadata.reference["start_token_id"] == tok.bos == out["hf"].metadata.reference["start_token_id"]
    assert np.array_equal(out["gpt"].token_array, out["hf"].token_array)
    np.testing.assert_allclose(out["gpt"].logprob_array, out["hf"].logprob_array, rtol=0, atol=1e-4)
