"""tools/preprocess_with_weights.py and the reference scorers, end to end on small data."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_prior.data import FormatError, WeightedIndexedDataset, open_image_store
from megatron_prior.data.images import load_image
from megatron_prior.data.kinds import KIND_IDS
from megatron_prior.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(300)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "preprocess_with_weights.py")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (20, 40, 230)}
SHAPES = ["cube", "sphere", "cone"]


def _caption(rng):
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    prefix = "a photo of a " if rng.random() < 0.5 else "there is a "
    text = f"{prefix}{colour} {shape} on the table"
    start = len(prefix)
    kinds = [[start, start + len(colour), "grounded"], [start + len(colour) + 1, start + len(colour) + 1 + len(shape),
                                                         "grounded"], [0, len(prefix) - 1, "template"]]
    return colour, text, kinds


def write_jsonl(folder, n, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    (folder / "img").mkdir(exist_ok=True)
    lines = []
    for i in range(n):
        colour, text, kinds = _caption(rng)
        Image.new("RGB", (12, 10), COLOURS[colour]).save(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"id": str(i), "caption": text, "image": f"img/{i}.png", "kinds": kinds}))
    path = folder / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tools.train_tokenizer import main as train

    folder = tmp_path_factory.mktemp("corpus")
    jsonl = write_jsonl(folder, 60)
    assert train(["--input", str(jsonl), "--json-keys", "caption", "--vocab-size", "60",
                  "--output-prefix", str(folder / "tok")]) == 0
    return folder, jsonl, str(folder / "tok.model")


def _save_reference(ckpt_dir, tokenizer, window=8):
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.training.checkpointing import save_checkpoint

    cfg = ModelConfig(arch="gpt", num_layers=2, hidden_size=32, num_attention_heads=4,
                      vocab_size=tokenizer.vocab_size, max_position_embeddings=window,
                      position_embedding_type="learned_absolute", tokenizer_fingerprint=tokenizer.fingerprint)
    model = build_model(cfg)
    save_checkpoint(str(ckpt_dir), 3, [model], cfg)
    return model


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    from megatron_prior import parallel

    folder, _, tok_path = corpus
    ckpt = tmp_path_factory.mktemp("reference")
    parallel.initialize(seed=5)
    try:
        _save_reference(ckpt, load_tokenizer(tok_path))
    finally:
        parallel.destroy()
    return str(ckpt)


def run_tool(*args, check=True):
    from tools.preprocess_with_weights import main

    status = main([str(a) for a in args])
    if check:
        assert status == 0
    return status


def _base_args(jsonl, tok, out, reference_type="unigram"):
    return ["--input", jsonl, "--json-keys", "caption", "--tokenizer-model", tok, "--append-eod",
            "--output-prefix", out, "--reference-type", reference_type]


def test_unigram_end_to_end(corpus, tmp_path):
    folder, jsonl, tok_path = corpus
    out = tmp_path / "demo"
    run_tool(*_base_args(jsonl, tok_path, out), "--kinds-key", "kinds", "--image-key", "image",
             "--image-size", "8", "--workers", "2", "--log-interval", "7")
    tok = load_tokenizer(tok_path)
    prefix = f"{out}_caption_document"
    ds = WeightedIndexedDataset(prefix, tokenizer_fingerprint=tok.fingerprint)
    records = [json.loads(line) for line in open(jsonl)]
    assert len(ds) == len(records) and ds.has_kinds
    all_tokens = [np.array(tok.tokenize(r["caption"]) + [tok.eod]) for r in records]
    counts = np.bincount(np.concatenate(all_tokens), minlength=tok.vocab_size).astype(np.float64)
    for i, r in enumerate(records):
        tokens, logprobs = ds[i]
        np.testing.assert_array_equal(tokens, all_tokens[i])
        np.testing.assert_allclose(logprobs, np.log(counts[tokens] / counts.sum()), rtol=1e-6)
    # Kinds: each word's tokens carry its span's kind, the EOD is "other".
    r = records[0]
    ids, starts = tok.tokenize_with_offsets(r["caption"])
    kinds = ds.kinds[0]
    assert kinds[-1] == KIND_IDS["other"]
    for (begin, end, name) in r["kinds"]:
        inside = [k for k, s in zip(kinds, starts) if begin <= s < end]
        assert inside and all(k == KIND_IDS[name] for k in inside)
    images = ds.open_images()
    assert images.shape == (len(records), 8, 8, 3)
    for i in (0, 17, 59):
        np.testing.assert_array_equal(images[i], load_image(str(folder / "img" / f"{i}.png"), 8, 8))
    assert IndexedDataset(prefix + ".logprobs")[3].dtype == np.float32
    assert not [f for f in os.listdir(tmp_path) if ".tmp" in f]


def _float64_reference(model, doc, eod, window):
    """log p(doc_i | eod, doc_<i) from the model's logits, log-softmax in float64, per window."""
    x = np.concatenate([[eod], doc[:-1]])
    out = []
    with torch.no_grad():
        for start in range(0, len(doc), window):
            inp = torch.tensor(x[start:start + window]).unsqueeze(0)
            logits = model(inp, torch.arange(inp.shape[1]).unsqueeze(0), None)
            logp = torch.log_softmax(logits.double(), dim=-1)[0]
            target = torch.tensor(doc[start:start + window])
            out.append(logp[torch.arange(len(target)), target].numpy())
    return np.concatenate(out)


