"""Read each finished run's ``summary.json`` (and ``eval.json``) into one table.

Every value is checked against the grid (loss, seed, iterations), because a summary copied
into the wrong directory, or a run that stopped early, would otherwise bend the fit quietly.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from megatron_prior.results import ResultError, RunResult, fmt, read_run

from .rundirs import SUMMARY, run_dir
from .spec import Run, SweepSpec

# A run's files missing fields or disagreeing with the sweep grid.
CollectError = ResultError


def read_grid_run(spec: SweepSpec, run: Run, rdir: Path) -> RunResult:
    """The result of one finished run (its summary.json must exist), placed in the grid."""
    path = rdir / SUMMARY
    result = read_run(rdir, name=run.name)
    for key, got, expected in (("model", result.arch, spec.model), ("loss", result.loss, run.loss),
                               ("seed", result.seed, run.seed), ("iterations", result.iterations, run.train_iters)):
        if got != expected:
            raise CollectError(f"{path}: '{key}' is {got!r}, the sweep grid says {expected!r} for run {run.name}")
    if result.validation.get("ce") is None:
        raise CollectError(f"{path}: 'eval_ce' is missing or null (the sweep needs a held-out loss: give the "
                           "trainer --eval-iters > 0 and validation data in --split)")
    return dataclasses.replace(result, size=run.size.name, budget=run.budget)


def collect(spec: SweepSpec, output_dir: Path) -> tuple[list[RunResult], list[Run]]:
    """(results of the finished runs, runs not finished yet), in grid order."""
    done, missing = [], []
    for run in spec.runs():
        rdir = run_dir(output_dir, run)
        if (rdir / SUMMARY).exists():
            done.append(read_grid_run(spec, run, rdir))
        else:
            missing.append(run)
    params: dict[str, tuple[int, str]] = {}
    for r in done:
        first = params.setdefault(r.size, (r.parameters, r.name))
        if first[0] != r.parameters:
            raise CollectError(f"size {r.size!r}: run {first[1]} reports {first[0]} parameters, "
                               f"run {r.name} {r.parameters}; a size must be one architecture")
    return done, missing


def results_markdown(results: list[RunResult]) -> str:
    """One row per run: held-out losses (overall and by token kind), probe accuracy, what it
    trained on (loss tokens, masked, image and padding positions; ``-`` where not counted), FLOPs."""
    kinds = sorted({k for r in results for k, v in r.validation.items() if k.startswith("ce_") and v is not None})
    head = (["run", "size", "params", "loss", "seed", "loss tokens D", "masked", "image positions", "padding",
             "eval ce"] + [f"eval {k}" for k in kinds] + ["probe acc", "FLOPs", "wall s"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        row = ([r.name, r.size, str(r.parameters), r.loss, str(r.seed), str(r.loss_tokens), fmt(r.masked_positions),
                fmt(r.image_positions), fmt(r.padding_positions), fmt(r.metric("ce"), 4)]
               + [fmt(r.validation.get(k), 4) for k in kinds]
               + [fmt(r.heldout.get("probe_accuracy")), f"{r.flops:.3g}", fmt(r.wall_time_s, 1)])
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
