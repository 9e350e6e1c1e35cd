"""Hugging Face tokenizers (``--tokenizer-type HuggingFaceTokenizer``): the roles taken from the
tokenizer's config, the tokens added for the models, fingerprints, ``--special-tokens``, the
refusals, and preprocessing, training and evaluation on HF-tokenized data."""

import json
import os
import pickle
import re
import shutil

import numpy as np
import pytest
from transformers import AutoTokenizer

from megatron_prior.data import FormatError, WeightedIndexedDataset
from megatron_prior.data.writer import WeightedDatasetWriter
from megatron_prior.tokenizer import SPECIAL_PIECES, load_tokenizer, parse_special_tokens
from tests.hf_helpers import make_hf_tokenizer
from tests.test_preprocess import run_tool, write_jsonl

pytestmark = pytest.mark.timeout(300)

TEXTS = ["a photo of a red cube on the table", "there is a blue sphere near the green cone",
         "a photo of a green sphere on the left", "there is a red cone on the table"] * 8
HUB_ID = "meta-llama/Llama-3.2-3B"
DOWNLOAD_HINT = f"download it first (huggingface-cli download {HUB_ID} --local-dir DIR)"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return make_hf_tokenizer(tmp_path_factory.mktemp("hf_tok") / "tok", TEXTS)


def test_roles_come_from_the_config_and_missing_tokens_are_added(tok_dir):
    tok = load_tokenizer(tok_dir)
    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)  # the library's own reading
    own = len(hf)
    assert type(tok).__name__ == "HuggingFaceTokenizer"
    assert tok.eod == hf.eos_token_id == hf.convert_tokens_to_ids("</s>")
    assert tok.bos == tok.start_token == hf.bos_token_id == hf.convert_tokens_to_ids("<s>")
    assert hf.pad_token is None and tok.own_vocab_size == own
    # No pad token and no image markers: added after the vocabulary, in SPECIAL_PIECES order.
    assert [getattr(tok, name) for name in list(SPECIAL_PIECES)[1:]] == list(range(own, own + 5))
    assert tok.added_tokens == {piece: own + i for i, piece in enumerate(list(SPECIAL_PIECES.values())[1:])}
    assert tok.vocab_size == own + 5 and tok.special_ids["eod"] == tok.eod
    text = "a red cube  near the green cone"
    ids = tok.tokenize(text)
    assert ids == hf.encode(text, add_special_tokens=False) and max(ids) < own
    assert tok.detokenize(ids + [tok.eod, tok.image_token_id, tok.pad]) == text
    # Text that spells a special token is text: a caption never yields a marker, an EOD or a BOS.
    assert not set(tok.tokenize("<image> </s> <s> <pad> <img_row>")) & (set(tok.special_ids.values()) | {tok.bos})
    offset_ids, starts = tok.tokenize_with_offsets(text)
    assert offset_ids == ids and starts == sorted(starts)
    # A token with visible characters is placed on its first one (not on the space before it).
    assert all(not text[s].isspace() for i, s in zip(ids, starts) if tok.detokenize([i]).strip())
    assert {i for i, ch in enumerate(text) if ch != " " and (i == 0 or text[i - 1] == " ")} <= set(starts)


def test_fingerprint_is_stable_and_tracks_the_files(tok_dir, tmp_path):
    a, b = load_tokenizer(tok_dir), load_tokenizer(tok_dir, "HuggingFaceTokenizer")
    assert a.fingerprint == b.fingerprint and a.special_ids == b.special_ids
    moved = shutil.copytree(tok_dir, tmp_path / "moved")
    assert load_tokenizer(str(moved)).fingerprint == a.fingerprint  # content, not path
    clone = pickle.loads(pickle.dumps(a))
    assert clone.fingerprint == a.fingerprint and clone.tokenize("a red cube") == a.tokenize("a red cube")
    assert a.unique_identifiers["fingerprint"] == a.fingerprint
    # The config is part of the tokenizer: another EOS is another tokenizer.
    config = json.loads((moved / "tokenizer_config.json").read_text())
    (moved / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "<unk>"}))
    changed = load_tokenizer(str(moved))
    assert changed.eod == a._hf.convert_tokens_to_ids("<unk>") and changed.fingerprint != a.fingerprint
    other = make_hf_tokenizer(tmp_path / "other", TEXTS, vocab_size=300)
    assert load_tokenizer(other).fingerprint != a.fingerprint


