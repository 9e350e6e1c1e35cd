"""TP=2, PP=2 and DP=2 GPTModel forward+backward equal the single-process result."""

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
    per_rank = GLOBAL_BATCH // dp_size
    rows = slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)
    tokens, mask = tokens[rows], mask[rows]
    mbs = per_rank // MICRO_BATCHES
    for i in range(MICRO_BATCHES):
        r = slice(i * mbs, (i + 1) * mbs)
        yield dict(
            tokens=tokens[r, :-1],
            labels=tokens[r, 1:],
            loss_mask=mask[r],
            position_ids=torch.arange(SEQ).expand(mbs, SEQ),
        )


def _gpt_step(tp: int, pp: int, position_embedding_type: str, tied: bool):
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prior import parallel
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

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])

        def loss_func(per_token_loss):
            total = (per_token_loss.float() * batch["loss_mask"]).sum()
            count = batch["loss_mask"].sum()
            # The schedule sums token counts into an int tensor; a 0/1 mask count is exact there.
            return total, count.int(), {"lm loss": torch.stack([total.detach(), count])}

        return output, loss_func

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
    loss_sum = float(sum(d["lm loss"][0] for d in losses)) if reporting else None
    count = float(sum(d["lm loss"][1] for d in losses)) if reporting else None
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


@pytest.mark.parametrize("tp,pp,world", [(2, 1, 2), (1, 2, 2), (1, 1, 2)], ids=["TP2", "PP2", "DP2"])
def test_gpt_parallel_equals_single_process(reference, tp, pp, world):
    pos, tied, ref_loss, ref_grads = reference
    results = run_on_ranks(_gpt_step, world, tp, pp, pos, tied)
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
