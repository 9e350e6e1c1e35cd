"""Each CPU patch of megatron_prior.compat, exercised on CPU."""

import importlib
import logging

import numpy as np
import pytest
import torch

from megatron_prior import compat, parallel
from megatron_prior.compat import cpu_shim
from megatron_prior.testing import run_on_ranks

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU shim applies only without CUDA")


@pytest.fixture
def single_rank():
    parallel.initialize(seed=1234)
    yield
    parallel.destroy()


def test_apply_is_idempotent(single_rank):
    views = {name: importlib.import_module(name).torch for name in compat.PATCHED_MODULES}
    assert compat.apply_cpu_shim() is True
    assert compat.cpu_shim_applied()
    for name, view in views.items():
        assert importlib.import_module(name).torch is view, name
        assert isinstance(view, cpu_shim._CpuTorch)


def test_unknown_megatron_version_warns(caplog):
    with caplog.at_level(logging.WARNING):
        assert cpu_shim.check_version("0.99.0") is False
    assert "tested with megatron-core" in caplog.text and "0.99.0" in caplog.text
    assert cpu_shim.check_version(compat.TESTED_MCORE_VERSIONS[-1]) is True
    # Builds from source carry the commit as a local version label.
    assert cpu_shim.check_version(compat.TESTED_MCORE_VERSIONS[-1] + "+0d471a6") is True


def test_utils_buffers_and_l2_norm(single_rank):
    from megatron.core import utils

    buf = utils.GlobalMemoryBuffer().get_tensor((3, 4), torch.float32, "x")
    assert buf.shape == (3, 4) and buf.device.type == "cpu"
    tensors = [torch.randn(5), torch.randn(2, 3)]
    norm, _ = utils.local_multi_tensor_l2_norm(0, None, [tensors], False)
    expected = torch.sqrt(sum((t.double() ** 2).sum() for t in tensors))
    assert abs(float(norm) - float(expected)) < 1e-5


def test_default_causal_mask(single_rank):
    from megatron.core.transformer.utils import get_default_causal_mask

    mask = get_default_causal_mask(5)
    assert mask.device.type == "cpu"
    assert torch.equal(mask, torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1))


def test_rng_tracker_forks_cpu_generator(single_rank):
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    before = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "fork must restore the default state"
    with tracker.fork():
        b = torch.rand(4)
    assert not torch.equal(a, b), "the tracked state must advance between forks"
    # Re-seeding reproduces the tracked stream exactly.
    parallel.seed_everything(1234)
    with get_cuda_rng_tracker().fork():
        assert torch.equal(torch.rand(4), a)


def test_activation_recompute_restores_rng(single_rank):
    from megatron.core import tensor_parallel

    x = torch.randn(8, 16, requires_grad=True)
    w = torch.randn(16, 16, requires_grad=True)

    def block(inp):
        with tensor_parallel.get_cuda_rng_tracker().fork():
            return torch.nn.functional.dropout(inp @ w, p=0.5, training=True).tanh()

    state = torch.get_rng_state()
    tracker_states = {k: v.clone() for k, v in tensor_parallel.get_cuda_rng_tracker().get_states().items()}
    block(x).sum().backward()
    direct = (x.grad.clone(), w.grad.clone())
    x.grad = None
    w.grad = None
    torch.set_rng_state(state)
    tensor_parallel.get_cuda_rng_tracker().set_states(tracker_states)
    tensor_parallel.checkpoint(block, False, x).sum().backward()
    assert torch.allclose(x.grad, direct[0]) and torch.allclose(w.grad, direct[1])


def test_parallel_layers_allocate_on_cpu(single_rank):
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.transformer import TransformerConfig

    config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, use_cpu_initialization=False)
    col = ColumnParallelLinear(8, 16, config=config, init_method=torch.nn.init.normal_, bias=True)
    row = RowParallelLinear(16, 8, config=config, init_method=torch.nn.init.normal_, bias=True,
                            input_is_parallel=True, skip_bias_add=False)
    out, _ = row(col(torch.randn(3, 2, 8))[0])
    assert out.shape == (3, 2, 8) and col.weight.device.type == "cpu"


