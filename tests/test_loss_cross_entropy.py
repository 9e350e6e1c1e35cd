"""The weighted vocab-parallel cross-entropy and the fused linear + cross-entropy.

References are float64 formulas written here; tensor parallelism (TP=1/2/4) runs in one
gloo spawn per world size with every check inside it.
"""

import os

import numpy as np
import pytest
import torch

from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
from megatron_prior.loss.fused_linear_ce import fused_linear_weighted_cross_entropy
from megatron_prior.testing import run_on_ranks

TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-2}
SEEDS = range(12)


# --- float64 references --------------------------------------------------------------------

def reference_loss(logits: torch.Tensor, target: torch.Tensor, weight=None, label_smoothing=0.0):
    """Per-token ``w * ((1 - s) nll - s mean_j log p_j)``, ``s = ls V / (V - 1)``, in float64."""
    x = logits.double()
    v = x.shape[-1]
    top = x.max(dim=-1, keepdim=True).values
    logp = x - top - torch.log(torch.exp(x - top).sum(dim=-1, keepdim=True))
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    s = label_smoothing * v / (v - 1)
    loss = (1 - s) * nll - s * logp.mean(dim=-1)
    return loss if weight is None else loss * weight.double()


def reference_with_grads(logits, target, weight, grad_out, label_smoothing=0.0):
    x = logits.detach().double().requires_grad_()
    loss = reference_loss(x, target, weight, label_smoothing)
    (loss * grad_out.double()).sum().backward()
    return loss.detach(), x.grad


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / expected.abs().max().clamp(min=1e-30))


