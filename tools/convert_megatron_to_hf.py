#!/usr/bin/env python
"""Convert a GPT or H-LVLM checkpoint of this project into a Hugging Face model directory.

A GPT becomes a directory ``AutoModelForCausalLM.from_pretrained`` opens with the same logits: a
LlamaForCausalLM (Qwen2ForCausalLM when only the q/k/v projection has biases). Only
Llama-shaped models convert (rotary positions, RMSNorm, SwiGLU); others are refused with the
field that HF Llama cannot express. An H-LVLM becomes a LlavaForConditionalGeneration directory
(CLIP tower, projector, Llama; preprocessor_config.json with its pixel normalisation). The
tensors keep the checkpoint's dtype and are written as safetensors shards into a temporary
directory renamed into place when complete.

Example:
  python tools/convert_megatron_to_hf.py --load ckpt/llama-3.2-3b --output hf/llama-back \\
      --tokenizer-dir hf/Llama-3.2-3B
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
from megatron_prior.convert import ConversionError, convert_megatron_to_hf  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, help="checkpoint directory (its latest iteration is converted)")
    parser.add_argument("--output", required=True, help="Hugging Face directory to create (must not exist)")
    parser.add_argument("--tokenizer-dir", default=None,
                        help="also save this local Hugging Face tokenizer into the output directory")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    parallel.initialize()  # a world of one: the checkpoint loads through megatron-core's sharded state
    try:
        out = convert_megatron_to_hf(args.load, args.output, args.tokenizer_dir)
    except (ConversionError, CheckpointError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        parallel.destroy()
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
