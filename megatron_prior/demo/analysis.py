"""What the demo reads off its reference scores: how well they separate grounded from
template tokens (ROC AUC), the mean PRIOR multiplier per token kind, and held-out captions
with their multipliers for the report's picture.

Multipliers are computed as training computes them (``CaptionDataset``: every caption token
and the closing EOD are loss tokens, normalised per caption with
``WeightedIndexedDataset.document_scales``), so the picture shows the weights the runs used.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from megatron_prior.data import packing
from megatron_prior.data.kinds import KIND_IDS, KIND_NAMES
from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
from megatron_prior.eval.auc import kind_separation_auc
from megatron_prior.eval.report import CaptionWeights


def token_multipliers(dataset: WeightedIndexedDataset, alpha: float, eod: int, pad: int) -> np.ndarray:
    """PRIOR's multiplier ``m`` of every token of ``dataset`` (flat, in file order)."""
    scales = dataset.document_scales(alpha, eod, False, pad)
    lengths = np.asarray(dataset.sequence_lengths, dtype=np.int64)
    per_token_scale = np.repeat(scales, lengths)
    w = packing.token_weights(np.asarray(dataset.logprob_array), alpha)
    # A caption whose weights sum to 0 has a negative scale: every multiplier is 1.
    m = np.where(per_token_scale < 0, 1.0, per_token_scale * w)
    tokens = np.asarray(dataset.token_array)
    return np.where(tokens == pad, 0.0, m)


def reference_separation(data_prefix: str, tokenizer, alphas: Sequence[float]) -> dict:
    """AUCs of the reference weight ``1 - p_ref`` (grounded vs template: the headline; grounded
    vs unrelated), mean ``p_ref`` and the reference's mean NLL per kind and over all scored tokens
    (how well it models the captions), and mean multiplier per kind for each alpha."""
    dataset = WeightedIndexedDataset(data_prefix, tokenizer_fingerprint=tokenizer.fingerprint)
    if not dataset.has_kinds:
        raise ValueError(f"{data_prefix}: no token kinds (.kinds.bin/.idx); preprocess with --kinds-key")
    kinds = np.asarray(dataset.kind_array, dtype=np.int64)
    logp = np.asarray(dataset.logprob_array, dtype=np.float64)
    p = np.exp(logp)
    weight = 1.0 - p
    present = [k for k in KIND_NAMES if (kinds == KIND_IDS[k]).any()]
    result = {
        "auc_grounded_vs_template": kind_separation_auc(weight, kinds, positive="grounded", negative="template"),
        "mean_reference_probability": {k: float(p[kinds == KIND_IDS[k]].mean()) for k in present},
        "mean_nll": {k: float(-logp[kinds == KIND_IDS[k]].mean()) for k in present},
        "mean_nll_all": float(-logp.mean()),
        "tokens": {k: int((kinds == KIND_IDS[k]).sum()) for k in present},
        "mean_multiplier": {},
    }
    if "unrelated" in present:
        result["auc_grounded_vs_unrelated"] = kind_separation_auc(weight, kinds, positive="grounded",
                                                                  negative="unrelated")
    for alpha in alphas:
        m = token_multipliers(dataset, alpha, tokenizer.eod, tokenizer.pad)
        result["mean_multiplier"][f"{alpha:g}"] = {k: float(m[kinds == KIND_IDS[k]].mean()) for k in present}
    return result


def caption_weights(data_prefix: str, jsonl: str | Path, tokenizer, alpha: float, count: int = 6) -> list[CaptionWeights]:
    """Held-out captions with each token's multiplier and kind, and the image: half of them
    with an unrelated tag where the data has some. Refuses a JSONL that does not match the
    token file (another tokenizer or another file)."""
    jsonl = Path(jsonl)
    records = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines() if line.strip()]
    dataset = WeightedIndexedDataset(data_prefix, tokenizer_fingerprint=tokenizer.fingerprint)
    if len(records) != len(dataset):
        raise ValueError(f"{jsonl} holds {len(records)} records but {data_prefix} {len(dataset)} documents")
    m = token_multipliers(dataset, alpha, tokenizer.eod, tokenizer.pad)
    offsets = dataset.sequence_offsets
    tagged = [i for i, r in enumerate(records) if any(s[2] == "unrelated" for s in r["kinds"])]
    plain = [i for i, r in enumerate(records) if i not in set(tagged)]
    chosen = sorted(tagged[:count // 2] + plain[:count - min(len(tagged), count // 2)])[:count]
    out = []
    for i in chosen:
        caption = records[i]["caption"]
        ids, starts = tokenizer.tokenize_with_offsets(caption)
        stored = np.asarray(dataset.token_array[offsets[i]:offsets[i + 1]])
        if list(stored) != list(ids) + [tokenizer.eod]:
            raise ValueError(f"{jsonl}: record {i} does not tokenize to document {i} of {data_prefix}")
        kinds = [KIND_NAMES[k] for k in np.asarray(dataset.kind_array[offsets[i]:offsets[i] + len(ids)])]
        weights = [float(w) for w in m[offsets[i]:offsets[i] + len(ids)]]
        image = records[i]["image"]
        image = image if Path(image).is_absolute() else str(jsonl.parent / image)
        out.append(CaptionWeights.from_offsets(caption, starts, weights, kinds, image))
    if not out:
        raise ValueError(f"{jsonl}: no captions to draw")
    if not all(math.isfinite(w) for c in out for w in c.weights):
        raise ValueError(f"{data_prefix}: non-finite multipliers")
    return out
