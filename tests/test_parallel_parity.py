"""TP=2, PP=2 and DP=2 GPTModel forward+backward equal the single-process result, with the
training loss_func: NTP, and Rho-1 (its token selection, on the per-token CE every tensor-parallel
rank holds, is the same at TP=2 and PP=2; data parallelism changes its micro-batches, so its
selection, by design)."""

from functools import partial

import numpy as np
import pytest
import torch

from megatron_prior.testing import assemble_global, run_on_ranks

VOCAB, SEQ, GLOBAL_BATCH, MICRO_BATCHES = 128, 16, 8, 4


def _batches(dp_rank: int, dp_size: int):
    g = torch.Generator().manual_seed(7)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.2).float()
    ref_logprobs = -torch.rand(GLOBAL_BATCH, SEQ, generator=g) * 8 * mask  # Rho-1's reference
    per_rank = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    tokens, mask, ref_logprobs = tokens[rows], mask[rows], ref_logprobs[rows]
    mbs = per_rank // MICRO_BATCHES
    for i in range(MICRO_BATCHES):
        r = slice(i * mbs, (i + 1) * mbs)
        yield dict(
            tokens=tokens[r, :-1],
            labels=tokens[r, 1:],
            loss_mask=mask[r],
            ref_logprobs=ref_logprobs[r],
            position_ids=torch.arange(SEQ).expand(mbs, SEQ),
        )


def _gpt_step(tp: int, pp: int, position_embedding_type: str, tied: bool, loss: str = "ntp"):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prior import parallel
    from megatron_prior.loss.loss_func import make_loss_func
    from megatron_prior.models.gpt import build_gpt, transformer_config
    from megatron_prior.testing import assign_global_weights, local_gradients

    parallel.initialize(tensor_parallel=tp, pipeline_parallel=pp)
    config = transformer_config(num_layers=4, hidden_size=32, num_attention_heads=4)
    model = build_gpt(config, VOCAB, SEQ, position_embedding_type=position_embedding_type,
                      share_embeddings_and_output_weights=tied)
    assign_global_weights(model)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    loss_func = make_loss_func(loss, rho1_ratio=0.4)

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(loss_func, batch)

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    model.zero_grad_buffer()
    losses = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=_batches(dp_rank, dp_size),
        model=[model],
        num_microbatches=MICRO_BATCHES,
        seq_length=SEQ,
        micro_batch_size=GLOBAL_BATCH // dp_size // MICRO_BATCHES,
        forward_only=False,
    )
    reporting = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    loss_sum = float(sum(d["weighted_ce"][0] for d in losses)) if reporting else None
    count = float(sum(d["weighted_ce"][1] for d in losses)) if reporting else None
    return loss_sum, count, local_gradients(model.module)


def _combine(results):
    loss_sum = sum(r[0] for r in results if r[0] is not None)
    count = sum(r[1] for r in results if r[1] is not None)
    return loss_sum / count


@pytest.fixture(scope="module", params=[("learned_absolute", True), ("rope", False)], ids=["learned-tied", "rope-untied"])
def reference(request):
    pos, tied = request.param
    (result,) = run_on_ranks(_gpt_step, 1, 1, 1, pos, tied)
    return pos, tied, _combine([result]), assemble_global(result[2])


def _assert_equal_to(results, ref_loss, ref_grads):
    loss = _combine(results)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss), (loss, ref_loss)
    seen = set()
    for _, _, grads in results:
        for key, index, _, grad in grads:
            expected = ref_grads[key][index].reshape(grad.shape)
            scale = np.abs(expected).max() + 1e-12
            err = np.abs(grad - expected).max() / scale
            assert err <= 1e-4, f"{key}{index}: relative gradient error {err:.2e}"
            seen.add(key)
    assert seen == set(ref_grads), f"keys never compared: {set(ref_grads) - seen}"


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["TP2", "PP2", "DP2"])
def test_gpt_parallel_equals_single_process(reference, tp, pp, world):
    pos, tied, ref_loss, ref_grads = reference
    _assert_equal_to(run_on_ranks(_gpt_step, world, tp, pp, pos, tied), ref_loss, ref_grads)


@pytest.fixture(scope="module")
def rho1_single():
    (single,) = run_on_ranks(_gpt_step, 1, 1, 1, "rope", False, "rho1")
    return single


@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)], ids=["TP2", "PP2"])
def test_rho1_model_parallel_equals_single_process(rho1_single, tp, pp):
    """Rho-1 keeps 40 % of each micro-batch's tokens by excess loss: at TP=2 every rank holds the
    whole per-token CE and selects the same tokens, at PP=2 the last stage sees the same
    micro-batches, so loss, kept count and gradients are one process's."""
    single = rho1_single
    results = run_on_ranks(_gpt_step, 2, tp, pp, "rope", False, "rho1")
    # 40 % of the loss tokens of each of the 4 micro-batches, the same count on both layouts.
    assert single[1] == sum(r[1] for r in results if r[1] is not None) < 0.5 * GLOBAL_BATCH * SEQ
    _assert_equal_to(results, _combine([single]), assemble_global(single[2]))
