"""The PRIOR data path, side by side with its anchors.

1. Packing: batches/s of the C++ packer (csrc/packer.cpp) vs its numpy reference, at
   seq 4096 x batch 64, over a synthetic corpus of 100M tokens written to a temporary
   folder as memory-mapped arrays (uint16 tokens, float32 log-probs; caption-like
   documents with a long tail longer than a sample, each ending in EOD). Sample and
   document indices come from megatron-core's own helpers, as in training. The one-off
   per-caption normalisers are timed too.
2. Preprocessing: tools/preprocess_with_weights.py (in-process: tokenizer, checkpoint
   load and hash, tokenization, length-sorted batched scoring, writing) vs a bare forward
   pass (logits only) of the same reference GPT over the same tokens packed densely into
   full windows, with the same token budget per batch; the scorer alone is timed as well.

    .venv/bin/python benchmarks/bench_packing.py              # the defaults: ~3 min on 2 idle cores
    .venv/bin/python benchmarks/bench_packing.py --tokens 20000000 --captions 500 --repeats 6
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

EOD = 2


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=100_000_000, help="synthetic corpus size (default: 100M)")
    parser.add_argument("--seq-length", type=int, default=4096)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds; the fastest counts")
    parser.add_argument("--cpp-batches", type=int, default=40, help="C++ batches per round")
    parser.add_argument("--numpy-batches", type=int, default=4, help="numpy batches per round")
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--captions", type=int, default=2900,
                        help="captions (sentences of the stdlib docs, ~2,930 available) for the preprocessing part")
    parser.add_argument("--window", type=int, default=128, help="reference GPT's sequence length")
    parser.add_argument("--repeats", type=int, default=3,
                        help="preprocessing measurements are interleaved this many times; the fastest counts")
    parser.add_argument("--skip-packing", action="store_true")
    parser.add_argument("--skip-preprocessing", action="store_true")
    parser.add_argument("--json", help="also write the results to this JSON file")
    return parser.parse_args(argv)


class _Clock:
    """Wall and CPU seconds of a block (CPU time is what a shared machine disturbs least)."""

    def __enter__(self) -> "_Clock":
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


# --- 1. packing --------------------------------------------------------------------------------

def synthetic_corpus(folder: str, n_tokens: int, seed: int = 0):
    """Memory-mapped tokens/log-probs and the per-document offsets."""
    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(np.log(60), 1.0, n_tokens // 40), 2, 20_000).astype(np.int64)
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n_tokens) + 1]
    lengths[-1] -= lengths.sum() - n_tokens
    lengths = lengths[lengths > 0]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.uint16, mode="w+", shape=(n_tokens,))
    logprobs = np.memmap(os.path.join(folder, "logprobs.bin"), dtype=np.float32, mode="w+", shape=(n_tokens,))
    chunk = 10_000_000
    for start in range(0, n_tokens, chunk):
        stop = min(n_tokens, start + chunk)
        tokens[start:stop] = rng.integers(3, 32000, stop - start, dtype=np.uint16)
        logprobs[start:stop] = -rng.exponential(2.0, stop - start).astype(np.float32)
    tokens[offsets[1:] - 1] = EOD
    tokens.flush()
    logprobs.flush()
    del tokens, logprobs
    tokens = np.memmap(os.path.join(folder, "tokens.bin"), dtype=np.uint16, mode="r")
    logprobs = np.memmap(os.path.join(folder, "logprobs.bin"), dtype=np.float32, mode="r")
    return tokens, logprobs, offsets


def bench_packing(args) -> dict:
    from megatron.core.datasets import helpers_cpp

    from megatron_prior.data import packing

    if not packing.HAVE_EXTENSION:
        raise SystemExit("the C++ packer is not built (make setup)")
    with tempfile.TemporaryDirectory(prefix="bench_packing_") as folder:
        t0 = time.perf_counter()
        tokens, logprobs, offsets = synthetic_corpus(folder, args.tokens)
        t_corpus = time.perf_counter() - t0
        n_docs = len(offsets) - 1
        rng = np.random.default_rng(1)
        document_index = rng.permutation(n_docs).astype(np.int32)
        sizes = np.diff(offsets).astype(np.int32)
        sample_index = helpers_cpp.build_sample_idx_int32(sizes, document_index, args.seq_length, 1,
                                                          int(sizes.sum()), True, 1)
        order = rng.permutation(len(sample_index) - 1)
        common = dict(alpha=args.alpha, eod_id=EOD, mask_eod=True, pad_id=1)

        t0 = time.perf_counter()
        scales = packing.document_scales(tokens, logprobs, offsets, **common)
        t_scales = time.perf_counter() - t0
        t0 = time.perf_counter()
        scales_1 = packing.document_scales(tokens, logprobs, offsets, **common, num_threads=1)
        t_scales_1 = time.perf_counter() - t0
        assert np.array_equal(scales, scales_1)

        n_batches = len(order) // args.batch_size

        def batch(i):
            j = i % n_batches
            return order[j * args.batch_size:(j + 1) * args.batch_size]

        pack_args = (tokens, logprobs, offsets, scales, document_index, sample_index)

        variants = {f"cpp_{t}t": (lambda s, t=t: packing.pack_batch(*pack_args, s, args.seq_length,
                                                                     num_threads=t, **common))
                    for t in sorted({1, packing.default_threads()})}
        variants["numpy"] = lambda s: packing.pack_batch_numpy(*pack_args, s, args.seq_length, **common)
        per_round = {k: (args.numpy_batches if k == "numpy" else args.cpp_batches) for k in variants}
        for fn in variants.values():  # page the corpus in, warm caches
            fn(batch(0))
        # Rounds interleave the variants so a busy spell on a shared machine hits them all;
        # each variant's fastest round counts, by wall time and by CPU time.
        wall = {k: [] for k in variants}
        cpu = {k: [] for k in variants}
        next_batch = 1
        for _ in range(args.rounds):
            for name, fn in variants.items():
                with _Clock() as clock:
                    for _ in range(per_round[name]):
                        fn(batch(next_batch))
                        next_batch += 1
                wall[name].append(per_round[name] / clock.wall)
                cpu[name].append(per_round[name] / clock.cpu)
        results = {k: max(v) for k, v in wall.items()}
        results_cpu = {k: max(v) for k, v in cpu.items()}
        ref = packing.pack_batch_numpy(*pack_args, batch(0), args.seq_length, **common)
        got = packing.pack_batch(*pack_args, batch(0), args.seq_length, **common)
        assert np.array_equal(ref[0], got[0]) and np.allclose(ref[1], got[1], rtol=1e-7, atol=1e-7)
    best = max(v for k, v in results.items() if k.startswith("cpp"))
    return {"tokens": args.tokens, "documents": int(n_docs), "samples": int(len(order)),
            "corpus_write_s": t_corpus, "scales_s": t_scales, "scales_1t_s": t_scales_1,
            "batches_per_s": results, "batches_per_cpu_s": results_cpu,
            "speedup": best / results["numpy"],
            "speedup_1t_cpu": results_cpu["cpp_1t"] / results_cpu["numpy"],
            "tokens_per_s_cpp": best * args.batch_size * args.seq_length,
            "all_rounds_batches_per_s": wall}


# --- 2. preprocessing vs a bare forward pass ------------------------------------------------------

def _captions(path: Path, n: int) -> None:
    """Sentences of the Python docs that ship with the standard library (offline English text)."""
    import re

    from pydoc_data.topics import topics

    text = " ".join(topics[k] for k in sorted(topics))
    sentences = [" ".join(s.split()) for s in re.split(r"(?<=[.!?])\s+", text) if 20 < len(s.strip()) < 300]
    if len(sentences) < n:
        raise SystemExit(f"--captions {n}: only {len(sentences)} sentences available")
    with open(path, "w") as f:
        for i, sentence in enumerate(sentences[:n]):
            f.write(json.dumps({"id": str(i), "caption": sentence}) + "\n")


def bench_preprocessing(args) -> dict:
    import torch

    from megatron_prior import parallel
    from megatron_prior.data import WeightedIndexedDataset
    from megatron_prior.preprocess import run
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.scoring import GPTScorer
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.models.pretrained import load_inference_model
    from megatron_prior.training.checkpointing import save_checkpoint
    from tools.preprocess_with_weights import build_parser, validate_args
    from tools.train_tokenizer import main as train_tokenizer

    with tempfile.TemporaryDirectory(prefix="bench_preprocess_") as folder:
        folder = Path(folder)
        jsonl = folder / "captions.jsonl"
        _captions(jsonl, args.captions)
        assert train_tokenizer(["--input", str(jsonl), "--json-keys", "caption", "--vocab-size", "2000",
                                "--output-prefix", str(folder / "tok")]) == 0
        tok = load_tokenizer(str(folder / "tok.model"))
        cfg = ModelConfig(arch="gpt", num_layers=4, hidden_size=256, num_attention_heads=4,
                          vocab_size=tok.vocab_size, max_position_embeddings=args.window,
                          tokenizer_fingerprint=tok.fingerprint)
        parallel.initialize(seed=1)
        save_checkpoint(str(folder / "ref"), 1, [build_model(cfg)], cfg)
        parallel.destroy()

        batch_tokens = 16 * args.window
        parser = build_parser()
        tool_args = validate_args(parser, parser.parse_args([
            "--input", str(jsonl), "--json-keys", "caption", "--tokenizer-model", str(folder / "tok.model"),
            "--append-eod", "--output-prefix", str(folder / "out"), "--reference-type", "gpt",
            "--reference-load", str(folder / "ref"), "--score-batch-tokens", str(batch_tokens),
            "--log-interval", str(10 ** 9)]))

        def tool() -> _Clock:
            with _Clock() as clock:
                assert run(tool_args) == 0
            return clock

        def model_passes(docs) -> tuple[_Clock, _Clock]:
            parallel.initialize(seed=1)
            try:
                model, _ = load_inference_model(str(folder / "ref"))
                scorer = GPTScorer(model, tok.start_token, args.window, batch_tokens)
                flat = np.concatenate(docs)
                scorer.forward_only(flat[: 4 * args.window], batch_size=16)  # warm up
                with _Clock() as forward:
                    scorer.forward_only(flat, batch_size=batch_tokens // args.window)
                with _Clock() as score:
                    scorer.score(docs)
                return forward, score
            finally:
                parallel.destroy()

        # Interleaved, fastest of each: the machine may be shared.
        clocks = {"tool": [], "forward": [], "score": []}
        for _ in range(args.repeats):
            clocks["tool"].append(tool())
            ds = WeightedIndexedDataset(str(folder / "out_caption_document"))
            docs = [np.asarray(ds[i][0], dtype=np.int64) for i in range(len(ds))]
            forward, score = model_passes(docs)
            clocks["forward"].append(forward)
            clocks["score"].append(score)
        best = {k: min(v, key=lambda c: c.wall) for k, v in clocks.items()}
        fastest_cpu = {k: min(c.cpu for c in v) for k, v in clocks.items()}
        times = {k: [(round(c.wall, 3), round(c.cpu, 3)) for c in v] for k, v in clocks.items()}
        t_tool, t_forward, t_score = best["tool"].wall, best["forward"].wall, best["score"].wall
        flat = np.concatenate(docs)
    return {"captions": args.captions, "tokens": int(len(flat)), "window": args.window,
            "model": "gpt 4x256, 4 heads", "torch_threads": torch.get_num_threads(),
            "forward_s": t_forward, "score_s": t_score, "tool_s": t_tool,
            "score_vs_forward": t_score / t_forward, "tool_vs_forward": t_tool / t_forward,
            "cpu_s": fastest_cpu, "tool_vs_forward_cpu": fastest_cpu["tool"] / fastest_cpu["forward"],
            "score_vs_forward_cpu": fastest_cpu["score"] / fastest_cpu["forward"],
            "vocab_size": tok.vocab_size, "all_wall_cpu_s": times}


def main(argv=None) -> int:
    args = parse_args(argv)
    out = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python benchmarks/bench_packing.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    if not args.skip_packing:
        r = out["packing"] = bench_packing(args)
        print(f"== packing: {r['tokens'] / 1e6:.0f}M tokens, {r['documents']} documents, {r['samples']} samples of "
              f"{args.seq_length} (corpus written in {r['corpus_write_s']:.1f} s)")
        print(f"   per-caption normalisers (once per corpus): {r['scales_s']:.2f} s "
              f"({r['scales_1t_s']:.2f} s on 1 thread)")
        print(f"   {'variant':<10} {'batches/s':>10} {'vs numpy':>9} {'per CPU-s':>10} {'vs numpy':>9}"
              f"   (batch {args.batch_size} x {args.seq_length}; fastest of {args.rounds} rounds)")
        wall, cpu = r["batches_per_s"], r["batches_per_cpu_s"]
        for name in wall:
            print(f"   {name:<10} {wall[name]:>10.1f} {wall[name] / wall['numpy']:>8.1f}x "
                  f"{cpu[name]:>10.1f} {cpu[name] / cpu['numpy']:>8.1f}x")
        print(f"   C++ packs {r['tokens_per_s_cpp'] / 1e6:.0f}M tokens/s; target >= 10x numpy (wall): "
              f"{'met' if r['speedup'] >= 10 else 'NOT met'} ({r['speedup']:.1f}x)")
    if not args.skip_preprocessing:
        r = out["preprocessing"] = bench_preprocessing(args)
        cpu = r["cpu_s"]
        print(f"== preprocessing: {r['captions']} captions, {r['tokens']} tokens, vocab {r['vocab_size']}, "
              f"reference {r['model']}, window {r['window']}, {r['torch_threads']} torch threads; "
              f"fastest of {args.repeats}")
        print(f"   {'':<48} {'wall s':>7} {'ratio':>6} {'cpu s':>7} {'ratio':>6}")
        rows = [("bare forward pass (dense full windows)", "forward"),
                ("scorer (length-sorted batches, log-probs)", "score"),
                ("whole tool (load+hash, tokenize, score, write)", "tool")]
        for label, key in rows:
            print(f"   {label:<48} {r[key + '_s']:>7.2f} {r[key + '_s'] / r['forward_s']:>5.2f}x "
                  f"{cpu[key]:>7.2f} {cpu[key] / cpu['forward']:>5.2f}x")
        print(f"   the tool's own cost beyond scoring (start-up, checkpoint load and hash, tokenize, write): "
              f"{r['tool_s'] - r['score_s']:.2f} s wall")
        print(f"   target <= 1.3x (whole tool vs bare forward): "
              f"{'met' if max(r['tool_vs_forward'], r['tool_vs_forward_cpu']) <= 1.3 else 'NOT met'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
