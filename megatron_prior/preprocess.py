"""JSONL -> tokens + reference log-probs (+ kinds, + images): the engine of
``tools/preprocess_with_weights.py``. It sits above both ``data`` (formats, writers) and
``scoring`` (the reference), which do not know about each other.

The main process reads the input lines in chunks and hands them to a process pool
(``--workers``) that parses, tokenizes, turns kind spans into per-token kinds and decodes
and resizes images; results come back in input order. The main process scores them with
the reference (the GPT in length-sorted batches, a chunk of documents at a time; the
unigram once the whole corpus is counted) and streams everything to temporary files that
are renamed only when all is complete.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence

import numpy as np
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_prior import parallel
from megatron_prior.data.images import load_image
from megatron_prior.data.kinds import OTHER, kinds_from_spans
from megatron_prior.data.records import BadRecord, iter_lines, parse_line, text_field
from megatron_prior.data.writer import WeightedDatasetWriter
from megatron_prior.files import atomic_write_text
from megatron_prior.scoring import load_reference
from megatron_prior.tokenizer import Tokenizer, load_tokenizer

LINES_PER_TASK = 256


@dataclass
class Processed:
    """One good record: per json key its tokens (and kinds); its image when asked for."""

    tokens: dict[str, np.ndarray]
    kinds: dict[str, np.ndarray] = field(default_factory=dict)
    image: Optional[np.ndarray] = None


class RecordProcessor:
    """Turns raw JSONL lines into ``Processed`` records or ``BadRecord``s (runs in workers)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tokenizer: Optional[Tokenizer] = None

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:  # loaded once per worker process
            self.tokenizer = load_tokenizer(self.args.tokenizer_model, self.args.tokenizer_type)
        return self.tokenizer

    def process(self, path: str, line: int, raw: bytes) -> Processed:
        args, tok = self.args, self._tok()
        record = parse_line(path, line, raw)
        out = Processed(tokens={})
        for key in args.json_keys:
            text = text_field(record, key)
            if args.kinds_key:
                ids, starts = tok.tokenize_with_offsets(text)
                spans = record.data.get(args.kinds_key)
                if not isinstance(spans, list):
                    raise BadRecord(path, line, f"{args.kinds_key!r} missing or not a list of spans")
                try:
                    kinds = kinds_from_spans(starts, spans, len(text))
                except ValueError as err:
                    raise BadRecord(path, line, str(err)) from None
            else:
                ids, kinds = tok.tokenize(text), None
            if not ids:
                raise BadRecord(path, line, f"{key!r} tokenizes to nothing")
            if args.append_eod:
                ids = list(ids) + [tok.eod]
                kinds = None if kinds is None else np.append(kinds, OTHER).astype(np.uint8)
            out.tokens[key] = np.asarray(ids, dtype=np.int64)
            if kinds is not None:
                out.kinds[key] = kinds
        if args.image_key:
            image = text_field(record, args.image_key)
            image_path = image if os.path.isabs(image) else os.path.join(os.path.dirname(os.path.abspath(path)), image)
            try:
                out.image = load_image(image_path, *args.image_size)
            except (OSError, ValueError) as err:
                reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
                raise BadRecord(path, line, f"image {image}: {reason}") from None
        return out

    def __call__(self, task: list[tuple[str, int, bytes]]) -> list:
        results = []
        for path, line, raw in task:
            try:
                results.append(self.process(path, line, raw))
            except BadRecord as bad:
                results.append(bad)
        return results


def _tasks(paths: Sequence[str]) -> Iterator[list[tuple[str, int, bytes]]]:
    task = []
    for path in paths:
        for line, raw in iter_lines(path):
            task.append((path, line, raw))
            if len(task) == LINES_PER_TASK:
                yield task
                task = []
    if task:
        yield task


