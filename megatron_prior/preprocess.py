"""Image-caption data -> tokens + reference log-probs (+ kinds, + images): the engine of
``tools/preprocess_with_weights.py``. It sits above both ``data`` (formats, readers, writers)
and ``scoring`` (the reference), which do not know about each other.

The input (JSONL, LLaVA JSON, COCO JSON or webdataset shards: ``data.sources``) is read in
chunks of ``--chunk-records`` records, each within one input file. A process pool
(``--workers`` per rank) parses, tokenizes, turns kind spans into per-token kinds and reads the
images (checked and kept encoded, or decoded and fitted for a raw store); chunks come back in
input order, at most a few ahead of the writer so memory stays bounded. The main process
scores each chunk with the reference (a language model, GPT or Hugging Face, in length-sorted
batches; the unigram once the whole corpus is counted) and streams everything to temporary
files renamed only when all is complete.

Under torchrun (or srun) the chunks are dealt to the ranks: whole files (file ``i`` to rank
``i mod N``) when there are at least as many input files as ranks, else each file's chunks in
turn. Every rank tokenizes and scores its chunks on its own device into a dataset of its own;
the unigram counts are summed over ranks; rank 0 then copies the chunks' documents in input
order into the output. A chunk is scored alone whatever the number of ranks, so the output is
byte for byte the one a single process writes. An exception in a rank's step (loading the
reference, processing, committing its part, rank 0's merge) is gathered with the step's result,
so every rank stops at the same point; the parts under ``{output_prefix}.ranks`` are then
removed and the output prefix is left as it was.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import shutil
import signal
import sys
import time
import traceback
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
from megatron.core.datasets.indexed_dataset import DType
from tqdm import tqdm

from megatron_prior import parallel
from megatron_prior.data.images import check_encoded_image, decode_image, read_image_file
from megatron_prior.data.kinds import OTHER, kinds_from_spans
from megatron_prior.data.records import BadRecord
from megatron_prior.data.sources import Chunk, ReadOptions, SourceRecord, detect_format, expand_inputs, iter_chunks
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.data.writer import WeightedDatasetWriter
from megatron_prior.files import atomic_write_text
from megatron_prior.scoring import load_reference
from megatron_prior.tokenizer import Tokenizer, load_tokenizer



@dataclass
class Processed:
    """One good record: per json key its tokens (and kinds); its image when asked for (the
    file's bytes for an encoded store, fitted pixels for a raw one)."""

    tokens: dict[str, np.ndarray]
    kinds: dict[str, np.ndarray] = field(default_factory=dict)
    image: Optional[Union[np.ndarray, bytes]] = None


def read_options(args: argparse.Namespace) -> ReadOptions:
    return ReadOptions(json_keys=args.json_keys, image_key=args.image_key, kinds_key=args.kinds_key,
                       image_root=args.image_root, coco_captions_per_image=args.coco_captions_per_image)


def with_images(args: argparse.Namespace) -> bool:
    """JSONL carries images with --image-key; the other formats always do."""
    return bool(args.image_key) or args.input_format != "jsonl"


class RecordProcessor:
    """Turns a chunk's ``SourceRecord``s into ``Processed`` records or ``BadRecord``s (runs in
    the workers)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.options = read_options(args)
        self.images = with_images(args)
        self.tokenizer: Optional[Tokenizer] = None

    def _tok(self) -> Tokenizer:
        if self.tokenizer is None:  # loaded once per worker process
            self.tokenizer = load_tokenizer(self.args.tokenizer_model, self.args.tokenizer_type,
                                            self.args.special_tokens)
        return self.tokenizer

    def process(self, source: SourceRecord) -> Processed:
        args, tok = self.args, self._tok()
        record, image_path = source.fields(self.options)
        path, line = record.path, record.line
        out = Processed(tokens={})
        for key in args.json_keys:
            text = record.data[key]  # checked by fields()
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
        if self.images:
            out.image = self._image(source, image_path)
        return out

    def _image(self, source: SourceRecord, image_path: Optional[str]) -> Union[np.ndarray, bytes]:
        args = self.args
        try:
            data = source.image_bytes if source.image_bytes is not None else read_image_file(image_path)
            if args.image_store == "encoded":
                check_encoded_image(data)
                return data
            return decode_image(data, *args.image_size, args.image_aspect)
        except (OSError, ValueError) as err:
            reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
            raise BadRecord(source.path, source.record, f"image {source.image_name}: {reason}", "image") from None

    def __call__(self, chunk: Chunk) -> tuple[Chunk, list]:
        results = []
        for source in chunk.records:
            try:
                results.append(self.process(source))
            except BadRecord as bad:
                results.append(bad)
        chunk.records = []  # what came in need not travel back
        return chunk, results


def _in_order(pool, fn: Callable, tasks: Iterable, ahead: int) -> Iterator:
    """``pool.imap(fn, tasks)`` that reads at most ``ahead`` tasks ahead of the consumer
    (``imap`` would read the whole input, images included, into memory)."""
    if pool is None:
        yield from map(fn, tasks)
        return
    pending: deque = deque()
    for task in tasks:
        pending.append(pool.apply_async(fn, (task,)))
        if len(pending) >= ahead:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def output_prefix(args: argparse.Namespace, key: str) -> str:
    """Megatron's naming: ``{output_prefix}_{key}_document``."""
    return f"{args.output_prefix}_{key}_document"


def chunk_owner(file_index: int, chunk_index: int, n_files: int, world_size: int) -> int:
    """The rank that processes a chunk: whole files when there are enough of them (a rank then
    reads only its own files), else each file's chunks dealt in turn."""
    if n_files >= world_size:
        return file_index % world_size
    return (file_index + chunk_index) % world_size


class _Progress:
    """A tqdm bar over documents, with tokens/s beside the docs/s tqdm shows."""

    def __init__(self, interval: int, desc: str) -> None:
        self.bar = tqdm(unit="doc", desc=desc, mininterval=1.0, file=sys.stderr,
                        disable=None)  # disabled when stderr is not a terminal
        self.interval, self.docs, self.tokens, self.start = interval, 0, 0, time.perf_counter()
        self.desc = desc

    def update(self, docs: int, tokens: int) -> None:
        self.bar.update(docs)
        before, self.docs, self.tokens = self.docs, self.docs + docs, self.tokens + tokens
        if self.docs // self.interval != before // self.interval:
            rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix(tokens_per_s=f"{rate:,.0f}")
            if self.bar.disable:
                print(f"{self.desc}: processed {self.docs} documents, {self.tokens} tokens ({rate:,.0f} tokens/s)",
                      file=sys.stderr)

    def close(self) -> None:
        self.bar.close()


def _terminate_as_exit(signum, frame):  # noqa: ARG001
    raise SystemExit(128 + signum)


@dataclass
class _ChunkDone:
    """What a rank reports of one chunk it processed."""

    file_index: int
    index: int
    read: int  # records
    written: int  # documents
    bad: list[BadRecord]


def _open_writers(args: argparse.Namespace, prefix_of: Callable[[str], str],
                  token_dtype: type) -> dict[str, WeightedDatasetWriter]:
    writers: dict[str, WeightedDatasetWriter] = {}
    try:
        for i, key in enumerate(args.json_keys):
            # The images go with the first (with images, the only) key's dataset.
            images = with_images(args) and i == 0
            writers[key] = WeightedDatasetWriter(prefix_of(key), token_dtype, with_kinds=bool(args.kinds_key),
                                                 image_size=args.image_size if images else None,
                                                 image_store=args.image_store, image_aspect=args.image_aspect)
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    return writers


def _notes(args: argparse.Namespace, key: str, skipped: int) -> dict:
    return {"json_key": key, "append_eod": bool(args.append_eod), "inputs": list(args.input),
            "input_format": args.input_format, "skipped_bad_records": skipped}


def _process_share(args: argparse.Namespace, info: parallel.LaunchInfo, paths: list[str], scorer, unigram: bool,
                   writers: dict[str, WeightedDatasetWriter], pool) -> tuple[list[_ChunkDone], Optional[BadRecord]]:
    """Tokenize, score and write this rank's chunks; (the chunks done, the bad record that
    stopped the run without --skip-bad-records)."""
    rank, world = info.rank, info.world_size
    processor = RecordProcessor(args)
    mine = (c for c in iter_chunks(args.input_format, paths, read_options(args), args.chunk_records,
                                   read_file=lambda i: len(paths) < world or i % world == rank)
            if chunk_owner(c.file_index, c.index, len(paths), world) == rank)
    progress = _Progress(args.log_interval, "preprocess" if world == 1 else f"preprocess rank {rank}")
    done: list[_ChunkDone] = []
    try:
        for chunk, results in _in_order(pool, processor, mine, args.workers + 1):
            bad = [r for r in results if isinstance(r, BadRecord)]
            good = [r for r in results if not isinstance(r, BadRecord)]
            if bad and not args.skip_bad_records:
                return done, bad[0]
            scores = {}
            for key in args.json_keys:
                if unigram:
                    for p in good:
                        scorer.update(p.tokens[key])
                else:
                    scores[key] = scorer.score([p.tokens[key] for p in good])
            for i, p in enumerate(good):
                for key, writer in writers.items():
                    writer.add_document(p.tokens[key], None if unigram else scores[key][i],
                                        p.kinds.get(key) if args.kinds_key else None,
                                        p.image if writer.images is not None else None)
            done.append(_ChunkDone(chunk.file_index, chunk.index, len(results), len(good), bad))
            progress.update(len(good), sum(len(t) for p in good for t in p.tokens.values()))
    finally:
        progress.close()
    return done, None


def _merge_ranks(args: argparse.Namespace, shard_prefix: Callable[[int, str], str], done: list[_ChunkDone],
                 world: int, n_files: int, writers: dict[str, WeightedDatasetWriter]) -> None:
    """Copy every rank's documents into ``writers`` in input order (rank 0)."""
    written = [0] * world
    for chunk in done:
        written[chunk_owner(chunk.file_index, chunk.index, n_files, world)] += chunk.written
    for key, writer in writers.items():
        # A rank that wrote nothing (fewer chunks than ranks) has an empty token file, which
        # megatron-core's reader cannot map; nothing is copied from it anyway.
        shards = [WeightedIndexedDataset(shard_prefix(r, key)) if written[r] else None for r in range(world)]
        stores = [s.open_images() if s is not None and writer.images is not None else None for s in shards]
        cursor = [0] * world
        for chunk in tqdm(done, desc=f"merge {key}", unit="chunk", file=sys.stderr, disable=None):
            r = chunk_owner(chunk.file_index, chunk.index, n_files, world)
            shard, store = shards[r], stores[r]
            for doc in range(cursor[r], cursor[r] + chunk.written):
                tokens, logprobs = shard[doc]
                image = None
                if store is not None:
                    image = store.encoded(doc) if store.kind == "encoded" else np.asarray(store[doc])
                writer.add_document(tokens, logprobs, shard.kinds[doc] if shard.has_kinds else None, image)
            cursor[r] += chunk.written


def run(args: argparse.Namespace) -> int:
    """Preprocess per ``args`` (see tools/preprocess_with_weights.py); returns the exit status."""
    info = parallel.launch_info()
    rank, world = info.rank, info.world_size
    paths = expand_inputs(args.input)
    if args.input_format == "auto":
        args.input_format = detect_format(paths)
    tokenizer = load_tokenizer(args.tokenizer_model, args.tokenizer_type, args.special_tokens)
    token_dtype = DType.optimal_dtype(tokenizer.vocab_size)
    # The pool starts before any model is loaded: workers fork from a process that has not
    # started torch's thread pools.
    pool = multiprocessing.get_context("fork").Pool(args.workers) if args.workers > 1 else None
    previous_handler = signal.signal(signal.SIGTERM, _terminate_as_exit)
    distributed = world > 1 or args.reference_type == "gpt"
    shard_dir = args.output_prefix + ".ranks"

    def shard_prefix(r: int, key: str) -> str:
        return os.path.join(shard_dir, f"rank{r:05d}_{key}_document")

    writers: dict[str, WeightedDatasetWriter] = {}
    done: list[_ChunkDone] = []
    try:
        if distributed:
            # Ranks wait for the slowest one and for rank 0's merge: allow hours, not minutes.
            parallel.initialize(timeout_minutes=24 * 60)
        if rank == 0:
            print(f"reading {len(paths)} {args.input_format} file(s)" + (f" on {world} ranks" if world > 1 else ""),
                  file=sys.stderr)
        # Each step a rank takes alone (load, process, commit its part, rank 0's merge) ends in
        # _gather, where every rank learns whether any rank's step raised: then all stop
        # together and rank 0 removes the parts, instead of waiting for a rank that left.
        with _rank_step(world, rank) as step:
            scorer, reference = load_reference(args.reference_type, args.reference_load, tokenizer,
                                               args.reference_window, args.score_batch_tokens)
            unigram = reference["type"] == "unigram"
            if not unigram and rank == 0:
                print(f"reference: {reference['type']} {reference['path']}, window {reference['window']}, first "
                      f"token scored after token {reference['start_token_id']} ({reference['first_token_context']})",
                      file=sys.stderr)
            writers = _open_writers(args, (lambda key: output_prefix(args, key)) if world == 1
                                    else (lambda key: shard_prefix(rank, key)), token_dtype)
            done, stopped = _process_share(args, info, paths, scorer, unigram, writers, pool)
            if stopped is not None:
                print(f"error: {stopped}", file=sys.stderr)
                print("(--skip-bad-records skips such records and lists them in a log)", file=sys.stderr)
        everyone = _gather(world, step.error, (stopped is not None, done) if step.error is None else None)
        if any(failed for failed, _ in everyone):
            raise _Failed()
        done = sorted((c for _, rank_done in everyone for c in rank_done), key=lambda c: (c.file_index, c.index))
        if unigram and world > 1:
            counts = torch.from_numpy(scorer.counts).to(parallel.device())
            dist.all_reduce(counts)
            scorer.counts = counts.cpu().numpy()
        bad = [b for c in done for b in c.bad]
        written = sum(c.written for c in done)
        if written == 0:
            if rank == 0:
                print("error: no documents to write" + (f" ({len(bad)} bad records skipped)" if bad else ""),
                      file=sys.stderr)
            raise _Failed()
        with _rank_step(world, rank) as step:
            for key, writer in writers.items():
                if unigram:
                    writer.fill_logprobs(scorer)
                writer.finalize(tokenizer.fingerprint, reference, _notes(args, key, len(bad)))
        _gather(world, step.error)  # every rank's dataset is in place
        if world > 1:
            with _rank_step(world, rank) as step:
                if rank == 0:
                    writers = _open_writers(args, lambda key: output_prefix(args, key), token_dtype)
                    _merge_ranks(args, shard_prefix, done, world, len(paths), writers)
                    for key, writer in writers.items():
                        writer.finalize(tokenizer.fingerprint, reference, _notes(args, key, len(bad)))
            _gather(world, step.error)
            if rank == 0:
                shutil.rmtree(shard_dir)
        tokens = sum(w.token_count for w in writers.values())
        if bad and rank == 0:
            _write_bad_record_log(args.output_prefix + "_bad_records.log", bad)
    except (_Failed, _RankFailed) as failure:
        if isinstance(failure, _RankFailed) and rank == 0:
            print(f"error: {failure}", file=sys.stderr)
        if world > 1:
            _discard_parts(rank, writers, shard_dir)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
        for writer in writers.values():
            writer.abort()  # a no-op for committed writers
        if pool is not None:
            pool.terminate()
            pool.join()
        if distributed:
            parallel.destroy()
    if rank == 0:
        read = sum(c.read for c in done)
        why = Counter(b.category for b in bad)
        print(f"read {read} records: wrote {written} documents, {tokens} tokens to "
              + ", ".join(output_prefix(args, k) for k in args.json_keys)
              + (f"; skipped {len(bad)} bad records ("
                 + ", ".join(f"{n} {category}" for category, n in sorted(why.items()))
                 + f"; listed in {args.output_prefix}_bad_records.log)" if bad else ""),
              file=sys.stderr)
    return 0


class _Failed(Exception):
    """Stops the run after the reason was reported."""


class _RankFailed(Exception):
    """A step of rank ``rank`` raised (``error`` says what); every rank raises it together."""

    def __init__(self, rank: int, world: int, error: str) -> None:
        super().__init__(f"rank {rank} of {world} failed: {error}")
        self.rank, self.error = rank, error


@dataclass
class _Step:
    error: Optional[str] = None  # what this rank's step raised, as text


@contextlib.contextmanager
def _rank_step(world: int, rank: int) -> Iterator[_Step]:
    """A step this rank takes alone: on one rank its exceptions propagate as they are; on several
    they are caught (with the traceback on this rank's stderr) into ``step.error`` for ``_gather``."""
    step = _Step()
    if world == 1:
        yield step
        return
    try:
        yield step
    except Exception as err:  # noqa: BLE001 - whatever it is, every rank must hear of it
        print(f"rank {rank}: {traceback.format_exc()}", file=sys.stderr, end="")
        step.error = f"{type(err).__name__}: {err}"


def _gather(world: int, error: Optional[str], payload=None) -> list:
    """Every rank's ``payload`` (a collective: every rank calls it after the same step); with
    several ranks, _RankFailed on all of them when any rank's step raised (``error``)."""
    if world == 1:
        return [payload]
    everyone: list = [None] * world
    dist.all_gather_object(everyone, (error, payload))
    failed = [(r, e) for r, (e, _) in enumerate(everyone) if e is not None]
    if failed:
        raise _RankFailed(failed[0][0], world, failed[0][1])
    return [p for _, p in everyone]


def _discard_parts(rank: int, writers: dict[str, WeightedDatasetWriter], shard_dir: str) -> None:
    """After a failure every rank knows of: each rank removes what it was writing, and once all
    have (the barrier), rank 0 removes every rank's part. The output prefix was never written
    (rank 0 commits it only at the end of the merge), so a dataset already there is kept."""
    for writer in writers.values():
        writer.abort()
    dist.barrier()
    if rank == 0 and os.path.isdir(shard_dir):
        shutil.rmtree(shard_dir)
        print(f"removed the ranks' parts ({shard_dir})", file=sys.stderr)


def _write_bad_record_log(path: str, bad: list[BadRecord]) -> None:
    atomic_write_text(path, "".join(f"{record}\n" for record in bad))
