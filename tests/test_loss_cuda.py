"""The loss kernels on a CUDA device: parity with a float64 reference and with megatron-core.
Skipped without CUDA (the CPU suite covers the same code on CPU); examples/gpu_check.sh runs it."""

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tp1():
    from megatron_prior import parallel

    parallel.initialize(seed=0)
    yield
    parallel.destroy()


def _reference(logits, target, weight):
    x = logits.double()
    loss = torch.logsumexp(x, -1) - x.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return loss * weight.double()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("seed", range(3))
def test_weighted_ce_matches_float64_and_megatron(tp1, dtype, tol, seed):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(seed)
    s, b, v = 256, 4, 32000
    logits = (torch.randn(s, b, v, device="cuda", generator=g) * 3).to(dtype)
    target = torch.randint(0, v, (s, b), device="cuda", generator=g)
    weight = torch.rand(s, b, device="cuda", generator=g) * 2
    x = logits.clone().requires_grad_(True)
    loss = vocab_parallel_weighted_cross_entropy(x * 1, target, weight)
    loss.sum().backward()
    ref_in = logits.double().requires_grad_(True)
    ref = _reference(ref_in, target, weight)
    ref.sum().backward()
    assert torch.allclose(loss.double(), ref, rtol=tol, atol=tol)
    assert torch.allclose(x.grad.double(), ref_in.grad, rtol=tol, atol=tol * 1e-2 if dtype == torch.float32 else tol)
    mcore = vocab_parallel_cross_entropy(logits.float(), target) * weight
    assert torch.allclose(loss, mcore, rtol=tol, atol=tol)


def test_fused_linear_ce_matches_linear_plus_loss(tp1):
    from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
    from megatron_prior.loss.fused_linear_ce import fused_linear_weighted_cross_entropy

    g = torch.Generator(device="cuda").manual_seed(1)
    s, b, h, v = 512, 2, 256, 32000
    hidden = torch.randn(s, b, h, device="cuda", generator=g, dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, h, device="cuda", generator=g) * 0.02).to(torch.bfloat16).requires_grad_(True)
    target = torch.randint(0, v, (s, b), device="cuda", generator=g)
    weight = torch.rand(s, b, device="cuda", generator=g)
    fused = fused_linear_weighted_cross_entropy(hidden, w, target, weight)
    fused.sum().backward()
    gh, gw = hidden.grad.clone(), w.grad.clone()
    hidden.grad, w.grad = None, None
    plain = vocab_parallel_weighted_cross_entropy(hidden @ w.t(), target, weight)
    plain.sum().backward()
    assert torch.allclose(fused, plain, rtol=2e-2, atol=2e-2)
    assert torch.allclose(gh.float(), hidden.grad.float(), rtol=5e-2, atol=5e-3)
    assert torch.allclose(gw.float(), w.grad.float(), rtol=5e-2, atol=5e-3)
