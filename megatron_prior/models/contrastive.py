"""A CLIP-style image-caption model: the H-LVLM's vision encoder and a small text tower, each
projected into one embedding space, trained with the symmetric InfoNCE loss
(``megatron_prior.loss.contrastive``) to pre-train the encoder the H-LVLM loads with
``--vit-load``.

- ``vision_model``: megatron-core's ``CLIPViTModel`` built by ``hlvlm.vision_encoder``, as
  ``LLaVAModel`` builds it, so its parameters and their names are the H-LVLM's. Its image
  embedding is the mean of the patch features the H-LVLM reads (CLIP's class token dropped, as
  the H-LVLM drops it), then a LayerNorm and a linear projection. Pooling the patch tokens
  rather than reading the class token trains every patch output, which is what the H-LVLM's
  projector sees.
- ``text_model``: a megatron-core ``GPTModel`` without its output layer (embeddings, causal
  layers; learned absolute positions) over the caption tokens, averaged over the caption's
  positions (not CLIP's end-of-text token: at initialisation a small causal tower's last
  position says little more than the caption's length, and training sat at the chance loss
  longer; see docs/design.md), then a LayerNorm and a linear projection.
- ``logit_scale``: CLIP's learnable temperature.

The checkpoint (``save``) is an encoder-only H-LVLM checkpoint (``models.vision_encoder``)
whose ``model_config.json`` describes the ViT, plus the text tower, projections and temperature
under the ``contrastive`` key with their shape in ``extra["contrastive"]``: ``--vit-load`` reads
the encoder and never asks for the rest; ``load`` restores the whole model when it is there.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_prior.checkpoint import (CheckpointError, checkpoint_dir, load_state, load_weights, read_metadata,
                                       read_model_config)
from megatron_prior.loss.contrastive import LOGIT_SCALE_INIT, contrastive_logits
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import build_gpt, transformer_config
from megatron_prior.models.hlvlm import has_class_token, vision_config, vision_encoder
from megatron_prior.models.init import initialize_weights
from megatron_prior.models.vision_encoder import PREFIX, encoder_state, save_vision_encoder, vision_encoder_config

CONTRASTIVE_KEY = "contrastive"
TEXT_PREFIX = "text_model."


@dataclass(frozen=True)
class TextTower:
    """The text side's shape and the shared embedding width (``extra["contrastive"]`` of the
    checkpoint's model_config.json)."""

    vocab_size: int
    seq_length: int
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    embed_dim: int

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"text tower: hidden size {self.hidden_size} is not divisible by "
                             f"{self.num_attention_heads} attention heads")

    @classmethod
    def of(cls, cfg: ModelConfig, source: str = "model config") -> Optional["TextTower"]:
        """The text tower ``cfg.extra["contrastive"]`` describes, or None."""
        data = cfg.extra.get(CONTRASTIVE_KEY)
        if data is None:
            return None
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(data, dict) or set(data) != names or not all(
                type(v) is int and v > 0 for v in data.values()):
            raise CheckpointError(f"{source}: extra.{CONTRASTIVE_KEY} must hold positive integers "
                                  f"{sorted(names)}, found {data!r}")
        return cls(**data)


