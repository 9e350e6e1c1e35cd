"""The loss reads no value back to the host unless ``--check-loss-inputs`` asks it to.

A read-back (``.item()``, ``.tolist()``, ``bool(t)``, ``int(t)``, ``nonzero``, a data-dependent
shape, ...) is a device sync on a GPU, once per micro-batch. The probe: run the loss on the
``meta`` device, whose tensors have shapes and dtypes but no values, so every read-back raises,
whatever API it goes through, without patching torch. The loss code has no CUDA-only branch
(only chunk sizes depend on the device type), so what runs on meta is what runs on a GPU.
With the flag on, the same calls do read values (the probe catches them) and refuse bad
inputs with the messages of ``test_loss_cross_entropy`` / ``test_loss_func``.
"""

from types import SimpleNamespace

import pytest
import torch

from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.loss.loss_func import make_loss_func
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.loss_head import _DeferredLogits, install_loss_head
from megatron_prior.training.arguments import build_parser
from megatron_prior.training.steps import make_forward_step

B, S, H, V = 2, 6, 8, 32
READ_BACK = (NotImplementedError, RuntimeError)  # what a meta tensor raises when its value is read


def _step(check: bool, fused: bool, device: str):
    """The training path of one micro-batch: loss head (plain or fused) -> forward_step's
    loss_func (prior, with kinds) -> backward."""
    # The head's loss picks the fused kernel when the output layer hands it deferred logits;
    # the stand-in model below plays that output layer.
    head = SimpleNamespace(post_process=True)
    install_loss_head(head, check_inputs=check)
    hidden = torch.randn(S, B, H, device=device, requires_grad=True)
    out_weight = torch.randn(V, H, device=device, requires_grad=True)

    def model(tokens, position_ids, attention_mask, labels, packed_seq_params=None):
        logits = _DeferredLogits(hidden, out_weight, False) if fused else hidden @ out_weight.t()
        return head.compute_language_model_loss(labels, logits)

    batch = dict(tokens=torch.zeros(B, S, dtype=torch.long, device=device),
                 position_ids=torch.arange(S, device=device).expand(B, S),
                 labels=torch.ones(B, S, dtype=torch.long, device=device),
                 loss_mask=torch.ones(B, S, device=device),
                 loss_weights=torch.ones(B, S, device=device),
                 token_kinds=torch.zeros(B, S, dtype=torch.uint8, device=device))
    config = ModelConfig(arch="gpt", vocab_size=V, max_position_embeddings=S, num_layers=1, hidden_size=H,
                         num_attention_heads=1)
    forward_step = make_forward_step(config, "prior", check_loss_inputs=check)
    output, loss_func = forward_step(iter([batch]), model)
    loss_sum, num_tokens, logs = loss_func(output)
    loss_sum.backward()
    return loss_sum, num_tokens, logs, hidden.grad, out_weight.grad


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_without_the_flag_the_loss_reads_no_value(fused):
    loss_sum, num_tokens, logs, grad_h, grad_w = _step(check=False, fused=fused, device="meta")
    assert loss_sum.shape == () and num_tokens.dtype == torch.int32
    assert set(logs) == {"weighted_ce", "ce", *(f"ce_{k}" for k in KIND_NAMES)}
    assert grad_h.shape == (S, B, H) and grad_w.shape == (V, H)


@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_with_the_flag_the_loss_reads_values(fused):
    with pytest.raises(READ_BACK, match="meta"):
        _step(check=True, fused=fused, device="meta")
    # The probe is not what fails: the same step on CPU with the flag runs.
    loss_sum, num_tokens, *_ = _step(check=True, fused=fused, device="cpu")
    assert int(num_tokens) == B * S and torch.isfinite(loss_sum)


def test_each_value_check_alone_is_off_without_validate():
    meta = dict(device="meta")
    logits, target = torch.randn(S, B, V, **meta), torch.zeros(S, B, dtype=torch.long, **meta)
    head = SimpleNamespace(post_process=True)
    for check in (False, True):
        install_loss_head(head, check_inputs=check)
        if check:
            with pytest.raises(READ_BACK, match="meta"):
                head.compute_language_model_loss(target.t(), logits)
        else:
            head.compute_language_model_loss(target.t(), logits)
    batch = dict(loss_mask=torch.ones(B, S, **meta), loss_weights=torch.ones(B, S, **meta),
                 token_kinds=torch.zeros(B, S, dtype=torch.uint8, **meta))
    ce = torch.rand(B, S, **meta)
    make_loss_func("prior", kind_names=KIND_NAMES)(batch, ce)
    with pytest.raises(READ_BACK, match="meta"):
        make_loss_func("prior", kind_names=KIND_NAMES, validate=True)(batch, ce)


def test_shapes_are_checked_without_the_flag():
    logits = torch.randn(S, B, V, device="meta")
    head = SimpleNamespace(post_process=True)
    install_loss_head(head)
    with pytest.raises(ValueError, match=r"^target shape \(6, 1\) does not match vocab_parallel_logits shape"):
        head.compute_language_model_loss(torch.zeros(1, S, dtype=torch.long, device="meta"), logits)
    with pytest.raises(TypeError, match="^target must hold integer token ids, got torch.float32$"):
        head.compute_language_model_loss(torch.zeros(B, S, device="meta"), logits)
    loss_func = make_loss_func("prior")
    with pytest.raises(ValueError, match=r"^batch\['loss_weights'\] has shape \(2, 5\), per_token_ce has \(2, 6\)$"):
        loss_func(dict(loss_mask=torch.ones(B, S), loss_weights=torch.ones(B, S - 1)), torch.rand(B, S))


def test_flag_parses_and_refuses_bad_inputs_with_todays_messages():
    parser = build_parser()
    assert parser.parse_args([]).check_loss_inputs is False
    assert parser.parse_args(["--check-loss-inputs"]).check_loss_inputs is True
    assert "device sync" in next(a for a in parser._actions if a.dest == "check_loss_inputs").help
    head = SimpleNamespace(post_process=True)
    logits = torch.randn(S, B, V)
    labels = torch.ones(B, S, dtype=torch.long)
    labels[1, 4] = V
    install_loss_head(head, check_inputs=True)
    with pytest.raises(ValueError, match=r"^target holds 1 token id\(s\) outside the vocabulary \[0, 32\) "
                                         r"\(first at index \(4, 1\): 32\)$"):
        head.compute_language_model_loss(labels, logits)
    install_loss_head(head, check_inputs=False)
    assert head.compute_language_model_loss(labels, logits).shape == (B, S)
    batch = dict(loss_mask=torch.ones(B, S), loss_weights=torch.ones(B, S),
                 token_kinds=torch.full((B, S), len(KIND_NAMES), dtype=torch.uint8))
    batch["loss_weights"][0, 2] = -1.0
    ce = torch.rand(B, S)
    with pytest.raises(ValueError, match=r"^batch\['token_kinds'\] holds 12 id\(s\) outside 0..3 "
                                         r"\(other, grounded, template, unrelated\)$"):
        make_loss_func("prior", kind_names=KIND_NAMES, validate=True)(batch, ce)
    batch["token_kinds"].zero_()
    with pytest.raises(ValueError, match=r"^batch\['loss_weights'\] holds 1 negative value\(s\)$"):
        make_loss_func("prior", kind_names=KIND_NAMES, validate=True)(batch, ce)
    make_loss_func("prior", kind_names=KIND_NAMES)(batch, ce)
