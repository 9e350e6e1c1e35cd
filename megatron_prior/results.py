"""A finished run as its files say: the trainer's ``summary.json`` and, once evaluated,
``megatron_prior.eval.run``'s ``eval.json``, read into one ``RunResult``; and ``fmt``, the one
number formatter of the reports. The demo report (``megatron_prior.eval.report``) and the sweep
collector (``megatron_prior.sweeps.collect``) both read runs through here.

Keys follow ``megatron_prior.training.metrics``: ``train_<key>`` and ``eval_<key>`` in
summary.json for ``weighted_ce``, ``ce`` and ``ce_<kind>`` (training window, validation split),
``heldout_ce`` / ``heldout_ce_<kind>`` / ``probe_accuracy*`` in eval.json.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

SUMMARY = "summary.json"
EVAL = "eval.json"
METRICS = "metrics.jsonl"


class ResultError(ValueError):
    """A run's output files are missing fields or hold values that cannot be right."""


@dataclass
class RunResult:
    """One finished training run.

    ``validation`` and ``train`` hold summary.json's ``eval_<key>`` and ``train_<key>`` losses by
    key (``ce``, ``weighted_ce``, ``ce_<kind>``); ``heldout`` holds eval.json's numbers
    (``heldout_ce``, ``heldout_ce_<kind>``, ``probe_accuracy``, ...), empty before evaluation.
    ``checkpoints`` holds ``{"iteration": N, "metrics": {...}}`` for each evaluated checkpoint in
    training order when eval.json lists them (``eval.run --all-checkpoints``), the last one's
    metrics equal to ``heldout``; empty otherwise. ``noise_rate`` is the share of training captions with a
    deliberately wrong word (the data's, 0 for clean captions). ``size`` and ``budget`` place the
    run in a sweep's grid when it comes from one."""

    name: str
    arch: str
    loss: str
    seed: int
    prior_alpha: Optional[float]
    iterations: int
    parameters: int
    flops: float
    loss_tokens: int                 # tokens that carried loss: the D of the scaling fits
    # The rest of the positions trained on (training.metrics): None where the run did not count
    # them (resumed from a checkpoint that predates the count; masked: a summary from before it).
    image_positions: Optional[int] = 0
    padding_positions: Optional[int] = 0
    masked_positions: Optional[int] = None
    wall_time_s: Optional[float] = None
    train: dict[str, float] = field(default_factory=dict)
    validation: dict[str, float] = field(default_factory=dict)
    heldout: dict[str, float] = field(default_factory=dict)
    checkpoints: list[dict] = field(default_factory=list)
    noise_rate: float = 0.0
    run_dir: Optional[Path] = None
    metrics_jsonl: Optional[Path] = None
    size: Optional[str] = None
    budget: Optional[int] = None

    @property
    def variant(self) -> str:
        """The loss as the reports name it: ``NTP``, ``PRIOR α=0.5``."""
        return variant(self.loss, self.prior_alpha)

    def metric(self, key: str) -> float:
        """A validation loss of summary.json by key (``ce``: every caption token; ``ce_<kind>``)."""
        value = self.validation.get(key)
        if value is None:
            have = ", ".join(sorted(k for k, v in self.validation.items() if v is not None)) or "none"
            raise ResultError(f"run {self.name}: its {SUMMARY} has no eval_{key} (it has eval_ for: {have})")
        return value

    def to_json(self) -> dict:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        for key in ("run_dir", "metrics_jsonl"):
            out[key] = None if out[key] is None else str(out[key])
        return out


def variant(loss: str, prior_alpha: Optional[float]) -> str:
    return loss.upper() if prior_alpha is None else f"{loss.upper()} α={prior_alpha:g}"


def fmt(value: Any, digits: int = 3, sd: Optional[float] = None) -> str:
    """A number for a report table: ``-`` for None, ``mean ± sd`` when ``sd`` is given, fixed
    point with ``digits`` decimals, or ``digits`` significant digits where fixed point would
    be too long (|value| >= 1e5) or round a non-zero value to zero."""
    if value is None:
        return "-"
    if isinstance(value, bool) or not isinstance(value, float):
        return str(value)
    if value and (abs(value) >= 1e5 or abs(value) < 0.5 * 10 ** -digits):
        text = f"{value:.{digits}g}"
    else:
        text = f"{value:.{digits}f}"
    return text if sd is None else f"{text} ± {fmt(sd, digits)}"