def test_gpt_scorer_equals_float64_reference_and_is_batching_invariant():
    from megatron_prior import parallel
    from megatron_prior.models.gpt import build_gpt, transformer_config
    from megatron_prior.scoring import GPTScorer

    parallel.initialize(seed=3)
    try:
        model = build_gpt(transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4), 50, 8).eval()
        rng = np.random.default_rng(0)
        docs = [rng.integers(3, 50, n) for n in (1, 5, 8, 9, 23, 3)]  # shorter and longer than the window
        small = GPTScorer(model, start_token=2, window=8, max_batch_tokens=8).score(docs)
        seen = []
        big = GPTScorer(model, start_token=2, window=8, max_batch_tokens=64).score(docs, progress=seen.append)
        assert sum(seen) == sum(map(len, docs))
        for doc, a, b in zip(docs, small, big):
            ref = _float64_reference(model, doc, 2, 8)
            np.testing.assert_allclose(a, ref, rtol=0, atol=2e-5)
            np.testing.assert_allclose(b, a, rtol=0, atol=2e-5)
            assert a.dtype == np.float32 and (a <= 0).all()
        with pytest.raises(ValueError, match="must hold one full window"):
            GPTScorer(model, start_token=2, window=8, max_batch_tokens=4)
    finally:
        parallel.destroy()


@pytest.mark.slow
def test_gpt_reference_end_to_end(corpus, reference, tmp_path):
    from megatron_prior import parallel
    from megatron_prior.checkpoint import checkpoint_hash
    from megatron_prior.models.pretrained import load_inference_model

    _, jsonl, tok_path = corpus
    tok = load_tokenizer(tok_path)
    one, two = tmp_path / "one", tmp_path / "two"
    run_tool(*_base_args(jsonl, tok_path, one, "gpt"), "--reference-load", reference)
    run_tool(*_base_args(jsonl, tok_path, two, "gpt"), "--reference-load", reference, "--workers", "2",
             "--score-batch-tokens", "16", "--chunk-records", "7")
    for suffix in (".bin", ".idx", ".logprobs.idx"):
        assert open(f"{one}_caption_document{suffix}", "rb").read() == open(f"{two}_caption_document{suffix}",
                                                                             "rb").read()
    ds = WeightedIndexedDataset(f"{one}_caption_document", tokenizer_fingerprint=tok.fingerprint)
    # Other batch shapes round differently in the matmuls, nothing more.
    np.testing.assert_allclose(WeightedIndexedDataset(f"{two}_caption_document").logprob_array,
                               ds.logprob_array, rtol=0, atol=2e-5)
    meta = ds.metadata.reference
    assert meta["type"] == "gpt" and meta["window"] == 8 and meta["checkpoint_sha256"] == checkpoint_hash(reference)
    parallel.initialize()
    try:
        model, cfg = load_inference_model(reference)
        for i in (0, 1, 30):
            tokens, logprobs = ds[i]
            assert len(tokens) > 8  # longer than the window
            ref = _float64_reference(model, tokens.astype(np.int64), tok.eod, cfg.max_position_embeddings)
            np.testing.assert_allclose(logprobs, ref, rtol=0, atol=2e-5)
    finally:
        parallel.destroy()


