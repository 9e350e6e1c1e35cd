"""Run a function on N gloo ranks in spawned processes on localhost.

Used by the multi-rank tests and the benchmarks: ``run_on_ranks(fn, 2, arg)`` starts two
processes with torchrun's environment variables (a fresh free port each time), calls
``fn(arg)`` in each, and returns the per-rank results in rank order. If a rank fails, its
traceback is re-raised in the caller; if the ranks do not finish in ``timeout`` seconds,
they are killed and ``TimeoutError`` names the ranks still running.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from megatron_prior import parallel
from megatron_prior.models.init import initialize_weights, parameter_shards

_CHILD_ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """A rank raised; the message carries that rank's traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _child(fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple,
           results: "mp.Queue") -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    # One intra-op thread per rank: ranks share the machine's cores, and oversubscription
    # makes gloo collectives time out on small machines.
    torch.set_num_threads(1)
    try:
        results.put((rank, True, fn(*args)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        results.put((rank, False, traceback.format_exc()))
    finally:
        parallel.destroy()


def run_on_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0) -> list:
    """Call ``fn(*args)`` on ``world_size`` spawned ranks; return their results by rank."""
    ctx = mp.get_context("spawn")
    results: mp.Queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_child, args=(fn, r, world_size, port, args, results), daemon=False)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcome: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - set(outcome))
                raise TimeoutError(f"ranks {missing} of {world_size} did not finish in {timeout:.0f} s")
            try:
                rank, ok, value = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in outcome]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} "
                                     "before reporting (killed or crashed in native code)")
                continue
            if not ok:
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{value}")
            outcome[rank] = value
    finally:
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
    return [outcome[r] for r in range(world_size)]


# --- comparing sharded models with a single-process reference ---------------------------

def assign_global_weights(model, seed: int = 0) -> None:
    """Layout-independent weights (megatron_prior.models.init), so TP/PP layouts compare."""
    initialize_weights(model, seed, std=0.05, num_layers=1)


def local_gradients(model) -> list:
    """``(key, index, global shape, grad as float64 numpy)`` for every parameter shard
    (DDP's ``main_grad`` where present)."""
    out = []
    for key, index, shape, param in parameter_shards(model):
        grad = getattr(param, "main_grad", None)
        if grad is None:
            grad = param.grad
        out.append((key, index, shape, grad.detach().double().cpu().numpy().copy()))
    return out


def assemble_global(shards: list) -> dict:
    """Put ``local_gradients`` entries (from one or more ranks) back into global arrays."""
    full: dict = {}
    for key, index, shape, values in shards:
        target = full.setdefault(key, np.zeros(shape))
        target[index] = values.reshape(target[index].shape)
    return full


# --- a small real corpus ----------------------------------------------------------------------

def make_caption_corpus(root: str, num_train: int = 400, image_size: int = 16, vocab_size: int = 200,
                        seed: int = 3) -> dict:
    """Generator -> tokenizer -> preprocessing (unigram scores, kinds, images), through the real
    command-line tools. Returns ``{"dir", "tokenizer", "data"}`` (data: the token prefix)."""
    tools = Path(__file__).resolve().parent.parent / "tools"
    steps = [
        ["-m", "megatron_prior.demo.generator", "--output-dir", "gen", "--num-train", str(num_train),
         "--num-heldout", "40", "--seed", str(seed), "--no-progress"],
        [str(tools / "train_tokenizer.py"), "--input", "gen/train.jsonl", "--json-keys", "caption",
         "--vocab-size", str(vocab_size), "--model-type", "bpe", "--output-prefix", "tok"],
        [str(tools / "preprocess_with_weights.py"), "--input", "gen/train.jsonl", "--json-keys", "caption",
         "--tokenizer-model", "tok.model", "--append-eod", "--output-prefix", "data/train",
         "--reference-type", "unigram", "--image-key", "image", "--image-size", str(image_size),
         "--kinds-key", "kinds", "--workers", "1"],
    ]
    for args in steps:
        result = subprocess.run([sys.executable, *args], cwd=root, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
    return {"dir": str(root), "tokenizer": str(Path(root) / "tok.model"),
            "data": str(Path(root) / "data/train_caption_document")}
