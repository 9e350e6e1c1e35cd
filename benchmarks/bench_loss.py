"""Forward+backward time and peak memory of the vocab-parallel losses, side by side.

Variants (each measured in its own fresh process, one per tensor-parallel rank):
  a  megatron-core vocab_parallel_cross_entropy, times the weight
  b  ours: vocab_parallel_weighted_cross_entropy
  c  torch.nn.functional.cross_entropy(reduction="none") on fp32-upcast logits, times the weight
     (TP=1 only: it needs the whole vocabulary)
  d  ours: fused_linear_weighted_cross_entropy (output layer + loss, chunked)
  e  the output layer (hidden @ weight.T) followed by (b)
  f  Liger-Kernel's fused linear cross-entropy, unweighted, summed (CUDA, TP=1, liger_kernel
     installed): what (d) is measured against on a GPU

Memory is the peak above what the process holds right before the call, from a first step
(which also warms up): on a GPU torch.cuda.max_memory_allocated minus memory_allocated before;
on CPU the kernel's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus the
resident set just before, with glibc told to serve every allocation of 64 KiB or more by mmap,
so that freed memory leaves the resident set and reused heap memory cannot hide an allocation.
Time is the fastest of the following steps, with glibc back to its steady state (blocks under
32 MiB reused from the heap; the mmap page faults would slow chunked code unfairly): wall clock,
and on CPU also the process's CPU time (1 thread per rank), which the time ratios use there,
as it does not count the time other processes on a shared machine take. For
(a)-(c) the logits exist before the call (they are in the baseline) and are handed over so
that only the autograd graph holds them, as the output layer's product is in a model; for
(d)-(f) the inputs are the hidden states and the output weight.

    .venv/bin/python benchmarks/bench_loss.py                       # the defaults: ~5 min on 2 idle cores
    .venv/bin/python benchmarks/bench_loss.py --vocab-sizes 32768 --dtypes bf16 --variants a b
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from megatron_prior.testing import run_on_ranks

VARIANTS = "abcdef"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# --- measuring inside a rank -------------------------------------------------------------------

def _rss_mib(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} missing from /proc/self/status")


class _Memory:
    """Peak bytes above the level at ``start``, from the kernel (CPU) or the allocator (GPU)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set
            self.base = _rss_mib("VmRSS")

    def peak(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20 - self.base
        return _rss_mib("VmHWM") - self.base


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _malloc_mode(exact: bool) -> None:
    """glibc: mmap (and so unmap on free) every block >= 64 KiB for exact resident-set
    accounting, or keep blocks under 32 MiB in the heap, as its default settles to."""
    import ctypes

    libc = ctypes.CDLL("libc.so.6")
    mmap_threshold = 64 << 10 if exact else 32 << 20
    trim_threshold = 128 << 10 if exact else 64 << 20
    if libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold) != 1 or libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold) != 1:
        raise RuntimeError("mallopt failed: CPU peak memory would not be exact")
    libc.malloc_trim(0)


class _Handover(torch.autograd.Function):
    """Hands a prepared tensor to autograd as the output of an op, so that (as with the output
    layer's product in a model) only the graph holds it."""

    @staticmethod
    def forward(ctx, anchor, holder):
        return holder.pop().detach()

    @staticmethod
    def backward(ctx, grad):
        return torch.zeros(1, device=grad.device), None


def _loss(variant: str, logits, target, weight):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy

    if variant == "a":
        return vocab_parallel_cross_entropy(logits, target) * weight
    if variant == "b":
        return vocab_parallel_weighted_cross_entropy(logits, target, weight)
    if variant == "c":
        v = logits.shape[-1]
        return torch.nn.functional.cross_entropy(logits.float().view(-1, v), target.view(-1),
                                                 reduction="none").view_as(target) * weight
    raise ValueError(variant)