BAD_LINES = [
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": []', "invalid JSON"),
    (b'{"text": "a red cube", "image": "img/0.png", "kinds": []}', "missing key 'caption'"),
    (b'{"caption": "   ", "image": "img/0.png", "kinds": []}', "empty 'caption'"),
    (b'{"caption": "a r\xffd cube", "image": "img/0.png", "kinds": []}', "invalid UTF-8"),
    (b'{"caption": "a red cube", "image": "img/none.png", "kinds": []}', "image img/none.png: No such file"),
    (b'{"caption": "a red cube", "image": "data.jsonl", "kinds": []}', "image data.jsonl: not an image"),
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": [[0, 5, "fancy"]]}', "unknown token kind 'fancy'"),
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": [[0, 99, "grounded"]]}', "outside the text"),
    (b'["a list"]', "a record must be a JSON object"),
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": [[0, 5, ["grounded"]]]}',
     "unknown token kind ['grounded']"),
    (b'{"caption": "a red \\ud800 cube", "image": "img/0.png", "kinds": []}',
     "'caption' holds a lone surrogate ('\\ud800' at character 6), not text"),
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": [], "x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
     "invalid JSON (nested too deeply)"),
    (b'{"caption": "a red cube", "image": "img/0.png", "kinds": [], "n": ' + b"7" * 5000 + b"}",
     "invalid JSON (Exceeds the limit (4300 digits) for integer string conversion: value has 5000 digits)"),
    (b'{"caption": "a red cube", "image": "img/bomb.png", "kinds": []}',
     "image img/bomb.png: more than 89478485 pixels (PIL's decompression-bomb limit)"),
    (b'{"caption": "a red cube", "image": "img/fifo", "kinds": []}', "image img/fifo: not a regular file"),
]