class ContrastiveModel(MegatronModule):
    """``cfg``: ``model_config``'s (the ViT's fields and the text tower's shape)."""

    def __init__(self, cfg: ModelConfig, bf16: bool = False) -> None:
        super().__init__(config=vision_config(cfg, bf16))
        text = TextTower.of(cfg)
        if text is None:
            raise ValueError(f"the model config has no extra.{CONTRASTIVE_KEY} (the text tower's shape)")
        self.cfg, self.text = cfg, text
        self.vision_model = vision_encoder(cfg, bf16)
        self.skip_tokens = int(has_class_token(cfg))  # the class token the H-LVLM drops
        text_config = transformer_config(num_layers=text.num_layers, hidden_size=text.hidden_size,
                                         num_attention_heads=text.num_attention_heads, bf16=bf16, pipelined=False)
        self.text_model = build_gpt(text_config, text.vocab_size, text.seq_length,
                                    position_embedding_type="learned_absolute",
                                    share_embeddings_and_output_weights=False, pre_process=True, post_process=False)
        dtype = self.config.params_dtype
        self.vision_norm = torch.nn.LayerNorm(cfg.vit_hidden_size, eps=cfg.vit_norm_epsilon, dtype=dtype)
        self.vision_projection = torch.nn.Linear(cfg.vit_hidden_size, text.embed_dim, bias=False, dtype=dtype)
        self.text_norm = torch.nn.LayerNorm(text.hidden_size, dtype=dtype)
        self.text_projection = torch.nn.Linear(text.hidden_size, text.embed_dim, bias=False, dtype=dtype)
        self.logit_scale = torch.nn.Parameter(torch.tensor(LOGIT_SCALE_INIT, dtype=dtype))

    def initialize(self, seed: int, std: float) -> None:
        """Layout-independent weights (``models.init``; the ViT gets the same weights a fresh
        H-LVLM's ViT gets from that seed and std with a ViT-deep language model), the
        temperature at CLIP's start."""
        initialize_weights(self, seed, std=std, num_layers=self.cfg.vit_num_layers)
        with torch.no_grad():
            self.logit_scale.fill_(LOGIT_SCALE_INIT)

    def patch_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, patches, vit_hidden]``: the features the H-LVLM reads, one per patch."""
        return self.vision_model(images)[:, self.skip_tokens:]

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, vit_hidden]``: the mean of the patch features."""
        return self.patch_features(images).mean(dim=1)

    def image_embeddings(self, features: torch.Tensor) -> torch.Tensor:
        """``[b, embed_dim]`` of ``image_features``' output."""
        return self.vision_projection(self.vision_norm(features))

    def text_embeddings(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """``[b, embed_dim]`` of captions ``tokens[i, :lengths[i]]`` (``[b, s]``, padded after)."""
        if not bool((lengths >= 1).all()) or int(lengths.max()) > tokens.shape[1]:
            raise ValueError(f"caption lengths must lie in [1, {tokens.shape[1]}], got {lengths.tolist()}")
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        hidden = self.text_model(tokens, positions, None).transpose(0, 1)  # [b, s, h]; causal: padding is never seen
        mask = (positions < lengths[:, None]).to(hidden.dtype)
        pooled = (hidden * mask[..., None]).sum(dim=1) / lengths[:, None].to(hidden.dtype)
        return self.text_projection(self.text_norm(pooled))

    def forward(self, images: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The ``[b, b]`` image-to-text logits of the batch's pairs."""
        return contrastive_logits(self.image_embeddings(self.image_features(images)),
                                  self.text_embeddings(tokens, lengths), self.logit_scale)

    def freeze_vision(self) -> None:
        """Train the text side against a fixed encoder (LiT): the ViT takes no gradient."""
        for p in self.vision_model.parameters():
            p.requires_grad_(False)

    def heads_state(self) -> dict:
        """Everything but the encoder: text tower, norms, projections, temperature (sharded)."""
        return {k: v for k, v in self.sharded_state_dict().items() if not k.startswith(PREFIX)}


def model_config(text: TextTower, **vit: Any) -> ModelConfig:
    """The encoder's ModelConfig (``vit``: the ViT's fields, see ``vision_encoder_config``) as the
    checkpoint records it, the text tower's shape in ``extra["contrastive"]``."""
    cfg = vision_encoder_config("contrastive pre-training; the text tower, projections and temperature are under "
                                f"the {CONTRASTIVE_KEY} key", **vit)
    cfg.extra[CONTRASTIVE_KEY] = dataclasses.asdict(text)
    return cfg


def save(model: ContrastiveModel, save_dir: str | os.PathLike, iteration: int,
         files: Optional[Mapping[str, str]] = None) -> Path:
    """Write ``model`` as iteration ``iteration`` of ``save_dir`` (see the module's docstring)."""
    return save_vision_encoder(save_dir, iteration, model, model.cfg, files,
                               extra_state={CONTRASTIVE_KEY: model.heads_state()})


def saved_config(load_dir: str | os.PathLike) -> Optional[ModelConfig]:
    """The model config of a checkpoint ``save`` wrote (text tower included), or None for any
    other encoder checkpoint."""
    ckpt = checkpoint_dir(load_dir)
    cfg = read_model_config(ckpt)
    if TextTower.of(cfg, str(ckpt / "model_config.json")) is None:
        return None
    if not any(key.startswith(TEXT_PREFIX) for key in read_metadata(ckpt).state_dict_metadata):
        raise CheckpointError(f"{ckpt}: model_config.json describes a text tower, but the checkpoint holds no "
                              f"{TEXT_PREFIX}* tensors")
    return cfg


def load(model: ContrastiveModel, load_dir: str | os.PathLike) -> None:
    """Restore the whole model from a checkpoint ``save`` wrote (strict: every tensor)."""
    ckpt = checkpoint_dir(load_dir)
    state = load_state(ckpt, {"model": encoder_state(model), CONTRASTIVE_KEY: model.heads_state()})
    load_weights(model, {**state["model"], **state[CONTRASTIVE_KEY]}, ckpt)
