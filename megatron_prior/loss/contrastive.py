"""CLIP's symmetric InfoNCE loss over a batch of image-caption pairs.

Pair ``i`` (image ``i``, caption ``i``) is the positive of row and column ``i`` of the
similarity matrix ``S = exp(t) * normalize(I) @ normalize(T)^T``; every other caption of the
batch is a negative for image ``i``, every other image a negative for caption ``i``:

    L = (CE(S, diag) + CE(S^T, diag)) / 2        mean over the batch, image->text and text->image

``exp(t)`` is the learnable temperature (CLIP's ``logit_scale``, started at log(1/0.07) and
clamped at 100 so the logits cannot grow without bound).
"""

from __future__ import annotations

import math

import torch

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = 100.0


def contrastive_logits(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
                       logit_scale: torch.Tensor) -> torch.Tensor:
    """``[b, b]`` image-to-text logits: cosine similarities times ``exp(logit_scale)``
    (at most ``LOGIT_SCALE_MAX``); row ``i`` is image ``i`` against every caption."""
    if image_embeddings.shape != text_embeddings.shape or image_embeddings.dim() != 2:
        raise ValueError(f"image embeddings {list(image_embeddings.shape)} and text embeddings "
                         f"{list(text_embeddings.shape)} must both be [batch, dim]")
    image = torch.nn.functional.normalize(image_embeddings, dim=-1)
    text = torch.nn.functional.normalize(text_embeddings, dim=-1)
    return logit_scale.exp().clamp(max=LOGIT_SCALE_MAX) * image @ text.t()


def info_nce(logits: torch.Tensor) -> torch.Tensor:
    """The symmetric InfoNCE loss of ``contrastive_logits``' matrix (pair ``i`` on the diagonal)."""
    target = torch.arange(logits.shape[0], device=logits.device)
    return (torch.nn.functional.cross_entropy(logits, target)
            + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
