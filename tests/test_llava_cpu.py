"""megatron-core's LLaVAModel (ViT + MLP projector + GPT) runs forward and backward on CPU."""

import torch

from megatron_prior import parallel


def test_llava_tiny_forward_backward():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_prior.models.gpt import transformer_config

    parallel.initialize(seed=3)
    try:
        lm = transformer_config(num_layers=2, hidden_size=32, num_attention_heads=4)
        vit = transformer_config(num_layers=1, hidden_size=16, num_attention_heads=2)
        vit.vision_model_type = "clip"  # Megatron-LM's training args set this on the config
        proj = transformer_config(num_layers=1, hidden_size=32, num_attention_heads=1, ffn_hidden_size=32)
        vit_spec = get_vit_layer_with_local_spec()
        proj_spec = ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear,
                                                                     linear_fc2=RowParallelLinear))
        model = LLaVAModel(
            language_transformer_config=lm, language_transformer_layer_spec=get_gpt_layer_local_spec(),
            language_vocab_size=64, language_max_sequence_length=32,
            vision_transformer_config=vit, vision_transformer_layer_spec=vit_spec,
            drop_vision_class_token=True, vision_projection_config=proj,
            vision_projection_layer_spec=proj_spec.submodules, img_h=8, img_w=8, patch_dim=4,
        )
        text = torch.randint(0, 64, (2, 9))
        text[:, 0] = -200  # the image placeholder: 4 patch embeddings replace it
        labels = torch.randint(0, 64, (2, 9))
        loss_mask = torch.ones(2, 9)
        loss, combined_mask = model(torch.randn(2, 3, 8, 8), text, torch.arange(9).expand(2, 9), None,
                                    labels=labels, loss_mask=loss_mask)
        assert loss.shape == (2, 9 + 4 - 1) and combined_mask.shape == loss.shape
        assert torch.all(combined_mask[:, :3] == 0), "image positions carry no loss"
        total = (loss * combined_mask).sum() / combined_mask.sum()
        assert torch.isfinite(total)
        total.backward()
        vit_grad = model.vision_model.conv1.weight.grad
        assert vit_grad is not None and vit_grad.abs().sum() > 0, "the loss must reach the ViT"
    finally:
        parallel.destroy()
