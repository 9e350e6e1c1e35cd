#!/usr/bin/env python
"""Convert a Hugging Face model directory into a megatron-core checkpoint of this project.

A CLIP model (CLIPVisionModel, or a full CLIPModel whose vision tower is taken) becomes the
H-LVLM's vision encoder for --vit-load (with --vision-feature-layer -2 as LLaVA-1.5 reads it).
So does a SigLIP model (SiglipVisionModel or SiglipModel), as megatron-core's siglip encoder: its
features are the post-LayerNormed hidden states of the feature layer (HF's last_hidden_state at
-1); its attention-pooling head is not part of them and is left out.

A Llama-family causal LM (LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM; SmolLM2 is a
Llama) becomes a checkpoint of the ``gpt`` architecture: ``--lm-load`` initialises the language
model of any --model from it, ``--reference-type gpt --reference-load`` scores with it, and it
loads at any tensor/pipeline layout. Its model_config.json carries every shape flag (RMSNorm,
SwiGLU, grouped-query attention, rotary base, tied or untied embeddings, biases), so none is
retyped. The vocabulary keeps the model's size: no padded logit takes probability mass.

Tensors are read one at a time (safetensors), so memory holds the model once plus a few
tensors. The directory must be local (save_pretrained's layout); nothing is downloaded.

Example:
  huggingface-cli download meta-llama/Llama-3.2-3B --local-dir hf/Llama-3.2-3B
  python tools/convert_hf_to_megatron.py --hf-dir hf/Llama-3.2-3B --output ckpt/llama-3.2-3b
  python tools/convert_hf_to_megatron.py --hf-dir hf/clip-vit-large-patch14-336 --output ckpt/clip-l336 \
      --vision-feature-layer -2
  python tools/convert_hf_to_megatron.py --hf-dir hf/siglip-base-patch16-224 --output ckpt/siglip-b16
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

# megatron-core warns on import that Transformer Engine and Apex are missing; this tool uses neither.
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from megatron_prior import parallel  # noqa: E402
from megatron_prior.checkpoint import CheckpointError  # noqa: E402
from megatron_prior.convert import ConversionError, convert_hf_to_megatron  # noqa: E402
from megatron_prior.convert.hf import DTYPES  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True,
                        help="local Hugging Face model directory (config.json and *.safetensors, as save_pretrained "
                             "writes it); a hub id is refused: download it first")
    parser.add_argument("--output", required=True, help="checkpoint directory to create (must not hold one)")
    parser.add_argument("--vision-feature-layer", type=int, default=-1,
                        help="CLIP/SigLIP: the layer whose hidden states are the image features, as HF LLaVA counts "
                             "(-1: the last, -2: the one before, LLaVA-1.5's choice); the layers after it are left "
                             "out (SigLIP's post-LayerNorm then applies to that layer's output)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the checkpoint's tensors (default: the model's own, copied bit for bit)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parallel.initialize()  # a world of one: megatron-core's model and its sharded checkpoint need the groups
    try:
        cfg = convert_hf_to_megatron(args.hf_dir, args.output, DTYPES.get(args.dtype), args.vision_feature_layer)
    except (ConversionError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    what = (f"--lm-load, {cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}" if cfg.arch == "gpt"
            else f"--vit-load, {cfg.vit_num_layers} layers, hidden {cfg.vit_hidden_size}, {cfg.image_size}px images")
    print(f"wrote {args.output} (for {what})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