def _png_claiming(path, width, height):
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's)."""
    import io
    import struct
    import zlib

    from PIL import Image

    buf = io.BytesIO()
    Image.new("1", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[16:24] = struct.pack(">II", width, height)  # IHDR data starts after signature, length, type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def _bad_jsonl(folder):
    _png_claiming(folder / "img" / "bomb.png", 20_000, 20_000)
    if not (folder / "img" / "fifo").exists():
        os.mkfifo(folder / "img" / "fifo")  # opening it for reading would wait for a writer forever
    good = open(folder / "data.jsonl", "rb").read().splitlines()[:5]
    lines = good[:2] + [line for line, _ in BAD_LINES] + good[2:]
    path = folder / "bad.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path, {3 + i: reason for i, (_, reason) in enumerate(BAD_LINES)}


def test_bad_records(corpus, tmp_path, capsys):
    folder, _, tok_path = corpus
    bad, expected = _bad_jsonl(folder)
    args = _base_args(bad, tok_path, tmp_path / "out") + ["--image-key", "image", "--image-size", "8",
                                                           "--kinds-key", "kinds"]
    assert run_tool(*args, check=False) == 1
    assert f"{bad}:3: invalid JSON" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
    run_tool(*args, "--skip-bad-records", "--workers", "2")
    log = (tmp_path / "out_bad_records.log").read_text().splitlines()
    assert len(log) == len(expected)
    for entry, (line, reason) in zip(log, sorted(expected.items())):
        assert entry.startswith(f"{bad}:{line}: ") and reason in entry, entry
    ds = WeightedIndexedDataset(str(tmp_path / "out_caption_document"))
    assert len(ds) == 5 and ds.metadata.notes["skipped_bad_records"] == len(expected)
    assert len(open_image_store(str(tmp_path / "out_caption_document.images"))) == 5


def test_refused_arguments_and_references(corpus, reference, tmp_path, capsys):
    _, jsonl, tok_path = corpus
    with pytest.raises(SystemExit):
        run_tool(*_base_args(jsonl, tok_path, tmp_path / "o", "gpt"))
    assert "--reference-type gpt needs --reference-load" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_tool(*_base_args(jsonl, tok_path, tmp_path / "o"), "--image-key", "image")
    assert "--image-key needs --image-size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_tool(*_base_args(jsonl, tok_path, tmp_path / "o"), "--json-keys", "k/../../x")
    assert ("--json-keys 'k/../../x': a key names output files, so it must be a plain file name"
            in capsys.readouterr().err)
    from tools.train_tokenizer import main as train

    assert train(["--input", str(jsonl), "--json-keys", "caption", "--vocab-size", "50",
                  "--output-prefix", str(tmp_path / "other")]) == 0
    assert run_tool(*_base_args(jsonl, tmp_path / "other.model", tmp_path / "o", "gpt"),
                    "--reference-load", reference, check=False) == 1
    assert "trained with tokenizer" in capsys.readouterr().err
    assert not [f for f in os.listdir(tmp_path) if f.startswith("o_")]
    with pytest.raises(FormatError, match="scored with tokenizer"):
        run_tool(*_base_args(jsonl, tok_path, tmp_path / "u"))
        WeightedIndexedDataset(str(tmp_path / "u_caption_document"),
                               tokenizer_fingerprint=load_tokenizer(str(tmp_path / "other.model")).fingerprint)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_interrupted_run_leaves_nothing_that_looks_finished(corpus, tmp_path, sig):
    """Input arrives through a FIFO; the tool is stopped mid-way while it waits for more."""
    _, jsonl, tok_path = corpus
    fifo = tmp_path / "input.jsonl"
    os.mkfifo(fifo)
    out = tmp_path / "out" / "demo"
    proc = subprocess.Popen([sys.executable, TOOL, *map(str, _base_args(fifo, tok_path, out)),
                             "--chunk-records", "1"], stderr=subprocess.PIPE)
    lines = open(jsonl, "rb").read().splitlines()
    writer = open(fifo, "wb")
    for _ in range(20):  # enough for the first tasks of 256 lines to be written out
        writer.write(b"\n".join(lines) + b"\n")
    writer.flush()
    tmp_bin = None
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        found = [f for f in os.listdir(out.parent)] if out.parent.exists() else []
        tmp_bin = next((f for f in found if f.startswith("demo_caption_document.bin.tmp")), None)
        if tmp_bin and os.path.getsize(out.parent / tmp_bin) > 0:
            break
        time.sleep(0.02)
    assert tmp_bin, proc.stderr.read().decode()
    proc.send_signal(sig)
    proc.wait(timeout=60)
    writer.close()
    assert proc.returncode != 0
    left = os.listdir(out.parent)
    assert all(".tmp" in f for f in left), left  # nothing under a final name
    if sig == signal.SIGTERM:
        assert left == []  # cleaned up on the way out
    with pytest.raises(FormatError, match="missing file"):
        WeightedIndexedDataset(f"{out}_caption_document")


def _score_on_rank(tp: int):
    from megatron_prior import parallel
    from megatron_prior.models.gpt import build_gpt, transformer_config
    from megatron_prior.scoring import GPTScorer
    from megatron_prior.testing import assign_global_weights

    parallel.initialize(tensor_parallel=tp)
    model = build_gpt(transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4), 64, 8)
    assign_global_weights(model)
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 64, n) for n in (4, 9, 17)]
    return GPTScorer(model, start_token=2, window=8, max_batch_tokens=16).score(docs)


@pytest.mark.slow
def test_gpt_scorer_tensor_parallel_equals_single_process():
    """Scoring reads minus megatron-core's vocab-parallel cross-entropy: any TP size agrees."""
    from megatron_prior.testing import run_on_ranks

    single = run_on_ranks(_score_on_rank, 1, 1)[0]
    for rank_scores in run_on_ranks(_score_on_rank, 2, 2):
        for a, b in zip(rank_scores, single):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
