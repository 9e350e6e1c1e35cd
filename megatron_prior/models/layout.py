"""Where text-aligned tensors land in a vision-language model's combined sequence."""

from __future__ import annotations

import torch


def expand_to_combined(x: torch.Tensor, image_sequence_length: int, fill: float = 0) -> torch.Tensor:
    """Text-aligned ``[b, s]`` -> combined ``[b, image_sequence_length - 1 + s]``.

    The ``<image>`` placeholder at text position 0 becomes ``image_sequence_length``
    positions; its label (the first caption token) moves to the last image position, and
    the positions before it get ``fill`` (no loss). LLaVAModel builds the same layout, and
    the U-LVLM follows it, so labels, masks, PRIOR weights and token kinds all expand here.
    """
    pad = torch.full((x.shape[0], image_sequence_length - 1), fill, dtype=x.dtype, device=x.device)
    return torch.cat([pad, x], dim=1)
