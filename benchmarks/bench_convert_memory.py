#!/usr/bin/env python
"""Peak memory (RSS) of tools/convert_hf_to_megatron.py on a random Llama built here.

The converter reads the safetensors files one tensor at a time into a model built without
initialisation, so its peak should be about the model once plus a few tensors (plus the
interpreter, torch and megatron-core). This script builds a random Llama (GQA, untied) of the
given shape, saves it with save_pretrained, runs the converter under GNU time in a fresh
process and reports the converter's maximum resident set size next to the model's size, the
largest tensor and a bare import of the tool's modules (the fixed cost). Memory only: no timing.

Example:
  python benchmarks/bench_convert_memory.py --hidden-size 1024 --num-layers 8 --vocab-size 32000
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

TOOLS = Path(__file__).resolve().parents[1] / "tools"


def peak_rss_mib(argv: list[str]) -> float:
    """Maximum resident set size of ``argv`` in a fresh process (GNU time), MiB."""
    result = subprocess.run(["/usr/bin/time", "-v", *argv], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(TOOLS.parent)})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stderr[-3000:]}")
    kib = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    return int(kib.group(1)) / 1024


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden-size", type=int, default=1024, help="model width")
    p.add_argument("--num-layers", type=int, default=8, help="decoder layers")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary (embedding and output rows)")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32", help="the saved model's dtype")
    args = p.parse_args()
    h = args.hidden_size
    config = LlamaConfig(vocab_size=args.vocab_size, hidden_size=h, intermediate_size=int(h * 2.75) // 64 * 64,
                         num_hidden_layers=args.num_layers, num_attention_heads=h // 64,
                         num_key_value_heads=max(1, h // 256), tie_word_embeddings=False)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(getattr(torch, args.dtype))
        size = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
        largest = max(t.numel() * t.element_size() for t in model.state_dict().values()) / 2 ** 20
        model.save_pretrained(Path(tmp) / "hf")
        del model
        imports = peak_rss_mib([sys.executable, "-c", "import megatron_prior.convert, megatron_prior.parallel"])
        convert = peak_rss_mib([sys.executable, str(TOOLS / "convert_hf_to_megatron.py"), "--hf-dir",
                                str(Path(tmp) / "hf"), "--output", str(Path(tmp) / "ckpt")])
    print(f"model {size:.0f} MiB ({args.dtype}), largest tensor {largest:.0f} MiB; peak RSS: imports alone "
          f"{imports:.0f} MiB, conversion {convert:.0f} MiB; conversion - imports = {convert - imports:.0f} MiB "
          f"= {(convert - imports) / size:.2f} x the model")


if __name__ == "__main__":
    main()
