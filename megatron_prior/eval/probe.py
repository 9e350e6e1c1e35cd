"""The hallucination probe (in the manner of POPE) for pre-trained, not instruction-tuned,
models: does the model give the held-out caption a higher likelihood than the same caption
naming an object the image does not contain?

An item counts 1 when the positive caption scores higher, 0 when lower and 0.5 on an exact
tie, so a model that ignores the image (the two captions then differ only in text the model
scores without seeing the picture) sits near 0.5, and one that cannot tell them apart at all
scores exactly 0.5.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
from tqdm import tqdm

from megatron_prior.data.records import BadRecord, iter_lines, parse_line, text_field

PROBE_SPLITS: tuple[str, ...] = ("random", "popular", "adversarial")
ScoreFn = Callable[[str, str], float]


@dataclass(frozen=True)
class ProbeItem:
    id: str
    image: str
    positive: str
    negative: str
    split: str


def load_probe_items(path: str | os.PathLike) -> list[ProbeItem]:
    """Read ``probe.jsonl``; relative image paths are resolved against the file's directory.
    A bad line raises ``BadRecord`` (a ValueError reading ``file:line: reason``)."""
    path = Path(path)
    items = []
    for line, raw in iter_lines(str(path)):
        rec = parse_line(str(path), line, raw)
        fields = [text_field(rec, k) for k in ("id", "image", "positive", "negative", "split")]
        id_, image, positive, negative, split = fields
        if split not in PROBE_SPLITS:
            raise BadRecord(str(path), line, f"split {split!r} is not one of {', '.join(PROBE_SPLITS)}")
        if positive == negative:
            raise BadRecord(str(path), line, f"item {id_} has identical positive and negative captions")
        image = image if os.path.isabs(image) else str(path.parent / image)
        items.append(ProbeItem(id_, image, positive, negative, split))
    if not items:
        raise ValueError(f"{path}: no probe items")
    return items


def outcomes(positive_scores: Sequence[float], negative_scores: Sequence[float],
             ids: Sequence[str] | None = None) -> np.ndarray:
    """1.0 where the positive caption scores higher, 0.0 where lower, 0.5 on an exact tie.
    NaN scores are refused (a NaN compares false both ways and would read as a loss)."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if pos.shape != neg.shape or pos.ndim != 1:
        raise ValueError(f"positive and negative scores must be 1-D of one length, got {pos.shape} and {neg.shape}")
    bad = np.flatnonzero(np.isnan(pos) | np.isnan(neg))
    if bad.size:
        where = ids[bad[0]] if ids is not None else f"index {bad[0]}"
        raise ValueError(f"probe score is NaN for item {where} ({bad.size} items in all)")
    return np.where(pos > neg, 1.0, np.where(pos < neg, 0.0, 0.5))


def accuracy_by_split(item_outcomes: np.ndarray, splits: Sequence[str]) -> dict[str, float]:
    """``{split: mean outcome}`` for each split present (in PROBE_SPLITS order), plus "all"."""
    item_outcomes = np.asarray(item_outcomes, dtype=np.float64)
    splits = np.asarray(splits)
    if item_outcomes.shape != splits.shape or item_outcomes.size == 0:
        raise ValueError(f"need one split per outcome and at least one item, got {item_outcomes.shape} "
                         f"outcomes and {splits.shape} splits")
    result = {s: float(item_outcomes[splits == s].mean()) for s in PROBE_SPLITS if (splits == s).any()}
    result["all"] = float(item_outcomes.mean())
    return result


def probe_accuracy(score_fn: ScoreFn, items: Iterable[ProbeItem], progress: bool = False) -> dict[str, float]:
    """Accuracy per split and overall; ``score_fn(image_path, caption)`` returns the caption's
    total log-likelihood given the image."""
    items = list(items)
    pos, neg = [], []
    for item in tqdm(items, desc="probe", unit="item", disable=not progress):
        pos.append(score_fn(item.image, item.positive))
        neg.append(score_fn(item.image, item.negative))
    return accuracy_by_split(outcomes(pos, neg, [i.id for i in items]), [i.split for i in items])