def load_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ResultError(f"{path}: unreadable: {err}") from err
    if not isinstance(obj, dict):
        raise ResultError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def number(obj: dict, key: str, path: Path, kind: type = float, optional: bool = False, hint: str = ""):
    """``obj[key]`` as a finite ``kind``; None for a missing or null optional value."""
    value = obj.get(key)
    if value is None:
        if optional:
            return None
        raise ResultError(f"{path}: '{key}' is missing or null{hint}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()) or not math.isfinite(value):
        raise ResultError(f"{path}: '{key}' must be a finite {kind.__name__}, got {value!r}")
    return kind(value)


def _losses(summary: dict, prefix: str, path: Path) -> dict[str, Optional[float]]:
    """summary.json's ``<prefix><key>`` losses by key (null where no token of a kind was seen)."""
    return {k[len(prefix):]: number(summary, k, path, optional=True) for k in summary
            if k.startswith(prefix) and (k[len(prefix):] in ("ce", "weighted_ce") or k[len(prefix):].startswith("ce_"))}


def read_run(run_dir: str | Path, name: Optional[str] = None) -> RunResult:
    """The run whose ``summary.json`` (required) and ``eval.json`` (when present) are in
    ``run_dir``; ``name`` defaults to the directory's name."""
    run_dir = Path(run_dir)
    path = run_dir / SUMMARY
    s = load_json(path)
    for key in ("model", "loss"):
        if not isinstance(s.get(key), str):
            raise ResultError(f"{path}: '{key}' must be a string, got {s.get(key)!r}")
    loss_tokens = number(s, "loss_tokens", path, int,
                         hint=" (written by a trainer that counted positions, not loss tokens: rerun the run)")
    if loss_tokens <= 0:
        raise ResultError(f"{path}: 'loss_tokens' must be positive, got {loss_tokens}")
    result = RunResult(
        name=name or run_dir.name, arch=s["model"], loss=s["loss"], seed=number(s, "seed", path, int),
        prior_alpha=number(s, "prior_alpha", path) if s["loss"] == "prior" else None,
        iterations=number(s, "iterations", path, int), parameters=number(s, "parameters", path, int),
        flops=number(s, "flops", path), loss_tokens=loss_tokens,
        image_positions=number(s, "image_positions", path, int, optional=True),
        padding_positions=number(s, "padding_positions", path, int, optional=True),
        masked_positions=number(s, "masked_positions", path, int, optional=True),
        wall_time_s=number(s, "wall_time_s", path, optional=True),
        train=_losses(s, "train_", path), validation=_losses(s, "eval_", path), run_dir=run_dir,
        metrics_jsonl=run_dir / METRICS if (run_dir / METRICS).exists() else None)
    eval_path = run_dir / EVAL
    if eval_path.exists():
        ev = load_json(eval_path)
        result.heldout = _heldout_metrics(ev, eval_path)
        result.checkpoints = _checkpoints(ev, eval_path, result.heldout)
    return result


def _heldout_metrics(ev: dict, path: Path) -> dict[str, float]:
    return {k: number(ev, k, path) for k, v in ev.items()
            if k.startswith(("heldout_", "probe_accuracy")) and v is not None}


def _checkpoints(ev: dict, path: Path, final: dict[str, float]) -> list[dict]:
    """eval.json's ``checkpoints`` (ascending iterations, the last one the top-level numbers);
    none when it has no such list (an evaluation of one checkpoint, or a sweep's own command)."""
    entries = ev.get("checkpoints")
    if entries is None:
        return []
    if not isinstance(entries, list) or not entries or not all(isinstance(e, dict) for e in entries):
        raise ResultError(f"{path}: 'checkpoints' must be a non-empty list of objects")
    out = []
    for k, entry in enumerate(entries):
        where = f"{path} (checkpoints[{k}])"
        if not isinstance(entry.get("metrics"), dict):
            raise ResultError(f"{where}: 'metrics' must be an object")
        out.append({"iteration": number(entry, "iteration", Path(where), int),
                    "metrics": _heldout_metrics(entry["metrics"], Path(where))})
    its = [e["iteration"] for e in out]
    if its != sorted(set(its)):
        raise ResultError(f"{path}: checkpoint iterations must ascend without repeats, got {its}")
    if out[-1]["iteration"] != ev.get("iteration") or out[-1]["metrics"] != final:
        raise ResultError(f"{path}: the last of 'checkpoints' must be the evaluated checkpoint (iteration "
                          f"{ev.get('iteration')!r}) with the top-level numbers")
    return out