def output_prefix(args: argparse.Namespace, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{args.output_prefix}_{key}_document"


class _Progress:
    """A tqdm bar over documents, with tokens/s beside the docs/s tqdm shows."""

    def __init__(self, interval: int) -> None:
        self.bar = tqdm(unit="doc", desc="preprocess", mininterval=1.0, file=sys.stderr,
                        disable=None)  # disabled when stderr is not a terminal
        self.interval, self.docs, self.tokens, self.start = interval, 0, 0, time.perf_counter()

    def update(self, docs: int, tokens: int) -> None:
        self.bar.update(docs)
        before, self.docs, self.tokens = self.docs, self.docs + docs, self.tokens + tokens
        if self.docs // self.interval != before // self.interval:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(tokens_per_s=f"{rate:,.0f}")
            if self.bar.disable:
                print(f"processed {self.docs} documents, {self.tokens} tokens ({rate:,.0f} tokens/s)",
                      file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _terminate_as_exit(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


def run(args: argparse.Namespace) -> int:
    """Preprocess per ``args`` (see tools/preprocess_with_weights.py); returns the exit status."""
    tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type)
    token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    processor = RecordProcessor(args)
    # The pool starts before any model is loaded: workers fork from a process that has not
    # started torch's thread pools.
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_exit)
    writers: dict[str, WeightedDatasetWriter] = {}
    progress = _Progress(args.log_interval)
    bad: list[BadRecord] = []
    try:
        if args.reference_type == "gpt":
            parallel.initialize()
        scorer, reference = load_reference(args.reference_type, args.reference_load, tokenizer,
                                           args.reference_window, args.score_batch_tokens)
        unigram = reference["type"] == "unigram"
        for i, key in enumerate(args.json_keys):
            # The images go with the first (with --image-key, the only) key's dataset.
            writers[key] = WeightedDatasetWriter(output_prefix(args, key), token_dtype,
                                                 with_kinds=bool(args.kinds_key),
                                                 image_size=args.image_size if args.image_key and i == 0 else None)
        pending: list[Processed] = []

        def flush() -> None:
            """Score (GPT) and write the pending records, in input order."""
            scores = {}
            if not unigram:
                for key in args.json_keys:
                    scores[key] = scorer.score([p.tokens[key] for p in pending])
            for i, p in enumerate(pending):
                for key in args.json_keys:
                    writers[key].add_document(p.tokens[key], None if unigram else scores[key][i],
                                              p.kinds.get(key) if args.kinds_key else None,
                                              p.image if writers[key].images is not None else None)
            progress.update(len(pending), sum(len(t) for p in pending for t in p.tokens.values()))
            pending.clear()

        results = pool.imap(processor, _tasks(args.input)) if pool else map(processor, _tasks(args.input))
        pending_tokens = 0
        for task_results in results:
            for result in task_results:
                if isinstance(result, BadRecord):
                    if not args.skip_bad_records:
                        print(f"error: {result}", file=sys.stderr)
                        print("(--skip-bad-records skips such records and lists them in a log)", file=sys.stderr)
                        raise _Failed()
                    bad.append(result)
                    continue
                if unigram:
                    for tokens in result.tokens.values():
                        scorer.update(tokens)
                pending.append(result)
                pending_tokens += sum(len(t) for t in result.tokens.values())
            if pending_tokens >= args.score_chunk_tokens:
                flush()
                pending_tokens = 0
        flush()
        if writers[args.json_keys[0]].token_count == 0:
            print("error: no documents to write" + (f" ({len(bad)} bad records skipped)" if bad else ""),
                  file=sys.stderr)
            raise _Failed()
        for key, writer in writers.items():
            if unigram:
                writer.fill_logprobs(scorer)
            notes = {"json_key": key, "append_eod": bool(args.append_eod), "inputs": list(args.input),
                     "skipped_bad_records": len(bad)}
            writer.finalize(tokenizer.fingerprint, reference, notes)
        if bad:
            _write_bad_record_log(args.output_prefix + "_bad_records.log", bad)
    except _Failed:
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        progress.close()
        for writer in writers.values():
            writer.abort()  # a no-op for committed writers
        if pool is not None:
            pool.terminate()
            pool.join()
        if args.reference_type == "gpt":
            parallel.destroy()
    n_docs = len(writers[args.json_keys[0]].builder.sequence_lengths)
    print(f"wrote {n_docs} documents, {sum(w.token_count for w in writers.values())} tokens to "
          + ", ".join(output_prefix(args, k) for k in args.json_keys)
          + (f"; skipped {len(bad)} bad records (listed in {args.output_prefix}_bad_records.log)" if bad else ""),
          file=sys.stderr)
    return 0


class _Failed(Exception):
    """Stops the run after the reason was reported."""


def _write_bad_record_log(path: str, bad: list[BadRecord]) -> None:
    atomic_write_text(path, "".join(f"{record}\n" for record in bad))