def _gather_on_two_ranks():
    from megatron.core import tensor_parallel

    from megatron_prior import parallel as par

    par.initialize(tensor_parallel=2)
    rank = torch.distributed.get_rank()
    local = torch.full((2, 3), float(rank))
    gathered = tensor_parallel.gather_from_sequence_parallel_region(local)
    flat = torch.arange(6, dtype=torch.float32) + 10 * rank
    chunk = tensor_parallel.split_tensor_into_1d_equal_chunks(flat)
    rebuilt = tensor_parallel.gather_split_1d_tensor(chunk)
    return gathered.tolist(), rebuilt.tolist()


@pytest.mark.slow
def test_mappings_and_tp_utils_on_two_ranks():
    results = run_on_ranks(_gather_on_two_ranks, 2)
    for gathered, rebuilt in results:
        assert gathered == [[0.0] * 3] * 2 + [[1.0] * 3] * 2
        # Rank r keeps chunk r of its own tensor; the gather joins rank 0's first half
        # with rank 1's second half.
        assert rebuilt == [0.0, 1.0, 2.0, 13.0, 14.0, 15.0]


def test_grad_norm_and_clip(single_rank):
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32, get_grad_norm_fp32

    params = [torch.nn.Parameter(torch.randn(4, 3)) for _ in range(2)]
    for p in params:
        p.grad = torch.randn_like(p)
    expected = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    norm = get_grad_norm_fp32([p.grad for p in params])
    assert abs(norm - expected) < 1e-5 * expected
    clip_grad_by_total_norm_fp32(params, max_norm=0.5 * expected, total_norm=norm)
    clipped = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in params)))
    assert abs(clipped - 0.5 * expected) < 1e-4 * expected


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_optimizer_step(single_rank, bf16):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    from megatron_prior.models.gpt import build_gpt, transformer_config

    config = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2, bf16=bf16)
    from megatron.core.transformer.module import Float16Module

    gpt = build_gpt(config, 64, 8)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=bf16),
                                    Float16Module(config, gpt) if bf16 else gpt)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=1e-2, clip_grad=1.0, bf16=bf16,
                                                 params_dtype=torch.bfloat16 if bf16 else torch.float32), [model])
    before = [p.detach().clone() for p in model.parameters()]
    ids = torch.randint(0, 64, (2, 8))
    model(ids, torch.arange(8).expand(2, 8), None, labels=ids).sum().backward()
    ok, grad_norm, _ = opt.step()
    assert ok and grad_norm > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_ddp_grad_sync(single_rank):
    """finalize_model_grads reaches start_grad_sync, which waits on the current CUDA stream
    (0.19); at DP=1 the synchronised main_grad is the plain autograd gradient, bit for bit."""
    from megatron.core.distributed import (
        DistributedDataParallel,
        DistributedDataParallelConfig,
        finalize_model_grads,
    )

    from megatron_prior.models.gpt import build_gpt, transformer_config

    config = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2)
    gpt = build_gpt(config, 64, 8)
    ids, positions = torch.randint(0, 64, (2, 8)), torch.arange(8).expand(2, 8)
    params = list(gpt.parameters())
    expected = torch.autograd.grad(gpt(ids, positions, None, labels=ids).sum(), params)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), gpt)
    model(ids, positions, None, labels=ids).sum().backward()
    finalize_model_grads([model])
    for param, grad in zip(params, expected):
        assert torch.equal(param.main_grad, grad)


def test_timers(single_rank):
    from megatron.core.timers import Timers

    timers = Timers(log_level=2, log_option="minmax")
    timers("step", log_level=0).start(barrier=True)
    timers("step").stop(barrier=True)
    assert timers("step").elapsed(reset=False) >= 0.0
    text = timers._get_global_min_max_time(["step"], reset=True, barrier=False, normalizer=1.0)
    assert "step" in text


