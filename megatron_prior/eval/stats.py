"""Mean and spread over seeds, and paired differences between two losses run on one seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass(frozen=True)
class Spread:
    """Mean and sample standard deviation (ddof=1; None for a single value) of ``n`` values."""

    mean: float
    sd: float | None
    n: int

    def to_json(self) -> dict:
        return {"mean": self.mean, "sd": self.sd, "n": self.n}


def spread(values: Sequence[float]) -> Spread:
    """Mean and sample sd; refuses an empty list and non-finite values."""
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if arr.size == 0:
        raise ValueError("spread of no values")
    if not np.isfinite(arr).all():
        raise ValueError(f"spread of non-finite values: {arr.tolist()}")
    sd = float(arr.std(ddof=1)) if arr.size > 1 else None
    return Spread(float(arr.mean()), sd, int(arr.size))


def paired_differences(a: dict[int, float], b: dict[int, float]) -> tuple[list[int], list[float]]:
    """``a[seed] - b[seed]`` over the seeds both hold (sorted), e.g. PRIOR minus NTP: pairing
    by seed removes the variance the two runs share (same init and data order)."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if any(not math.isfinite(d) for d in diffs):
        raise ValueError(f"non-finite paired difference over seeds {seeds}")
    return seeds, diffs