def _measure(variant: str, tokens: int, vocab: int, hidden_size: int, dtype_name: str, tp: int,
             iters: int) -> dict:
    # megatron-core warns on import that TE/apex are absent: known, and it would drown the progress bar.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.")
    from megatron_prior import parallel
    from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
    from megatron_prior.loss.fused_linear_ce import fused_linear_weighted_cross_entropy

    parallel.initialize(tensor_parallel=tp)
    if torch.cuda.is_available():
        torch.set_num_threads(max(1, os.cpu_count() // 2))
    dev = parallel.device()
    dtype = DTYPES[dtype_name]
    rank = torch.distributed.get_rank()
    vp = vocab // tp
    g = torch.Generator(device="cpu").manual_seed(0)
    # [s, b] = [tokens / 4, 4], as megatron-core lays out a micro-batch.
    target = torch.randint(0, vocab, (tokens // 4, 4), generator=g).to(dev)
    weight = (torch.rand(tokens // 4, 4, generator=g) * 2).to(dev)
    memory = _Memory(dev)
    anchor = torch.zeros(1, device=dev, requires_grad=True)
    if variant == "f":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss(reduction="sum")
    if variant in "abc":
        rows = []
        for lo in range(0, tokens // 4, 64):  # filled in slices: no full-size fp32 temporary
            rows.append((torch.randn(min(64, tokens // 4 - lo), 4, vp, generator=g) * 3).to(dtype))
        pristine = torch.cat(rows).to(dev)
        del rows
    else:
        hidden = (torch.randn(tokens // 4, 4, hidden_size, generator=g)).to(dtype).to(dev).requires_grad_()
        out_weight = torch.randn(vp, hidden_size, generator=g) * hidden_size ** -0.5
        out_weight = out_weight.to(dtype).to(dev).requires_grad_()

    def step():
        if variant in "abc":
            holder = [pristine.clone()]
            memory.start()
            t0, c0 = time.perf_counter(), time.process_time()
            _loss(variant, _Handover.apply(anchor, holder), target, weight).sum().backward()
        else:
            hidden.grad = out_weight.grad = None
            memory.start()
            t0, c0 = time.perf_counter(), time.process_time()
            if variant == "d":
                loss = fused_linear_weighted_cross_entropy(hidden, out_weight, target, weight)
            elif variant == "f":
                loss = liger(out_weight, hidden.view(-1, hidden_size), target.view(-1))
            else:
                from megatron.core.tensor_parallel.mappings import copy_to_tensor_model_parallel_region

                # What ColumnParallelLinear computes (torch.matmul on [s, b, h]).
                logits = torch.matmul(copy_to_tensor_model_parallel_region(hidden), out_weight.t())
                loss = vocab_parallel_weighted_cross_entropy(logits, target, weight)
                del logits
            loss.sum().backward()
            del loss
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0, time.process_time() - c0, memory.peak()

    if dev.type != "cuda":
        _malloc_mode(exact=True)
    peak = step()[2]
    if dev.type != "cuda":
        _malloc_mode(exact=False)
    # The fastest step: on a shared machine the others measure the neighbours' load too.
    timed = [step()[:2] for _ in range(iters)]
    return dict(rank=rank, wall=min(t[0] for t in timed), cpu=min(t[1] for t in timed), peak_mib=peak,
                device=str(dev))


# --- driving the runs ------------------------------------------------------------------------

def _run(variant, tokens, vocab, hidden_size, dtype, tp, iters) -> dict:
    results = run_on_ranks(_measure, tp, variant, tokens, vocab, hidden_size, dtype, tp, iters, timeout=900)
    # The step is as slow as its slowest rank; memory is per rank (the worst one reported).
    out = {key: max(r[key] for r in results) for key in ("wall", "cpu", "peak_mib")}
    # On CPU the ratios use CPU time (1 thread per rank): the wall clock of a shared machine
    # mostly measures the neighbours. A GPU's kernels are timed by the wall clock.
    out["time"] = out["wall"] if results[0]["device"].startswith("cuda") else out["cpu"]
    return out


def _device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    model = "CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{model}, {os.cpu_count()} cores, 1 thread per rank"


def _ratio(x: float, y: float) -> str:
    return f"{x / y:.2f}" if y > 0 else "-"


def parse_args(argv=None) -> argparse.Namespace:
    """The options, checked against each other (what the machine has is checked by main)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096, help="tokens per micro-batch (s * b, b = 4)")
    parser.add_argument("--vocab-sizes", type=int, nargs="+", default=[32768, 65536],
                        help="global vocabulary sizes (each divisible by every TP size)")
    parser.add_argument("--hidden-size", type=int, default=32,
                        help="hidden size for (d)-(f): small on CPU, where the matmuls would take minutes")
    parser.add_argument("--tensor-model-parallel-sizes", type=int, nargs="+", default=[1, 2],
                        help="TP sizes (gloo ranks on CPU; 1 on a single GPU)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"],
                        help="logits (and hidden/weight) dtype")
    parser.add_argument("--fused-dtypes", nargs="+", choices=sorted(DTYPES),
                        default=["fp32", "bf16"] if torch.cuda.is_available() else ["fp32"],
                        help="dtypes for (d)-(f) (default on CPU: fp32 only; CPUs without native bf16 "
                             "matmuls run them at ~1 GFLOP/s, minutes per step)")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS[:5]),
                        help="(f) only when asked for: it needs a GPU and liger_kernel")
    parser.add_argument("--iters", type=int, default=2,
                        help="timed steps per run (the fastest is reported), after the memory step that warms up")
    args = parser.parse_args(argv)
    if args.tokens % 4:
        parser.error("--tokens must be divisible by 4 (micro-batch size 4)")
    for v in args.vocab_sizes:
        for tp in args.tensor_model_parallel_sizes:
            if v % tp:
                parser.error(f"--vocab-sizes {v} is not divisible by TP size {tp}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if "f" in args.variants:
        if not torch.cuda.is_available():
            sys.exit("bench_loss.py: --variants f (Liger-Kernel's Triton kernels) needs a CUDA device")
        try:
            import liger_kernel  # noqa: F401
        except ImportError as err:
            sys.exit(f"bench_loss.py: --variants f needs liger_kernel, which does not import here ({err}): "
                     "pip install liger-kernel")

    from tqdm import tqdm

    configs = [(v, tp, d, var) for v in args.vocab_sizes for tp in args.tensor_model_parallel_sizes
               for d in sorted(set(args.dtypes) | set(args.fused_dtypes), reverse=True) for var in args.variants
               if not (var in "cf" and tp > 1)
               and d in (args.fused_dtypes if var in "def" else args.dtypes)]
    results = {}
    started = time.perf_counter()
    for v, tp, d, var in tqdm(configs, desc="bench_loss", unit="run", file=sys.stderr):
        results[v, tp, d, var] = _run(var, args.tokens, v, args.hidden_size, d, tp, args.iters)
    elapsed = time.perf_counter() - started

    print(f"bench_loss, {datetime.date.today().isoformat()}, {_device_name()}, {args.tokens} tokens, "
          f"hidden {args.hidden_size} for (d)-(f), 1 memory step + {args.iters} timed; "
          f"total {elapsed:.0f} s; time ratios use {'wall' if torch.cuda.is_available() else 'CPU'} time\n")
    print("| vocab | TP | dtype | variant | wall s | CPU s | peak MiB above inputs | time / (a) | mem / (a) "
          "| time / (e) | mem / (e) | time / (f) | mem / (f) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (v, tp, d, var), r in results.items():
        cells = []
        for anchor, compared in (("a", "bc"), ("e", "d"), ("f", "d")):
            x = results.get((v, tp, d, anchor))
            cells += ([_ratio(r["time"], x["time"]), _ratio(r["peak_mib"], x["peak_mib"])] if x and var in compared
                      else ["", ""])
        print(f"| {v} | {tp} | {d} | {var} | {r['wall']:.3f} | {r['cpu']:.3f} | {r['peak_mib']:.1f} | "
              + " | ".join(cells) + " |")
    print("\nTargets:")
    for (v, tp, d, var), r in results.items():
        if var == "b" and d == "bf16" and (v, tp, d, "a") in results:
            a = results[v, tp, d, "a"]
            print(f"- (b) vs (a), bf16, V={v}, TP={tp}: time {r['time'] / a['time']:.2f} (<= 1.05: "
                  f"{'met' if r['time'] <= 1.05 * a['time'] else 'MISSED'}), memory "
                  f"{r['peak_mib'] / a['peak_mib']:.2f} "
                  f"(<= 0.6: {'met' if r['peak_mib'] <= 0.6 * a['peak_mib'] else 'MISSED'})")
        if var == "d" and (v, tp, d, "e") in results:
            e = results[v, tp, d, "e"]
            print(f"- (d) vs (e), {d}, V={v}, TP={tp}: memory {r['peak_mib'] / e['peak_mib']:.2f} (<= 0.25: "
                  f"{'met' if r['peak_mib'] <= 0.25 * e['peak_mib'] else 'MISSED'}), time "
                  f"{r['time'] / e['time']:.2f} (<= 1.3: {'met' if r['time'] <= 1.3 * e['time'] else 'MISSED'})")
        if var == "d" and (v, tp, d, "f") in results:
            f = results[v, tp, d, "f"]
            print(f"- (d) weighted vs (f) Liger unweighted, {d}, V={v}: time {r['time'] / f['time']:.2f} (<= 1: "
                  f"{'met' if r['time'] <= f['time'] else 'MISSED'}), memory {r['peak_mib'] / f['peak_mib']:.2f} "
                  f"(<= 1: {'met' if r['peak_mib'] <= f['peak_mib'] else 'MISSED'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