def make_case(seed: int, s=7, b=3, v=96, h=16, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(s, b, v, generator=g, dtype=torch.float64) * scale
    target = torch.randint(0, v, (s, b), generator=g)
    weight = torch.rand(s, b, generator=g, dtype=torch.float64) * 3
    weight[0, 0] = 0.0
    grad_out = torch.randn(s, b, generator=g, dtype=torch.float64)
    hidden = torch.randn(s, b, h, generator=g, dtype=torch.float64)
    out_weight = torch.randn(v, h, generator=g, dtype=torch.float64) * 0.5
    return logits, target, weight, grad_out, hidden, out_weight


def ours_with_grads(logits, target, weight, grad_out, label_smoothing=0.0, **kwargs):
    leaf = logits.detach().requires_grad_()
    x = leaf * 1  # an intermediate result, as the output layer's product is
    loss = vocab_parallel_weighted_cross_entropy(x, target, weight, label_smoothing, **kwargs)
    (loss * grad_out.float()).sum().backward()
    return loss.detach(), leaf.grad


# --- single process ------------------------------------------------------------------------

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # The tensors here are tiny: a second intra-op thread only adds OpenMP wake-up stalls
    # (milliseconds per op on a loaded machine).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_matches_float64_reference(dtype, smoothing, weighted):
    for seed in SEEDS:
        logits, target, weight, grad_out, *_ = make_case(seed)
        logits = logits.to(dtype)  # the reference sees the same rounded inputs
        w = weight.float() if weighted else None
        # chunk_rows=4 splits the 21 rows unevenly, exercising chunk boundaries.
        loss, grad = ours_with_grads(logits, target, w, grad_out, smoothing, chunk_rows=4)
        ref_loss, ref_grad = reference_with_grads(logits, target, w, grad_out, smoothing)
        assert loss.dtype == torch.float32 and grad.dtype == dtype
        assert rel_err(loss, ref_loss) <= TOL[dtype], (seed, rel_err(loss, ref_loss))
        assert rel_err(grad, ref_grad) <= TOL[dtype], (seed, rel_err(grad, ref_grad))


def test_chunking_does_not_change_the_result():
    logits, target, weight, grad_out, *_ = make_case(3)
    logits = logits.float()
    results = [ours_with_grads(logits, target, weight.float(), grad_out, 0.05, chunk_rows=c) for c in (1, 5, 21, 1000)]
    for loss, grad in results[1:]:
        assert rel_err(loss, results[0][0]) <= 1e-6 and rel_err(grad, results[0][1]) <= 1e-6


def test_zero_weight_gives_zero_gradient_row():
    logits, target, weight, grad_out, *_ = make_case(5)
    weight[2, 1] = 0.0
    loss, grad = ours_with_grads(logits.float(), target, weight.float(), grad_out, 0.1)
    for s, b in [(0, 0), (2, 1)]:
        assert loss[s, b] == 0
        assert torch.count_nonzero(grad[s, b]) == 0
    assert torch.count_nonzero(grad[1, 1]) > 0


def test_weight_gradient_is_the_unweighted_loss():
    logits, target, weight, grad_out, *_ = make_case(6)
    w = weight.float().requires_grad_()
    loss = vocab_parallel_weighted_cross_entropy(logits.float() * 1, target, w)
    (loss * grad_out.float()).sum().backward()
    expected = reference_loss(logits, target) * grad_out
    assert rel_err(w.grad, expected) <= 1e-6


def test_return_logprobs_gives_target_log_probability():
    logits, target, *_ = make_case(7)
    loss, logprob = vocab_parallel_weighted_cross_entropy(logits.float(), target, return_logprobs=True)
    expected = torch.log_softmax(logits, -1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    assert rel_err(logprob, expected) <= 1e-6
    assert not logprob.requires_grad
    assert rel_err(loss, -expected) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_backward_reuses_intermediate_logits_and_spares_the_callers(dtype):
    logits, target, weight, grad_out, *_ = make_case(8)
    leaf = logits.to(dtype).requires_grad_()
    original = leaf.detach().clone()

    # A leaf is the caller's: untouched, and its .grad is a separate tensor.
    vocab_parallel_weighted_cross_entropy(leaf, target, weight.float()).sum().backward()
    assert torch.equal(leaf.detach(), original) and leaf.grad.data_ptr() != leaf.data_ptr()

    # An intermediate result's storage becomes its gradient.
    x = leaf * 1
    seen = []
    x.register_hook(lambda g: seen.append(g.data_ptr()))
    vocab_parallel_weighted_cross_entropy(x, target, weight.float()).sum().backward()
    assert seen == [x.data_ptr()]

    # Opting out keeps the values; a view's storage belongs to its base and is never reused.
    x = leaf * 1
    vocab_parallel_weighted_cross_entropy(x, target, weight.float(), inplace_backward=False).sum().backward()
    assert torch.equal(x.detach(), original)
    base = leaf * 1
    vocab_parallel_weighted_cross_entropy(base[:, :2], target[:, :2], weight[:, :2].float()).sum().backward()
    assert torch.equal(base.detach(), original)


def test_an_op_that_saved_the_logits_is_refused_not_corrupted():
    logits, target, *_ = make_case(9)
    leaf = logits.float().requires_grad_()
    x = torch.tanh(leaf)  # tanh saves its output for backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        vocab_parallel_weighted_cross_entropy(x, target).sum().backward()


@pytest.mark.parametrize("tokens", [21, 160], ids=["backward-over-vocab", "backward-over-tokens"])
def test_fused_linear_equals_linear_plus_loss(tokens):
    # Fewer tokens than vocabulary entries (96) chunk backward over the vocabulary, more over tokens.
    for seed in SEEDS:
        _, target, weight, grad_out, hidden, out_weight = make_case(seed, s=tokens // 3 if tokens == 21 else 40,
                                                                    b=3 if tokens == 21 else 4)
        for dtype in (torch.float32, torch.bfloat16):
            h = hidden.to(dtype).requires_grad_()
            w_out = out_weight.to(dtype).requires_grad_()
            loss = fused_linear_weighted_cross_entropy(h, w_out, target, weight.float(), chunk_size=4,
                                                       label_smoothing=0.1)
            (loss * grad_out.float()).sum().backward()

            h64 = h.detach().double().requires_grad_()
            w64 = w_out.detach().double().requires_grad_()
            ref = reference_loss(h64 @ w64.t(), target, weight, 0.1)
            (ref * grad_out).sum().backward()
            tol = TOL[dtype]
            assert rel_err(loss, ref) <= tol, (seed, dtype)
            assert rel_err(h.grad, h64.grad) <= tol, (seed, dtype, rel_err(h.grad, h64.grad))
            assert rel_err(w_out.grad, w64.grad) <= tol, (seed, dtype, rel_err(w_out.grad, w64.grad))


def test_fused_linear_equals_unfused_in_fp32():
    _, target, weight, grad_out, hidden, out_weight = make_case(11)
    grads = []
    for fused in (True, False):
        h = hidden.float().requires_grad_()
        w_out = out_weight.float().requires_grad_()
        if fused:
            loss = fused_linear_weighted_cross_entropy(h, w_out, target, weight.float(), chunk_size=5)
        else:
            loss = vocab_parallel_weighted_cross_entropy(h @ w_out.t(), target, weight.float())
        (loss * grad_out.float()).sum().backward()
        grads.append((loss.detach(), h.grad, w_out.grad))
    for a, b in zip(*grads):
        assert rel_err(a, b) <= 1e-6


@pytest.mark.parametrize("call", ["plain", "fused"])
def test_bad_inputs_are_refused_with_the_reason(call):
    logits, target, weight, _, hidden, out_weight = make_case(12)
    logits, weight, hidden, out_weight = logits.float(), weight.float(), hidden.float(), out_weight.float()

    def run(target=target, weight=weight, **kwargs):
        if call == "plain":
            return vocab_parallel_weighted_cross_entropy(logits, target, weight, validate=True, **kwargs)
        return fused_linear_weighted_cross_entropy(hidden, out_weight, target, weight, validate=True, **kwargs)

    with pytest.raises(ValueError, match="target shape"):
        run(target=target[:, :2])
    with pytest.raises(ValueError, match="weight shape"):
        run(weight=weight[:3])
    with pytest.raises(TypeError, match="integer token ids"):
        run(target=target.float())
    bad = target.clone()
    bad[4, 2] = 96
    with pytest.raises(ValueError,
                       match=r"1 token id\(s\) outside the vocabulary \[0, 96\) \(first at index \(4, 2\): 96\)"):
        run(target=bad)
    bad[4, 2] = -1
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(target=bad)
    for value, word in [(float("nan"), "NaN"), (float("inf"), "infinite"), (-0.5, "negative")]:
        w = weight.clone()
        w[1, 1] = value
        with pytest.raises(ValueError, match=rf"weight holds 1 {word} value\(s\) \(first at index \(1, 1\)"):
            run(weight=w)
    with pytest.raises(ValueError, match="label_smoothing"):
        run(label_smoothing=1.0)
    if call == "plain":
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            vocab_parallel_weighted_cross_entropy(logits.double(), target)
    else:
        with pytest.raises(ValueError, match="hidden size"):
            fused_linear_weighted_cross_entropy(hidden, out_weight[:, :4], target)
        with pytest.raises(TypeError, match="dtype"):
            fused_linear_weighted_cross_entropy(hidden, out_weight.double(), target)


@pytest.fixture(scope="module")
def megatron_tp1():
    from megatron_prior import parallel

    parallel.initialize(tensor_parallel=1)
    yield
    parallel.destroy()


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_unweighted_equals_megatron_core(megatron_tp1, dtype, smoothing):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    for seed in SEEDS:
        logits, target, _, grad_out, *_ = make_case(seed)
        logits = logits.to(dtype)
        loss, grad = ours_with_grads(logits, target, None, grad_out, smoothing)
        leaf = logits.detach().requires_grad_()
        mc_loss = vocab_parallel_cross_entropy(leaf * 1, target, smoothing)
        (mc_loss * grad_out.float()).sum().backward()
        assert rel_err(loss, mc_loss) <= 1e-6, (seed, rel_err(loss, mc_loss))
        # Both round the same fp32 gradient to the logits' dtype (megatron-core via autograd).
        assert rel_err(grad, leaf.grad) <= (1e-6 if dtype == torch.float32 else 1e-2)


# --- tensor parallel -------------------------------------------------------------------------

def _tp_checks(seeds, smoothings):
    """Runs on every rank of a spawned TP group."""
    from megatron_prior import parallel

    parallel.initialize(tensor_parallel=int(os.environ["WORLD_SIZE"]))
    return _tp_cases(seeds, smoothings)


def _tp_cases(seeds, smoothings):
    """Our losses and this rank's gradient shards, for each case."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    calls = []
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*args, **kwargs):
        calls.append(1)
        return real_all_reduce(*args, **kwargs)

    out = {"cases": []}
    for seed in seeds:
        logits, target, weight, grad_out, hidden, out_weight = make_case(seed, s=TP_SEQ)
        vp = logits.shape[-1] // tp
        part = slice(rank * vp, (rank + 1) * vp)
        seq = slice(rank * TP_SEQ // tp, (rank + 1) * TP_SEQ // tp)
        for dtype in (torch.float32, torch.bfloat16):
            for smoothing in smoothings:
                leaf = logits[..., part].to(dtype).requires_grad_()
                dist.all_reduce = counting_all_reduce
                calls.clear()
                loss = vocab_parallel_weighted_cross_entropy(leaf * 1, target, weight.float(), smoothing)
                forward_all_reduces = len(calls)
                dist.all_reduce = real_all_reduce
                (loss * grad_out.float()).sum().backward()

                h = hidden.to(dtype).requires_grad_()
                w_out = out_weight[part].to(dtype).requires_grad_()
                fused = fused_linear_weighted_cross_entropy(h, w_out, target, weight.float(), chunk_size=5,
                                                            label_smoothing=smoothing)
                (fused * grad_out.float()).sum().backward()

                # Sequence parallel: this rank holds a slice of the sequence of the hidden states.
                h_sp = hidden[seq].to(dtype).requires_grad_()
                w_sp = out_weight[part].to(dtype).requires_grad_()
                sp = fused_linear_weighted_cross_entropy(h_sp, w_sp, target, weight.float(), chunk_size=5,
                                                         label_smoothing=smoothing, sequence_parallel=True)
                (sp * grad_out.float()).sum().backward()
                out["cases"].append(dict(seed=seed, dtype=str(dtype), smoothing=smoothing,
                                         loss=loss.detach().double().numpy(), grad=leaf.grad.double().numpy(),
                                         all_reduces=forward_all_reduces, fused_loss=fused.detach().double().numpy(),
                                         fused_grad_hidden=h.grad.double().numpy(),
                                         fused_grad_weight=w_out.grad.double().numpy(),
                                         sp_loss=sp.detach().double().numpy(),
                                         sp_grad_hidden=h_sp.grad.double().numpy(),
                                         sp_grad_weight=w_sp.grad.double().numpy()))
        # megatron-core itself, unsmoothed (its smoothing uses the local partition with TP > 1).
        leaf = logits[..., part].float().requires_grad_()
        mc = vocab_parallel_cross_entropy(leaf * 1, target)
        (mc * grad_out.float()).sum().backward()
        out.setdefault("megatron", []).append((mc.detach().double().numpy(), leaf.grad.double().numpy()))
    # megatron-core's published case (tests/unit_tests/tensor_parallel/test_cross_entropy.py in
    # Megatron-LM, TP=4): every rank holds [0..7] x 4 as its 32 logits, targets 0, 2, ..., 30.
    published_logits = torch.arange(0, 8, dtype=torch.float32).repeat(16, 4)
    out["published"] = vocab_parallel_weighted_cross_entropy(published_logits, torch.arange(0, 32, 2)).numpy()
    return out


SMOOTHINGS = (0.0, 0.1)
TP_SEEDS = range(4)
TP_SEQ = 8  # divisible by every TP size, for the sequence-parallel shards


@pytest.fixture(scope="module")
def tp_results(megatron_tp1):
    # TP=1 runs in this process (megatron_tp1 initialised it); TP=2 and 4 spawn gloo ranks.
    return {1: [_tp_cases(TP_SEEDS, SMOOTHINGS)],
            **{tp: run_on_ranks(_tp_checks, tp, TP_SEEDS, SMOOTHINGS) for tp in (2, 4)}}


def _cases(results, rank=0):
    return results[rank]["cases"]


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_matches_reference(tp_results, tp):
    results = tp_results[tp]
    for i, case in enumerate(_cases(results)):
        logits, target, weight, grad_out, hidden, out_weight = make_case(case["seed"], s=TP_SEQ)
        dtype = getattr(torch, case["dtype"].split(".")[-1])
        ref_loss, ref_grad = reference_with_grads(logits.to(dtype), target, weight.float(), grad_out,
                                                  case["smoothing"])
        tol = TOL[dtype]
        grad = np.concatenate([r["cases"][i]["grad"] for r in results], axis=-1)
        assert case["all_reduces"] <= 2 and (case["all_reduces"] > 0) == (tp > 1), case["all_reduces"]
        for r in results:  # every rank reports the same loss
            np.testing.assert_array_equal(r["cases"][i]["loss"], case["loss"])
        assert rel_err(torch.from_numpy(case["loss"]), ref_loss) <= tol
        assert rel_err(torch.from_numpy(grad), ref_grad) <= tol

        h64 = hidden.to(dtype).double().requires_grad_()
        w64 = out_weight.to(dtype).double().requires_grad_()
        ref = reference_loss(h64 @ w64.t(), target, weight.float(), case["smoothing"])
        (ref * grad_out).sum().backward()
        fused_grad_w = np.concatenate([r["cases"][i]["fused_grad_weight"] for r in results], axis=0)
        assert rel_err(torch.from_numpy(case["fused_loss"]), ref) <= tol
        for r in results:  # the hidden-state gradient is all-reduced: whole on every rank
            assert rel_err(torch.from_numpy(r["cases"][i]["fused_grad_hidden"]), h64.grad) <= tol
        assert rel_err(torch.from_numpy(fused_grad_w), w64.grad) <= tol

        sp_grad_h = np.concatenate([r["cases"][i]["sp_grad_hidden"] for r in results], axis=0)
        sp_grad_w = np.concatenate([r["cases"][i]["sp_grad_weight"] for r in results], axis=0)
        assert rel_err(torch.from_numpy(case["sp_loss"]), ref) <= tol
        assert rel_err(torch.from_numpy(sp_grad_h), h64.grad) <= tol
        assert rel_err(torch.from_numpy(sp_grad_w), w64.grad) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_equals_single_process(tp_results, tp):
    single, sharded = _cases(tp_results[1]), tp_results[tp]
    for i, case in enumerate(single):
        tol = 1e-6 if case["dtype"] == "torch.float32" else 1e-2
        grad = np.concatenate([r["cases"][i]["grad"] for r in sharded], axis=-1)
        assert rel_err(torch.from_numpy(sharded[0]["cases"][i]["loss"]), torch.from_numpy(case["loss"])) <= tol
        assert rel_err(torch.from_numpy(grad), torch.from_numpy(case["grad"])) <= tol


@pytest.mark.slow
@pytest.mark.parametrize("tp", [1, 2, 4])
def test_tensor_parallel_unweighted_equals_megatron_core(tp_results, tp):
    results = tp_results[tp]
    for i, seed in enumerate(TP_SEEDS):
        logits, target, _, grad_out, *_ = make_case(seed, s=TP_SEQ)
        mc_loss = torch.from_numpy(results[0]["megatron"][i][0])
        mc_grad = torch.from_numpy(np.concatenate([r["megatron"][i][1] for r in results], axis=-1))
        loss, grad = ours_with_grads(logits.float(), target, None, grad_out)
        assert rel_err(loss, mc_loss) <= 1e-6 and rel_err(grad, mc_grad) <= 1e-6


@pytest.mark.slow
def test_megatron_core_published_values(tp_results):
    expected = np.array([10.2309, 8.2309, 6.2309, 4.2309] * 4)
    for r in tp_results[4]:
        np.testing.assert_allclose(r["published"], expected, atol=1e-4)
