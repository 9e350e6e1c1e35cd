"""The training loss_func: numbers, logs, refusals, and micro-batch/DP invariance through
megatron-core's schedule, DDP and finalize_model_grads."""

import numpy as np
import pytest
import torch

from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.loss import LOSSES
from megatron_prior.loss.loss_func import make_loss_func
from megatron_prior.testing import run_on_ranks


def _batch(seed=0, b=3, s=10):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, s, generator=g) > 0.25).float()
    return dict(
        loss_mask=mask,
        loss_weights=torch.rand(b, s, generator=g) * 2 * mask,
        token_kinds=torch.randint(0, len(KIND_NAMES), (b, s), generator=g, dtype=torch.uint8),
    ), torch.rand(b, s, generator=g, dtype=torch.float32) * 6


def test_names_are_the_loss_flag_choices():
    from megatron_prior.training.arguments import build_parser

    assert LOSSES == ("ntp", "prior", "mi", "rho1", "cal")
    loss_flag = next(a for a in build_parser()._actions if a.dest == "loss")
    assert tuple(loss_flag.choices) == LOSSES
    for name in LOSSES:
        assert name in loss_flag.help, f"--loss help does not explain {name}"
    with pytest.raises(ValueError, match=r"^unknown loss 'rho2'; known: ntp, prior, mi, rho1, cal$"):
        make_loss_func("rho2")


@pytest.mark.parametrize("name", ["ntp", "prior"])
def test_sums_counts_and_logs(name):
    batch, ce = _batch()
    ce = ce.requires_grad_()
    loss_sum, num_tokens, logs = make_loss_func(name, kind_names=KIND_NAMES)(batch, ce)
    loss_sum_value, ce64 = float(loss_sum.detach()), ce.detach().double()
    mask, m = batch["loss_mask"].double(), batch["loss_weights"].double()
    weights = mask if name == "ntp" else m * mask
    np.testing.assert_allclose(loss_sum_value, float((ce64 * weights).sum()), rtol=1e-6)
    assert num_tokens.dtype == torch.int32 and num_tokens.dim() == 0 and int(num_tokens) == int(mask.sum())
    np.testing.assert_allclose(logs["weighted_ce"].tolist(), [loss_sum_value, float(mask.sum())], rtol=1e-6)
    np.testing.assert_allclose(logs["ce"].tolist(), [float((ce64 * mask).sum()), float(mask.sum())],
                               rtol=1e-6)
    kinds = batch["token_kinds"].long()
    for k, kind in enumerate(KIND_NAMES):
        sel = (kinds == k).double() * mask
        np.testing.assert_allclose(logs[f"ce_{kind}"].tolist(), [float((ce64 * sel).sum()), float(sel.sum())],
                                   rtol=1e-6)
    assert not any(v.requires_grad for v in logs.values())
    loss_sum.backward()
    np.testing.assert_allclose(ce.grad.numpy(), weights.numpy(), rtol=1e-6)


def test_kind_logs_present_for_every_kind_and_absent_without_kinds():
    batch, ce = _batch()
    batch["token_kinds"] = torch.zeros_like(batch["token_kinds"])  # only "other"
    loss_func = make_loss_func("ntp", kind_names=KIND_NAMES)
    logs = loss_func(batch, ce)[2]
    assert [logs[f"ce_{k}"][1].item() for k in KIND_NAMES[1:]] == [0.0, 0.0, 0.0]
    # Without kind names the kinds are not read at all.
    assert set(make_loss_func("ntp")(batch, ce)[2]) == {"weighted_ce", "ce"}
    del batch["token_kinds"]
    assert set(loss_func(batch, ce)[2]) == {"weighted_ce", "ce"}


def test_bad_batches_are_refused_with_the_reason():
    batch, ce = _batch()
    prior = make_loss_func("prior", kind_names=KIND_NAMES, validate=True)
    with pytest.raises(KeyError, match=r"loss 'prior' needs batch\['loss_weights'\]"):
        prior({k: v for k, v in batch.items() if k != "loss_weights"}, ce)
    with pytest.raises(ValueError, match=r"batch\['loss_mask'\] has shape \(3, 10\), per_token_ce has \(3, 9\)"):
        prior(batch, ce[:, :9])
    for value, word in [(float("nan"), "NaN"), (float("inf"), "infinite"), (-1.0, "negative")]:
        bad = dict(batch, loss_weights=batch["loss_weights"].clone())
        bad["loss_weights"][0, 1] = value
        with pytest.raises(ValueError, match=rf"loss_weights'\] holds 1 {word}"):
            prior(bad, ce)
    bad = dict(batch, loss_mask=batch["loss_mask"] * 0.5)
    with pytest.raises(ValueError, match="other than 0 and 1"):
        prior(bad, ce)
    bad = dict(batch, token_kinds=batch["token_kinds"] + 4)
    with pytest.raises(ValueError, match=r"token_kinds'\] holds 30 id\(s\) outside 0..3"):
        prior(bad, ce)


