"""megatron-core without Transformer Engine: the one default that breaks.

``CLIPViTModel`` defaults its pre/post LayerNorm to ``torch.nn.LayerNorm`` when TE is
absent but still builds it with a ``config=`` keyword, which torch's LayerNorm rejects;
LLaVAModel builds its CLIPViTModel with those defaults. Where TE does not import,
LLaVAModel gets a CLIPViTModel whose norms default to megatron-core's WrappedTorchNorm
(which takes ``config``). With TE present nothing changes.
"""

from __future__ import annotations

import importlib.util

from megatron.core.models.multimodal import llava_model
from megatron.core.models.vision.clip_vit_model import CLIPViTModel
from megatron.core.transformer.torch_norm import WrappedTorchNorm

_applied = False


def have_transformer_engine() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


def apply() -> bool:
    """Apply when TE is absent. Idempotent. Returns whether it is in effect."""
    global _applied
    if have_transformer_engine():
        return False
    if _applied:
        return True

    class CLIPViTModelTorchNorm(CLIPViTModel):
        def __init__(self, *args, **kwargs):
            if len(args) < 3:
                kwargs.setdefault("ln_pre_impl", WrappedTorchNorm)
            if len(args) < 4:
                kwargs.setdefault("ln_post_impl", WrappedTorchNorm)
            super().__init__(*args, **kwargs)

    llava_model.CLIPViTModel = CLIPViTModelTorchNorm
    _applied = True
    return True
