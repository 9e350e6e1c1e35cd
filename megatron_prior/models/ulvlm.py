"""U-LVLM: an encoder-free vision-language model (SOLO-style) on megatron-core's GPTModel, and
the ``ulvlm`` architecture.

Raw image patches go through one linear layer straight into the language model's input
stream, framed by special tokens: ``<img_start>``, then each row of patches followed by
``<img_row>``, the last row's break being ``<img_end>``. The stream replaces the ``<image>``
placeholder at position 0 of the text, so the model sees ``image_sequence_length - 1 +
text_length`` positions, the same layout rule as the H-LVLM. The patch projection is
replicated across tensor-parallel ranks (its input gradient is identical on every TP rank,
so its weights stay in sync) and lives on the first pipeline stage.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule

from megatron_prior.models.arch import Arch, BuildContext, register
from megatron_prior.models.config import ModelConfig
from megatron_prior.models.gpt import language_model
from megatron_prior.models.layout import expand_to_combined, place_images


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """``[b, c, H, W]`` -> ``[b, rows, cols, c * patch * patch]`` (row-major patches)."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, h // patch, w // patch, c * patch * patch)


class ULVLM(MegatronModule):
    def __init__(self, cfg: ModelConfig, language_model: GPTModel) -> None:
        super().__init__(config=language_model.config)
        self.cfg = cfg
        self.pre_process = language_model.pre_process
        self.post_process = language_model.post_process
        # finalize_model_grads reads it to all-reduce tied embeddings across pipeline stages.
        self.share_embeddings_and_output_weights = cfg.share_embeddings_and_output_weights
        self.language_model = language_model
        if self.pre_process:
            config = language_model.config
            patch_dim = 3 * cfg.patch_size * cfg.patch_size
            self.patch_embed = torch.nn.Linear(patch_dim, config.hidden_size, dtype=config.params_dtype)
            with torch.no_grad():
                config.init_method(self.patch_embed.weight)
                self.patch_embed.bias.zero_()

    # megatron-core's schedules and finalize_model_grads talk to these.
    def set_input_tensor(self, input_tensor) -> None:
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def _image_stream(self, images: torch.Tensor) -> torch.Tensor:
        """``[b, image_sequence_length, h]``: marker embeddings with patch projections in place."""
        cfg = self.cfg
        n = cfg.patches_per_side
        b = images.shape[0]
        patches = self.patch_embed(patchify(images.to(self.patch_embed.weight.dtype), cfg.patch_size))
        markers = torch.tensor([cfg.image_start_id, cfg.image_row_id, cfg.image_end_id], device=images.device)
        marker_emb = self.language_model.embedding.word_embeddings(markers.unsqueeze(0)).squeeze(0)
        start, row_break, end = marker_emb[0], marker_emb[1], marker_emb[2]
        breaks = row_break.expand(b, n, 1, -1).clone()
        breaks[:, -1, 0] = end
        rows = torch.cat([patches, breaks], dim=2).reshape(b, n * (n + 1), -1)
        return torch.cat([start.expand(b, 1, -1), rows], dim=1)

    def forward(
        self,
        images: Optional[torch.Tensor],
        input_ids: torch.Tensor,
        position_ids: Optional[torch.Tensor],
        attention_mask: Optional[torch.Tensor],
        labels: Optional[torch.Tensor] = None,
        packed_seq_params: Optional[PackedSeqParams] = None,
    ) -> torch.Tensor:
        """Per-token loss ``[b, s_combined]`` when labels are given, else logits.

        ``input_ids``/``labels`` are at text length with an ``<image>`` token per image (one at
        position 0; a packed row's at each caption), ``images`` one per ``<image>`` in row order;
        each image's stream takes its ``<image>``'s place and labels are expanded with an
        ignored prefix over each image's positions (``megatron_prior.models.layout``).
        """
        image_mask = input_ids == self.cfg.image_token_id
        decoder_input = None
        if self.pre_process:
            text = self.language_model.embedding.word_embeddings(input_ids)  # [b, s, h]
            stream = place_images(text, self._image_stream(images), image_mask)  # [b, S, h]
            decoder_input = self.language_model.embedding.embedding_dropout(stream.transpose(0, 1).contiguous())
        if labels is not None:
            labels = expand_to_combined(labels, self.cfg.image_sequence_length, fill=0, image_mask=image_mask)
        return self.language_model(
            input_ids=None, position_ids=None, attention_mask=attention_mask,
            decoder_input=decoder_input, labels=labels, packed_seq_params=packed_seq_params,
        )


def build(cfg: ModelConfig, language_config: TransformerConfig, ctx: BuildContext) -> ULVLM:
    return ULVLM(cfg, language_model(cfg, language_config, ctx))


def forward_loss(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    # Positions come from the stream (rope over the combined sequence), not from the text.
    return model(batch["images"], batch["tokens"], None, batch.get("attention_mask"), labels=batch["labels"],
                 packed_seq_params=batch.get("packed_seq_params"))


def validate_config(cfg: ModelConfig) -> list[str]:
    problems = []
    if cfg.image_size % cfg.patch_size:
        problems.append(f"image_size {cfg.image_size} is not divisible by patch_size {cfg.patch_size}")
    if cfg.image_token_id is None:
        problems.append(f"arch {cfg.arch} needs image_token_id (the tokenizer's <image> id)")
    if None in (cfg.image_start_id, cfg.image_row_id, cfg.image_end_id):
        problems.append(f"arch {cfg.arch} needs image_start_id, image_row_id and image_end_id")
    if cfg.position_embedding_type != "rope":
        problems.append(f"arch {cfg.arch} needs position_embedding_type 'rope' (positions come from the stream)")
    return problems


def image_sequence_length(cfg: ModelConfig) -> int:
    # <img_start>, then each row's n patches followed by <img_row>, the last row's break
    # replaced by <img_end>.
    n = cfg.patches_per_side
    return 1 + n * (n + 1)


ARCH = register(Arch(
    name="ulvlm",
    display_name="U-LVLM",
    description="encoder-free vision-language model: raw patches through one linear layer into a GPT "
                "(SOLO-style image markers)",
    needs_images=True,
    build=build,
    forward_loss=forward_loss,
    validate_config=validate_config,
    image_sequence_length=image_sequence_length,
))

