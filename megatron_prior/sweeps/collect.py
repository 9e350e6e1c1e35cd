"""Read each finished run's ``summary.json`` (and ``eval.json``) into one table.

Every value is checked against the grid (loss, seed, iterations), because a summary copied
into the wrong directory, or a run that stopped early, would otherwise bend the fit quietly.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from .rundirs import EVAL, SUMMARY, run_dir
from .spec import Run, SweepSpec


class CollectError(ValueError):
    """A run's output files are missing fields or disagree with the sweep grid."""


@dataclass
class RunResult:
    run: str
    size: str
    loss: str
    seed: int
    budget: int
    tokens: int                  # summary.json tokens_seen: the D of the fits
    iterations: int
    parameters: int
    flops: float
    eval_loss: float
    train_loss: Optional[float]
    wall_time_s: Optional[float]
    eval_losses_by_kind: dict[str, float] = field(default_factory=dict)
    probe_accuracy: Optional[float] = None
    eval: Optional[dict] = None  # eval.json as written by the evaluation command

    def as_dict(self) -> dict:
        return asdict(self)

    def metric(self, name: str) -> float:
        """``eval_loss`` (every caption token), or the held-out CE of one token kind."""
        if name == "eval_loss":
            return self.eval_loss
        try:
            return self.eval_losses_by_kind[name]
        except KeyError:
            raise CollectError(f"run {self.run}: no held-out loss for token kind {name!r} (its summary.json "
                               f"eval_losses_by_kind has: {', '.join(sorted(self.eval_losses_by_kind)) or 'none'})"
                               ) from None


def _load_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise CollectError(f"{path}: unreadable: {err}") from err
    if not isinstance(obj, dict):
        raise CollectError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _number(obj: dict, key: str, path: Path, kind=float, optional: bool = False):
    value = obj.get(key)
    if value is None and optional:
        return None
    if value is None:
        hint = (" (the sweep needs a held-out loss: give the trainer --eval-iters > 0 and "
                "validation data in --split)" if key == "eval_loss" else "")
        raise CollectError(f"{path}: '{key}' is missing or null{hint}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
            kind is int and not float(value).is_integer()) or not math.isfinite(value):
        raise CollectError(f"{path}: '{key}' must be a finite {kind.__name__}, got {value!r}")
    return kind(value)


def read_run(spec: SweepSpec, run: Run, rdir: Path) -> RunResult:
    """The result of one finished run (its summary.json must exist)."""
    path = rdir / SUMMARY
    s = _load_json(path)
    for key, expected in (("loss", run.loss), ("seed", run.seed), ("iterations", run.train_iters)):
        if s.get(key) != expected:
            raise CollectError(f"{path}: '{key}' is {s.get(key)!r}, the sweep grid says {expected!r} "
                               f"for run {run.name}")
    by_kind = s.get("eval_losses_by_kind") or {}
    if not isinstance(by_kind, dict):
        raise CollectError(f"{path}: 'eval_losses_by_kind' must be an object, got {by_kind!r}")
    result = RunResult(
        run=run.name, size=run.size.name, loss=run.loss, seed=run.seed, budget=run.budget,
        tokens=_number(s, "tokens_seen", path, int), iterations=run.train_iters,
        parameters=_number(s, "parameters", path, int), flops=_number(s, "flops", path),
        eval_loss=_number(s, "eval_loss", path),
        train_loss=_number(s, "train_loss", path, optional=True),
        wall_time_s=_number(s, "wall_time_s", path, optional=True),
        eval_losses_by_kind={k: _number(by_kind, k, path) for k in by_kind})
    if result.tokens <= 0:
        raise CollectError(f"{path}: 'tokens_seen' must be positive, got {result.tokens}")
    eval_path = rdir / EVAL
    if eval_path.exists():
        result.eval = _load_json(eval_path)
        result.probe_accuracy = _number(result.eval, "probe_accuracy", eval_path, optional=True)
    return result


def collect(spec: SweepSpec, output_dir: Path) -> tuple[list[RunResult], list[Run]]:
    """(results of the finished runs, runs not finished yet), in grid order."""
    done, missing = [], []
    for run in spec.runs():
        rdir = run_dir(output_dir, run)
        if (rdir / SUMMARY).exists():
            done.append(read_run(spec, run, rdir))
        else:
            missing.append(run)
    params: dict[str, tuple[int, str]] = {}
    for r in done:
        first = params.setdefault(r.size, (r.parameters, r.run))
        if first[0] != r.parameters:
            raise CollectError(f"size {r.size!r}: run {first[1]} reports {first[0]} parameters, "
                               f"run {r.run} {r.parameters}; a size must be one architecture")
    return done, missing


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) >= 1e5 or abs(value) < 1e-3 else f"{value:.{digits}f}"
    return str(value)


def results_markdown(results: list[RunResult]) -> str:
    """One row per run: held-out losses (overall and by token kind), probe accuracy, FLOPs."""
    kinds = sorted({k for r in results for k in r.eval_losses_by_kind})
    head = (["run", "size", "params", "loss", "seed", "tokens", "eval loss"]
            + [f"eval {k}" for k in kinds] + ["probe acc", "FLOPs", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = ([r.run, r.size, str(r.parameters), r.loss, str(r.seed), str(r.tokens), _fmt(r.eval_loss)]
               + [_fmt(r.eval_losses_by_kind.get(k)) for k in kinds]
               + [_fmt(r.probe_accuracy, 3), f"{r.flops:.3g}", _fmt(r.wall_time_s, 1)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
