"""What a model is, as data: one dataclass, size presets, JSON in and out.

A ``ModelConfig`` travels with every checkpoint (``model_config.json``), so a scorer or a
resumed run rebuilds exactly the architecture that was saved, whatever its parallel layout.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from megatron_prior.data.formats import IMAGE_ASPECTS
from megatron_prior.models.arch import get_arch


@dataclass
class ModelConfig:
    arch: str = "gpt"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: Optional[int] = None
    vocab_size: int = 0
    # Positions the position embedding covers, at least combined_seq_length (None: exactly it).
    max_position_embeddings: Optional[int] = 128
    # Text positions per sample the model was built for (training's --seq-length); None takes
    # max_position_embeddings less the image's positions, see __post_init__.
    seq_length: Optional[int] = None
    position_embedding_type: str = "rope"
    share_embeddings_and_output_weights: bool = True
    normalization: str = "LayerNorm"
    # The language model's shape beyond its sizes, by megatron-core's TransformerConfig names.
    # The defaults are what every model had before these fields existed (a model_config.json
    # without them builds the same model): GELU MLP, full multi-head attention, biases on
    # every linear layer, megatron-core's rotary base and norm epsilon.
    swiglu: bool = False
    num_query_groups: Optional[int] = None  # grouped-query attention: key/value heads (None: one per head)
    add_bias_linear: bool = True
    add_qkv_bias: bool = False  # biases on the q/k/v projection alone (Qwen2), with add_bias_linear off
    rotary_base: float = 10000
    rope_scaling: bool = False  # Llama 3.1's frequency scaling of the rotary embedding
    rope_scaling_factor: float = 8.0
    norm_epsilon: float = 1e-5
    tokenizer_fingerprint: Optional[str] = None
    # Image input (architectures with needs_images). image_size is the side of the square images
    # trained on; image_aspect how they were fitted to it (data.images.ASPECTS; None: each image
    # store's own rule, as a checkpoint from before it was recorded says), so evaluation reads
    # images as training did.
    image_size: int = 32
    image_aspect: Optional[str] = None
    patch_size: int = 8
    image_token_id: Optional[int] = None
    # H-LVLM vision encoder (a CLIP-style ViT) and its MLP projector. vision_model_type is
    # megatron-core's CLIPViTModel subtype: "clip" (class token, ln_pre) or "siglip" (no class
    # token, patch convolution with bias, post-LayerNorm).
    vision_model_type: str = "clip"
    vit_num_layers: int = 2
    vit_hidden_size: int = 64
    vit_num_attention_heads: int = 4
    vit_activation: str = "gelu"  # quick_gelu: OpenAI CLIP's; gelu_tanh: SigLIP's (converted towers)
    vit_norm_epsilon: float = 1e-5  # SigLIP's LayerNorms take 1e-6
    # Pixels reach the model as (pixel / 255 - mean) / std per channel: a pretrained vision
    # encoder's own normalisation (CLIP's); the defaults leave [0, 1] pixels as they are.
    image_mean: list = field(default_factory=lambda: [0.0, 0.0, 0.0])
    image_std: list = field(default_factory=lambda: [1.0, 1.0, 1.0])
    # U-LVLM image markers (SOLO-style): start, row break, end.
    image_start_id: Optional[int] = None
    image_row_id: Optional[int] = None
    image_end_id: Optional[int] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        arch = get_arch(self.arch)  # an unknown name is refused with the known ones
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        if self.num_query_groups is not None and self.num_attention_heads % self.num_query_groups:
            problems.append(f"num_attention_heads {self.num_attention_heads} is not divisible by num_query_groups "
                            f"{self.num_query_groups}")
        if self.normalization not in ("LayerNorm", "RMSNorm"):
            problems.append(f"normalization {self.normalization!r} is neither 'LayerNorm' nor 'RMSNorm'")
        if self.image_aspect is not None and self.image_aspect not in IMAGE_ASPECTS:
            problems.append(f"image_aspect {self.image_aspect!r} is not one of {', '.join(IMAGE_ASPECTS)}")
        problems += arch.validate_config(self)
        if problems:
            raise ValueError("invalid model config: " + "; ".join(problems))
        if self.seq_length is None and self.max_position_embeddings is None:
            raise ValueError("invalid model config: give seq_length, max_position_embeddings or both")
        if self.seq_length is None:
            # A model_config.json written before seq_length existed: its readers (evaluation's
            # text length, the scoring window) took max_position_embeddings less the image's
            # positions as the text length, so deriving it keeps what they did.
            self.seq_length = self.max_position_embeddings - self.image_offset
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.combined_seq_length
        if self.seq_length < 1:
            raise ValueError(f"invalid model config: seq_length {self.seq_length} leaves no text "
                             f"(max_position_embeddings {self.max_position_embeddings}, {self.image_offset} "
                             "positions added by the image)")
        if self.combined_seq_length > self.max_position_embeddings:
            # LLaVAModel would cut the sequence there, a learned position embedding fail.
            raise ValueError(f"invalid model config: {self.combined_seq_length} positions per sample (seq_length "
                             f"{self.seq_length} + {self.image_offset} added by the image) exceed "
                             f"max_position_embeddings {self.max_position_embeddings}")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def image_sequence_length(self) -> int:
        """Positions an image occupies in the language model's input (0 without images)."""
        return get_arch(self.arch).image_sequence_length(self)

    @property
    def image_offset(self) -> int:
        """Positions the image adds in front of the text: its stream replaces the one
        ``<image>`` placeholder token (``megatron_prior.models.layout``)."""
        n = self.image_sequence_length
        return n - 1 if n else 0

    @property
    def combined_seq_length(self) -> int:
        """Positions per sample the language model computes: the image's, then the text's."""
        return self.image_offset + self.seq_length

    def language_config_kwargs(self) -> dict:
        """The language model's shape as megatron-core ``TransformerConfig`` arguments."""
        return dict(num_layers=self.num_layers, hidden_size=self.hidden_size,
                    num_attention_heads=self.num_attention_heads, ffn_hidden_size=self.ffn_hidden_size,
                    normalization=self.normalization, gated_linear_unit=self.swiglu,
                    num_query_groups=self.num_query_groups, add_bias_linear=self.add_bias_linear,
                    add_qkv_bias=self.add_qkv_bias, layernorm_epsilon=self.norm_epsilon,
                    activation_func=torch.nn.functional.silu if self.swiglu else torch.nn.functional.gelu)

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
