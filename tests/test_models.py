"""Model building: layout-independent init values, the fused loss head, U-LVLM stream layout."""

import torch

from megatron_prior.testing import run_on_ranks


def _build_all():
    from megatron_prior import parallel
    from megatron_prior.models.arch import get_arch
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.init import initialize_weights

    parallel.initialize(seed=1)
    out = {}
    common = dict(vocab_size=128, max_position_embeddings=64, num_layers=2, hidden_size=32, num_attention_heads=4)
    image = dict(image_size=16, patch_size=4, image_token_id=5, image_start_id=6, image_row_id=7, image_end_id=8,
                 vit_hidden_size=32, vit_num_attention_heads=4)
    for arch in ("gpt", "hlvlm", "ulvlm"):
        cfg = ModelConfig(arch=arch, **common, **({} if arch == "gpt" else image))
        model = build_model(cfg)
        initialize_weights(model, seed=9, std=0.02, num_layers=cfg.num_layers)
        norms, biases, weights = [], [], []
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.LayerNorm):
                norms.append((name, bool(torch.all(module.weight == 1)), bool(torch.all(module.bias == 0))))
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                biases.append((name, bool(torch.all(p == 0))))
            elif p.dim() >= 2:
                weights.append((name, float(p.std())))
        # Fused output layer + CE equals logits + CE, loss and gradients.
        ids = torch.randint(9, 128, (2, 12))
        ids[:, 0] = 5
        images = torch.randn(2, 3, 16, 16)
        losses = []
        for fused in (False, True):
            m = build_model(cfg, fused_linear_ce=fused)
            initialize_weights(m, seed=9, std=0.02, num_layers=cfg.num_layers)
            batch = {"tokens": ids, "labels": ids, "position_ids": torch.arange(12).expand(2, 12), "images": images}
            loss = get_arch(arch).forward_loss(m, batch)
            loss.sum().backward()
            losses.append((loss.detach(), [p.grad.clone() for p in m.parameters() if p.grad is not None]))
        (l0, g0), (l1, g1) = losses
        fused_ok = torch.allclose(l0, l1, atol=1e-5) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(g0, g1))
        out[arch] = (norms, biases, weights, fused_ok, tuple(l0.shape), cfg.image_sequence_length)
    return out


def test_initial_values_fused_head_and_layouts():
    (result,) = run_on_ranks(_build_all, 1)
    for arch, (norms, biases, weights, fused_ok, loss_shape, image_len) in result.items():
        assert norms, arch
        for name, weight_one, bias_zero in norms:
            assert weight_one and bias_zero, f"{arch}: norm {name} does not start at (1, 0)"
        for name, zero in biases:
            assert zero, f"{arch}: bias {name} does not start at 0"
        for name, std in weights:
            assert 0.002 < std < 0.03, f"{arch}: {name} std {std:.4f}"
        assert fused_ok, f"{arch}: --fused-linear-ce differs from logits + cross-entropy"
        # Text of 12 with the <image> placeholder expanded: image_len - 1 + 12 positions.
        assert loss_shape == (2, (image_len - 1 if arch != "gpt" else 0) + 12), (arch, loss_shape)
    assert result["ulvlm"][5] == 1 + 4 * 5 and result["hlvlm"][5] == 16