def test_special_tokens_override_the_choice(tmp_path):
    folder = make_hf_tokenizer(tmp_path / "tok", TEXTS, extra_special=("<|pad|>", "<img>"))
    default = load_tokenizer(folder)
    hf = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    own = len(hf)
    chosen = load_tokenizer(folder, "HuggingFaceTokenizer",
                            parse_special_tokens('{"pad": "<|pad|>", "image_token_id": "<img>"}'))
    assert chosen.pad == hf.convert_tokens_to_ids("<|pad|>")
    assert chosen.image_token_id == hf.convert_tokens_to_ids("<img>")
    # Only the three markers left are added.
    assert [chosen.image_start_id, chosen.image_row_id, chosen.image_end_id] == [own, own + 1, own + 2]
    assert chosen.vocab_size == own + 3 and default.vocab_size == own + 5
    assert chosen.fingerprint != default.fingerprint
    assert pickle.loads(pickle.dumps(chosen)).fingerprint == chosen.fingerprint  # the override travels
    # Another name for an added marker: same ids, still another tokenizer.
    renamed = load_tokenizer(folder, special_pieces={"image_token_id": "<picture>"})
    assert renamed.special_ids == default.special_ids and renamed.fingerprint != default.fingerprint
    eos = load_tokenizer(folder, special_pieces={"eod": "<|pad|>"})
    assert eos.eod == chosen.pad and eos.start_token == eos.bos  # BOS, not the EOD, starts a document
    with pytest.raises(ValueError, match=r"no token '<nope>' for eod"):
        load_tokenizer(folder, special_pieces={"eod": "<nope>"})
    with pytest.raises(ValueError, match="special tokens share ids"):
        load_tokenizer(folder, special_pieces={"pad": "</s>"})


def test_a_pad_token_equal_to_eos_gets_a_pad_of_its_own(tok_dir, tmp_path):
    hf = AutoTokenizer.from_pretrained(tok_dir, local_files_only=True)
    hf.pad_token = hf.eos_token  # a common setting; megatron-core would then mask every EOD label
    hf.save_pretrained(str(tmp_path / "tok"))
    tok = load_tokenizer(str(tmp_path / "tok"))
    assert tok.pad == len(hf) and tok.eod == hf.eos_token_id


@pytest.mark.parametrize("text,message", [
    ("nope", "not JSON"), ("[1]", "expected a JSON object"), ('{"eos": "</s>"}', "unknown role 'eos'"),
    ('{"eod": 3}', "eod: the token must be a non-empty string"),
])
def test_special_tokens_flag_is_checked(text, message):
    import argparse

    with pytest.raises(argparse.ArgumentTypeError, match=message):
        parse_special_tokens(text)


def test_bare_tokenizer_json(tok_dir):
    path = os.path.join(tok_dir, "tokenizer.json")
    with pytest.raises(ValueError, match=r"no EOS token .*--special-tokens"):
        load_tokenizer(path)
    tok = load_tokenizer(path, special_pieces={"eod": "</s>"})
    assert tok.bos is None and tok.start_token == tok.eod == load_tokenizer(tok_dir).eod
    assert tok.tokenize("a red cube") == load_tokenizer(tok_dir).tokenize("a red cube")


def test_hub_ids_are_refused_with_the_download_command(tok_dir, tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match=re.escape(f"--tokenizer-model {HUB_ID}: no such file or directory; "
                                                          f"if '{HUB_ID}' is a Hugging Face hub id, {DOWNLOAD_HINT}")):
        load_tokenizer(HUB_ID)
    jsonl = write_jsonl(tmp_path, 3)
    assert run_tool("--input", jsonl, "--json-keys", "caption", "--tokenizer-model", HUB_ID, "--output-prefix",
                    tmp_path / "o", "--reference-type", "unigram", check=False) == 1
    assert DOWNLOAD_HINT in capsys.readouterr().err
    from megatron_prior.training.arguments import ArgumentError, build_parser, validate_args

    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", str(tmp_path / "x"), "--tokenizer-model", HUB_ID]
    with pytest.raises(ArgumentError, match=re.escape(DOWNLOAD_HINT)):
        validate_args(build_parser().parse_args(argv), world_size=1)
    with pytest.raises(SystemExit):
        build_parser().parse_args([*argv, "--special-tokens", '{"eos": "x"}'])
    assert "argument --special-tokens: unknown role 'eos'" in capsys.readouterr().err


def test_ids_that_do_not_fit_the_token_dtype_are_refused(tmp_path):
    prefix = str(tmp_path / "d")
    writer = WeightedDatasetWriter(prefix, np.uint16)
    with pytest.raises(ValueError, match=re.escape(f"{prefix}.bin: token id 70000 does not fit the token file's "
                                                   "uint16")):
        writer.add_document(np.array([5, 70000]), np.zeros(2, np.float32))
    writer.abort()
    with WeightedDatasetWriter(prefix, np.uint16) as writer:
        writer.add_document(np.array([5, 6]), np.zeros(2, np.float32))
        writer.finalize("sha256:t", {"type": "unigram"})
    assert len(WeightedIndexedDataset(prefix, "sha256:t", vocab_size=65536)) == 1
    with pytest.raises(FormatError, match=re.escape(f"{prefix}.bin: uint16 token ids cannot hold the 70000 ids of "
                                                    "the tokenizer in use")):
        WeightedIndexedDataset(prefix, "sha256:t", vocab_size=70000)


TRAIN_FLAGS = ["--model", "ulvlm", "--seq-length", "16", "--patch-size", "4", "--num-layers", "2",
               "--hidden-size", "32", "--num-attention-heads", "4", "--micro-batch-size", "2",
               "--global-batch-size", "4", "--train-iters", "3", "--lr", "3e-3", "--lr-warmup-iters", "1",
               "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--loss", "prior",
               "--tokenizer-type", "HuggingFaceTokenizer"]


