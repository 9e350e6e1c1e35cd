"""What a model is, as data: one dataclass, size presets, JSON in and out.

A ``ModelConfig`` travels with every checkpoint (``model_config.json``), so a scorer or a
resumed run rebuilds exactly the architecture that was saved, whatever its parallel layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

ARCHITECTURES = ("gpt", "hlvlm", "ulvlm")


@dataclass
class ModelConfig:
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 0
    max_position_embeddings: int = 128
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = True
    normalization: str = "LayerNorm"
    tokenizer_fingerprint: Optional[str] = None
    # Image input (hlvlm, ulvlm).
    image_size: int = 32
    patch_size: int = 8
    image_token_id: Optional[int] = None
    # H-LVLM vision encoder (a CLIP-style ViT) and its MLP projector.
    vit_num_layers: int = 2
    vit_hidden_size: int = 64
    vit_num_attention_heads: int = 4
    # U-LVLM image markers (SOLO-style): start, row break, end.
    image_start_id: Optional[int] = None
    image_row_id: Optional[int] = None
    image_end_id: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.arch not in ARCHITECTURES:
            problems.append(f"arch {self.arch!r} is not one of {ARCHITECTURES}")
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.arch != "gpt":
            if self.image_size % self.patch_size:
                problems.append(f"image_size {self.image_size} is not divisible by patch_size {self.patch_size}")
            if self.image_token_id is None:
                problems.append(f"arch {self.arch} needs image_token_id (the tokenizer's <image> id)")
        if self.arch == "ulvlm" and None in (self.image_start_id, self.image_row_id, self.image_end_id):
            problems.append("arch ulvlm needs image_start_id, image_row_id and image_end_id")
        if self.arch == "hlvlm" and self.vit_hidden_size % self.vit_num_attention_heads:
            problems.append("vit_hidden_size is not divisible by vit_num_attention_heads")
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_sequence_length(self) -> int:
        """Positions an image occupies in the language model's input."""
        n = self.patches_per_side
        if self.arch == "hlvlm":
            return n * n  # the ViT's patch tokens (class token dropped)
        if self.arch == "ulvlm":
            # <img_start>, then each row's n patches followed by <img_row>, the last row's
            # break replaced by <img_end>.
            return 1 + n * (n + 1)
        return 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "model config") -> "ModelConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown}")
        return cls(**data)


# Size presets: (num_layers, hidden_size, num_attention_heads). ffn = 4 x hidden unless set.
# "tiny"/"mini" are for CPU runs and tests; the rest follow common 125M-7B shapes.
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4),
    "mini": dict(num_layers=4, hidden_size=128, num_attention_heads=4),
    "small": dict(num_layers=6, hidden_size=256, num_attention_heads=8),
    "125m": dict(num_layers=12, hidden_size=768, num_attention_heads=12),
    "350m": dict(num_layers=24, hidden_size=1024, num_attention_heads=16),
    "1.3b": dict(num_layers=24, hidden_size=2048, num_attention_heads=16),
    "3b": dict(num_layers=28, hidden_size=3072, num_attention_heads=24),
    "7b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008),
}