def test_rotary_embedding_on_cpu(single_rank):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=False)
    emb = rope(6)
    assert emb.device.type == "cpu" and emb.shape[0] == 6


def test_clip_vit_builds_and_runs(single_rank):
    from megatron.core.models.vision.clip_vit_model import CLIPViTModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    from megatron_prior.models.gpt import transformer_config

    config = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2)
    vit = CLIPViTModel(config, get_vit_layer_with_local_spec(), ln_pre_impl=WrappedTorchNorm,
                       ln_post_impl=WrappedTorchNorm, patch_dim=4, img_h=8, img_w=8)
    out = vit(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 4 + 1, 16) and vit.position_ids.device.type == "cpu"
    out.sum().backward()


# Patched modules exercised by other test files (which fail without these patches): the
# parity tests (pipeline / data parallel), the checkpoint tests (dist_checkpointing save) and
# the LLaVAModel test.
COVERED_ELSEWHERE = {
    "megatron.core.pipeline_parallel.schedules": "test_gpt_parallel_equals_single_process[*-PP2]",
    "megatron.core.pipeline_parallel.p2p_communication": "test_gpt_parallel_equals_single_process[*-PP2]",
    "megatron.core.models.common.language_module.language_module":
        "test_gpt_parallel_equals_single_process[learned-tied-PP2]",
    "megatron.core.distributed.distributed_data_parallel": "test_gpt_parallel_equals_single_process[*-DP2]",
    "megatron.core.dist_checkpointing.strategies.filesystem_async": "test_checkpointing.py (every save)",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver": "test_checkpointing.py (every save)",
    "megatron.core.models.multimodal.llava_model": "test_llava_cpu.py::test_llava_tiny_forward_backward",
    "megatron.core.optimizer.distrib_optimizer": "test_scale_features.py::test_distributed_optimizer_equals_replicated",
}
COVERED_HERE = {
    "megatron.core.utils": test_utils_buffers_and_l2_norm,
    "megatron.core.transformer.utils": test_default_causal_mask,
    "megatron.core.tensor_parallel.random": test_activation_recompute_restores_rng,
    "megatron.core.tensor_parallel.layers": test_parallel_layers_allocate_on_cpu,
    "megatron.core.tensor_parallel.mappings": test_mappings_and_tp_utils_on_two_ranks,
    "megatron.core.tensor_parallel.utils": test_mappings_and_tp_utils_on_two_ranks,
    "megatron.core.optimizer.clip_grads": test_grad_norm_and_clip,
    "megatron.core.optimizer.optimizer": test_optimizer_step,
    "megatron.core.distributed.param_and_grad_buffer": test_ddp_grad_sync,
    "megatron.core.timers": test_timers,
    "megatron.core.models.common.embeddings.rotary_pos_embedding": test_rotary_embedding_on_cpu,
    "megatron.core.models.vision.clip_vit_model": test_clip_vit_builds_and_runs,
}


def test_every_patched_module_has_an_exercise():
    assert set(COVERED_HERE) | set(COVERED_ELSEWHERE) == set(compat.PATCHED_MODULES)


def test_llava_vit_norm_defaults_without_te(single_rank):
    from megatron.core.models.multimodal import llava_model
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    if compat.have_transformer_engine():
        pytest.skip("TE present: CLIPViTModel's own defaults are used")
    assert compat.apply_no_te_defaults() is True
    from megatron_prior.models.gpt import transformer_config

    config = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2)
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec

    vit = llava_model.CLIPViTModel(config, get_vit_layer_with_local_spec(), patch_dim=4, img_h=8, img_w=8)
    assert isinstance(vit.ln_pre, torch.nn.LayerNorm) and WrappedTorchNorm is not None
