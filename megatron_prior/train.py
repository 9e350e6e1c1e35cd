"""``python -m megatron_prior.train``: train a reference LM, an H-LVLM or a U-LVLM.

Flags follow Megatron-LM (``--help`` lists them). Launch one process per device with
torchrun or srun; with neither, a single process runs (CPU with gloo when there is no GPU).
"""

from __future__ import annotations

import json
import logging
import sys
import warnings
from typing import Optional, Sequence

# megatron-core warns on import that Transformer Engine and Apex are missing; the CPU path and
# megatron-core's local layer specs use neither (FP8 checks for TE itself).
warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) (and Apex )?(is|are) not installed.*")
# torch's CUDA build warns, when megatron-core imports torch.utils.cpp_extension, that no CUDA
# runtime is found; the trainer builds no extension, and on a CPU machine the line is only noise
# in front of the one-line errors the trainer prints.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

from megatron_prior.checkpoint import CheckpointError  # noqa: E402
from megatron_prior.data import FormatError  # noqa: E402
from megatron_prior.parallel import launch_info  # noqa: E402
from megatron_prior.training.arguments import parse_args  # noqa: E402
from megatron_prior.training.loop import run  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> Optional[dict]:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s] %(message)s", datefmt="%H:%M:%S")
    # megatron-core is chatty about optional accelerators it falls back from.
    logging.getLogger("megatron.core").setLevel(logging.ERROR)
    try:
        summary = run(args)
    except (CheckpointError, FormatError) as err:
        # A refused --load / --vit-load checkpoint, or --data-path files that do not match (another
        # tokenizer's, damaged), are bad input: one line, as a bad flag is.
        raise SystemExit(f"python -m megatron_prior.train: error: {err}") from None
    info = launch_info()
    if summary and info.rank == info.world_size - 1:  # the rank that wrote summary.json
        logging.getLogger("megatron_prior.train").info("summary: %s", json.dumps(
            {k: v for k, v in summary.items() if k != "model_config"}))
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
    sys.exit(0)
