"""Megatron's scale features change how a step is computed, never what it computes: the
distributed optimizer (with and without the grad-reduce / param-gather overlaps) at DP=2
trains exactly as the replicated optimizer, and activation recomputation (full, both methods,
and selective) exactly as no recomputation, with PRIOR and the fused linear cross-entropy."""

import json
import os

import pytest

from megatron_prior.testing import run_on_ranks
from tests.test_training import _argv, _train

pytestmark = pytest.mark.slow

ITERS = 4


def _metrics(out: str) -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [(r["weighted_ce"], r["grad_norm"]) for r in map(json.loads, f) if "weighted_ce" in r]


def _run(corpus: dict, out: str, world: int, *flags: str) -> list:
    run_on_ranks(_train, world, _argv(corpus, "gpt", out, "--loss", "prior", *flags, iters=ITERS))
    return _metrics(out)


@pytest.fixture(scope="module")
def dp2_reference(tiny_corpus, tmp_path_factory):
    return _run(tiny_corpus, str(tmp_path_factory.mktemp("dp2")), 2)


@pytest.mark.parametrize("flags", [
    ["--use-distributed-optimizer"],
    ["--use-distributed-optimizer", "--overlap-grad-reduce", "--overlap-param-gather"],
], ids=["distopt", "distopt-overlaps"])
def test_distributed_optimizer_equals_replicated(dp2_reference, tiny_corpus, tmp_path, flags):
    got = _run(tiny_corpus, str(tmp_path / "run"), 2, *flags)
    assert len(got) == ITERS == len(dp2_reference) and len(got[0]) >= 2
    # The same fp32 operations on every element: the two ranks' gradients are summed (a + b, in
    # either order the same float) and averaged alike, and Adam updates each element as the
    # replicated optimizer does; only the squared gradient norm is summed in another order (two
    # shards, then across ranks), which moves the clipping factor, and with it every update, by
    # float32 rounding: a few units of 2^-24 relative, growing by no more than the updates'
    # sensitivity over 4 iterations. The first loss precedes any update: bitwise equal.
    assert got[0][:-1] == dp2_reference[0][:-1]
    for values, ref_values in zip(got, dp2_reference):
        for value, ref in zip(values, ref_values):
            assert abs(value - ref) <= 1e-6 * abs(ref), (got, dp2_reference)


@pytest.fixture(scope="module")
def fused_reference(tiny_corpus, tmp_path_factory):
    return _run(tiny_corpus, str(tmp_path_factory.mktemp("fused")), 1, "--fused-linear-ce")


@pytest.mark.parametrize("flags", [
    ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2"],
    ["--recompute-granularity", "full", "--recompute-method", "block", "--recompute-num-layers", "3"],
    ["--recompute-granularity", "selective"],
], ids=["full-uniform", "full-block", "selective"])
def test_recompute_equals_no_recompute(fused_reference, tiny_corpus, tmp_path, flags):
    assert len(fused_reference) == ITERS
    # The recomputed forward repeats the same operations on the same inputs (dropout 0, and the
    # RNG tracker restored for it anyway): every loss and gradient norm bitwise equal.
    assert _run(tiny_corpus, str(tmp_path / "run"), 1, "--fused-linear-ce", *flags) == fused_reference