def _train(argv):
    from megatron_prior.train import main

    return main(argv)


@pytest.mark.slow
def test_preprocess_train_and_evaluate_on_hf_tokenized_data(tok_dir, tmp_path, capsys):
    from megatron_prior.checkpoint import read_model_config, resolve_iteration
    from megatron_prior.checkpoint import checkpoint_dir as ckpt_dir
    from megatron_prior.eval.run import main as evaluate
    from megatron_prior.testing import RankFailed, run_on_ranks

    tok = load_tokenizer(tok_dir)
    jsonl = write_jsonl(tmp_path, 24)
    run_tool("--input", jsonl, "--json-keys", "caption", "--tokenizer-type", "HuggingFaceTokenizer",
             "--tokenizer-model", tok_dir, "--append-eod", "--output-prefix", tmp_path / "data",
             "--reference-type", "unigram", "--image-key", "image", "--image-size", "8", "--kinds-key", "kinds")
    data = str(tmp_path / "data_caption_document")
    ds = WeightedIndexedDataset(data, tok.fingerprint, tok.vocab_size)
    first = json.loads(open(jsonl).readline())["caption"]
    assert list(ds[0][0]) == tok.tokenize(first) + [tok.eod] and ds.token_array.dtype == np.uint16
    out = str(tmp_path / "run")
    argv = [*TRAIN_FLAGS, "--data-path", data, "--tokenizer-model", tok_dir, "--log-dir", out,
            "--data-cache-path", os.path.join(out, "cache")]
    run_on_ranks(_train, 1, [*argv, "--save", out])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        losses = [json.loads(line)["weighted_ce"] for line in f]
    assert len(losses) == 3 and np.isfinite(losses).all()
    cfg = read_model_config(ckpt_dir(out, resolve_iteration(out)))
    assert cfg.tokenizer_fingerprint == tok.fingerprint and cfg.vocab_size >= tok.vocab_size
    # Another choice of special tokens is another tokenizer: the data refuse it, by name.
    other = ["--special-tokens", '{"pad": "<unk>"}']
    with pytest.raises(RankFailed, match=re.escape(f"{data}.logprobs.json: scored with tokenizer {tok.fingerprint}, "
                                                   "not with the tokenizer in use")):
        run_on_ranks(_train, 1, [*argv, *other])
    report = str(tmp_path / "eval.json")
    result = evaluate(["--load", out, "--tokenizer-model", tok_dir, "--tokenizer-type", "HuggingFaceTokenizer",
                       "--data-path", data, "--output", report, "--no-progress"])
    assert np.isfinite(result["heldout_ce"]) and json.load(open(report))["heldout_ce"] == result["heldout_ce"]
    with pytest.raises(SystemExit, match=re.escape(f"--tokenizer-model {tok_dir}: the model was trained with "
                                                   f"tokenizer {tok.fingerprint}, not with this one")):
        evaluate(["--load", out, "--tokenizer-model", tok_dir, *other, "--data-path", data, "--output", report,
                  "--no-progress"])


def test_sweeps_pass_the_tokenizer_flags_to_training_and_evaluation(tok_dir, tmp_path):
    import shlex

    import yaml

    from megatron_prior.eval.run import build_parser as eval_parser
    from megatron_prior.sweeps import SweepError, load_sweep

    special = '{"pad": "<unk>", "image_token_id": "<picture>"}'
    raw = {"name": "hf", "model": "ulvlm", "sizes": [{"name": "xs", "num_layers": 2, "hidden_size": 32,
                                                      "num_attention_heads": 4}],
           "token_budgets": [1024, 2048, 4096], "losses": ["prior"], "seeds": [1], "seq_length": 16, "global_batch_size": 8,
           "data": {"data-path": "d/train", "tokenizer-type": "HuggingFaceTokenizer", "tokenizer-model": tok_dir,
                    "special-tokens": special},
           "train_args": {"lr": 1e-3},
           "eval": {"command": "{python} -m megatron_prior.eval.run --load {load} --tokenizer-type "
                               "{data[tokenizer-type]} --tokenizer-model {data[tokenizer-model]} --special-tokens "
                               "{data[special-tokens]} --data-path d/heldout --output {eval_json}"}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(raw))
    spec = load_sweep(path)
    run = spec.runs()[0]
    args = spec.trainer_args(run)
    assert args.special_tokens == json.loads(special) and args.tokenizer_type == "HuggingFaceTokenizer"
    argv = shlex.split(spec.eval_command_for(run, "/o/r", "/o/r/ckpt", "python"))
    evaluated = eval_parser().parse_args(argv[3:])
    assert evaluated.special_tokens == args.special_tokens and evaluated.tokenizer_model == tok_dir
    # A bad mapping is refused when the sweep file is read, naming the key.
    path.write_text(yaml.safe_dump({**raw, "data": {**raw["data"], "special-tokens": '{"eos": "x"}'}}))
    with pytest.raises(SweepError, match=r"data\.special-tokens: .*unknown role 'eos'"):
        load_sweep(path)
