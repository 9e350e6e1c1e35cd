"""Where text-aligned tensors land in a vision-language model's combined sequence.

Every ``<image>`` token of a text row becomes the image's ``image_sequence_length``
positions; a row holds one (its first token) or, packed (``--pack-samples``), one per caption.
Text position ``j`` lands at ``j + (image_sequence_length - 1) * (<image> tokens at or before
j)``: an ``<image>`` on the last of its image's positions, where its label (the caption's first
token) is predicted. LLaVAModel builds the same layout, and the U-LVLM follows it (its stream,
``place_images``), so labels, masks, PRIOR weights and token kinds all expand here. The
combined row has ``image_sequence_length - 1 + s`` positions, one image's worth: a packed
row is filled so that only its padding falls beyond.
"""

from __future__ import annotations

from typing import Optional

import torch


def combined_index(image_mask: torch.Tensor, image_sequence_length: int) -> torch.Tensor:
    """Combined position of each text position ``[b, s]`` (``image_mask``: its ``<image>`` tokens)."""
    steps = torch.arange(image_mask.shape[1], device=image_mask.device)
    return steps + (image_sequence_length - 1) * image_mask.long().cumsum(1)


def _first_token_is_image(x: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
    mask[:, 0] = True
    return mask


def expand_to_combined(x: torch.Tensor, image_sequence_length: int, fill: float = 0,
                       image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Text-aligned ``[b, s]`` -> combined ``[b, image_sequence_length - 1 + s]``.

    ``image_mask`` marks the ``<image>`` tokens (default: the first token of every row). The
    positions an image adds before its ``<image>`` get ``fill`` (no loss).
    """
    if image_mask is None:
        image_mask = _first_token_is_image(x)
    b, s = x.shape
    out = torch.full((b, image_sequence_length - 1 + s), fill, dtype=x.dtype, device=x.device)
    index = combined_index(image_mask, image_sequence_length)
    rows = torch.arange(b, device=x.device)[:, None].expand(b, s)
    kept = index < out.shape[1]
    out[rows[kept], index[kept]] = x[kept]
    return out


def place_images(text: torch.Tensor, images: torch.Tensor, image_mask: torch.Tensor) -> torch.Tensor:
    """The combined input ``[b, image_sequence_length - 1 + s, h]`` of text embeddings
    ``[b, s, h]`` and image embeddings ``[k, image_sequence_length, h]``, the ``k`` images in
    the order of their ``<image>`` tokens (row by row), each in place of its ``<image>``."""
    b, s, _ = text.shape
    n = images.shape[1]
    index = combined_index(image_mask, n)
    rows = torch.arange(b, device=text.device)[:, None].expand(b, s)
    is_text = ~image_mask & (index < n - 1 + s)
    image_rows, image_cols = torch.nonzero(image_mask, as_tuple=True)
    if len(image_rows) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images for {len(image_rows)} <image> tokens")
    block = index[image_rows, image_cols][:, None] - (n - 1) + torch.arange(n, device=text.device)
    out = text.new_zeros(b, n - 1 + s, text.shape[2])
    out = out.index_put((rows[is_text], index[is_text]), text[is_text])
    return out.index_put((image_rows[:, None].expand(-1, n), block), images)