# --- invariance through megatron-core's schedule ------------------------------------------------

VOCAB, SEQ, GLOBAL_BATCH = 64, 12, 8


def _global_batch():
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=g)
    mask = (torch.rand(GLOBAL_BATCH, SEQ, generator=g) > 0.2).float()
    return dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                position_ids=torch.arange(SEQ).expand(GLOBAL_BATCH, SEQ),
                loss_weights=torch.rand(GLOBAL_BATCH, SEQ, generator=g) * 2 * mask,
                token_kinds=torch.randint(0, len(KIND_NAMES), (GLOBAL_BATCH, SEQ), generator=g))


def _gradients_on_rank(layouts):
    from megatron_prior import parallel

    parallel.initialize()
    return _gradients(layouts)


def _gradients(layouts):
    """For each ``num_microbatches``: this DP rank's share of the global batch through the
    pipeline schedule with the PRIOR loss_func; returns the logged sums and the gradients."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_prior.loss.cross_entropy import vocab_parallel_weighted_cross_entropy
    from megatron_prior.models.gpt import build_gpt, transformer_config
    from megatron_prior.testing import assign_global_weights, local_gradients

    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    per_rank = GLOBAL_BATCH // dp_size
    mine = {k: v[dp_rank * per_rank:(dp_rank + 1) * per_rank] for k, v in _global_batch().items()}
    loss_func = make_loss_func("prior", kind_names=KIND_NAMES)
    out = []
    for num_microbatches in layouts:
        config = transformer_config(num_layers=2, hidden_size=16, num_attention_heads=2)
        model = build_gpt(config, VOCAB, SEQ)
        assign_global_weights(model)
        model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
        config.finalize_model_grads_func = finalize_model_grads
        config.no_sync_func = model.no_sync
        mbs = per_rank // num_microbatches
        micro = iter([{k: v[i * mbs:(i + 1) * mbs] for k, v in mine.items()} for i in range(num_microbatches)])

        def forward_step(data_iterator, model):
            batch = next(data_iterator)
            logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, V/tp]
            ce = vocab_parallel_weighted_cross_entropy(logits, batch["labels"])
            return ce, lambda ce: loss_func(batch, ce)

        model.zero_grad_buffer()
        logged = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=micro, model=[model],
            num_microbatches=num_microbatches, seq_length=SEQ, micro_batch_size=mbs, forward_only=False)
        sums = {k: torch.stack([d[k] for d in logged]).sum(0).tolist() for k in logged[0]}
        out.append((sums, local_gradients(model.module)))
    return out


@pytest.fixture
def single_process():
    from megatron_prior import parallel

    parallel.initialize()
    yield
    parallel.destroy()


@pytest.mark.slow
def test_gradient_is_invariant_to_micro_batching_and_data_parallelism(single_process):
    one_by_eight, eight_by_one = _gradients((1, 8))  # a world of one, in this process
    dp2 = run_on_ranks(_gradients_on_rank, 2, (4,))
    layouts = {"1x8": [one_by_eight], "8x1": [eight_by_one], "DP2x4": [r[0] for r in dp2]}
    reference_sums, reference_grads = one_by_eight
    for name, results in layouts.items():
        sums = {k: np.sum([r[0][k] for r in results], axis=0) for k in reference_sums}
        for key, value in sums.items():
            np.testing.assert_allclose(value, reference_sums[key], rtol=1e-6, err_msg=f"{name} {key}")
        for rank_result in results:
            for (key, _, _, grad), (ref_key, _, _, ref) in zip(rank_result[1], reference_grads):
                assert key == ref_key
                err = np.abs(grad - ref).max() / np.abs(ref).max()
                assert err <= 1e-6, f"{name} {key}: relative gradient error {err:.2e}"
    # The weighted loss is not the unweighted one: the test exercises PRIOR's weights.
    assert abs(reference_sums["weighted_ce"][0] - reference_sums["ce"][0]) > 1e-3
