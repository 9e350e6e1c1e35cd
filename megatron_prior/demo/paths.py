"""Where the demo puts things inside its output folder (relative paths: every command of the
pipeline runs from there). Below both the pipeline and its report, which read the same files."""

from __future__ import annotations

from pathlib import Path

DOCUMENT = "caption_document"  # preprocess_with_weights names outputs {prefix}_{json key}_document


class DemoPaths:
    data = Path("data")
    tokenizer = data / "tokenizer.model"
    unigram_prefix = Path("work/unigram/train")
    reference = Path("runs/reference")
    scoring_reference = Path("runs/scoring_reference")  # PRIOR's reference where it is not `reference`
    vit_clip = Path("runs/vit_clip")
    image_scorer = Path("runs/image_scorer")

    @staticmethod
    def prefix(split: str) -> Path:
        return DemoPaths.data / split

    @staticmethod
    def documents(prefix: Path) -> Path:
        return Path(f"{prefix}_{DOCUMENT}")

    @staticmethod
    def preprocessed(prefix: Path, images: bool = True) -> list[Path]:
        doc = str(DemoPaths.documents(prefix))
        exts = [".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".logprobs.json", ".kinds.bin", ".kinds.idx"]
        return [Path(doc + e) for e in exts + ([".images"] if images else [])]

    @staticmethod
    def run_dir(name: str) -> Path:
        """The directory of the LVLM run named ``name`` (``RunSpec.name``)."""
        return Path("runs") / name
