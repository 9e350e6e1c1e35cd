"""A grid of demo pipelines along one setting (an ``Axis``): the pipeline once per level, each
level in its own folder ``{output-dir}/{axis}_{tag}/`` and resumable like the demo, every
weighting compared with NTP on paired seeds at each level, and ``{axis}_grid.{json,md,png}``
(held-out grounded CE and probe accuracy against the level) in ``--output-dir``.

The axes live in their own modules, each a command: ``noise_grid`` (share of wrong training
captions) and ``reference_grid`` (the size of PRIOR's reference). Arguments after ``--`` go to
``megatron_prior.demo.pipeline`` at every level; the flags the axis sets per level are refused
there, and every level's settings are checked before the first one trains.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np

from megatron_prior.demo import pipeline
from megatron_prior.demo.report import load_runs
from megatron_prior.eval.report import Series, headline_comparison, plot_grid
from megatron_prior.files import atomic_write_json, atomic_write_text
from megatron_prior.models.arch import ARCHS
from megatron_prior.results import RunResult, fmt, variant

GROUNDED = "heldout_ce_grounded"


@dataclass(frozen=True)
class Axis:
    """One setting a grid varies. ``describe(value, level_dir, settings)`` is the level's entry in
    ``{name}_grid.json`` once its pipeline has run; ``x`` and ``label`` read that entry (the
    plot's abscissa and the table's first column)."""

    name: str                                   # files {name}_grid.*, level folders {name}_{tag}
    values_flag: str                            # the grid's flag listing the levels
    values_help: str
    default_values: tuple
    parse: Callable[[str], Any]                 # argparse type of one level
    tag: Callable[[Any], str]                   # the level's folder suffix
    pipeline_args: Callable[[Any], list[str]]   # what the grid passes the pipeline at this level
    sets: tuple[str, ...]                       # pipeline flags those are (refused after --)
    describe: Callable[[Any, Path, "pipeline.DemoSettings"], dict]
    x: Callable[[dict], float]
    label: Callable[[dict], str]
    column: str                                 # the table's first column header
    title: str
    xlabel: str
    log_x: bool = False
    # Raises ValueError for levels the grid refuses (the pipeline's own checks run after it).
    check: Optional[Callable[[Sequence[Any]], None]] = None
    metavar: str = "VALUE"
    show: Callable[[Any], str] = str            # a level as the command line writes it

    def level_dir(self, output_dir: Path, value: Any) -> Path:
        return output_dir / f"{self.name}_{self.tag(value)}"


# What an axis adds to the grid's report once every level has run: JSON entries and Markdown lines.
Summary = Callable[[list[dict], float], tuple[dict, list[str]]]


def comparisons(runs: Sequence[RunResult], headline_alpha: float, other_losses: Sequence[str]) -> list[dict]:
    """Every weighting run against NTP on paired seeds (``headline_comparison``'s rows): PRIOR at
    the headline alpha (and alpha 1 beside it), then each other loss."""
    rows = headline_comparison(runs, {"loss": "prior", "prior_alpha": headline_alpha})
    for loss in other_losses:
        rows += headline_comparison(runs, {"loss": loss, "prior_alpha": None})
    return rows


def gain(rows: list[dict], arch: str, loss: str, alpha: Optional[float], metric: str = GROUNDED) -> Optional[float]:
    """The loss's improvement over NTP at the final checkpoint, mean over paired seeds: NTP's minus
    the loss's CE, or the loss's minus NTP's accuracy; None where the grid has no such run."""
    for r in rows:
        if (r["arch"], r["loss"], r["prior_alpha"], r["at"]) == (arch, loss, alpha, "final"):
            d = r["metrics"][metric]["difference"]["mean"]
            return -d if metric.startswith("heldout_ce") else d
    return None


def markdown(axis: Axis, levels: list[dict], extra: list[str], command: str, wall_s: float) -> str:
    lines = [f"# {axis.title}: each weighting against NTP", "",
             f"`{command}` (this invocation: {wall_s / 60:.1f} min; levels already done are skipped). Differences "
             "are the weighting's minus NTP's on the same seed (mean ± sd over seeds, then each seed); negative CE "
             "is better.",
             "", f"| {axis.column} | arch | loss | at | CE grounded NTP → loss | Δ CE grounded (per seed) | Δ % "
             "| Δ CE template | probe NTP → loss |", "|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        for r in lv["comparisons"]:
            g, t, p = (r["metrics"][m] for m in (GROUNDED, "heldout_ce_template", "probe_accuracy"))
            d = g["difference"]
            lines.append(f"| {axis.label(lv)} | {ARCHS[r['arch']].display_name} | "
                         f"{variant(r['loss'], r['prior_alpha'])} | {'final' if r['at'] == 'final' else 'mean of ckpts'} | "
                         f"{fmt(g['ntp'])} → {fmt(g[r['loss']])} | {fmt(d['mean'], sd=d['sd'])} "
                         f"({', '.join(f'{x:+.3f}' for x in d['per_seed'])}) | {g['percent_change']:+.1f} | "
                         f"{t['difference']['mean']:+.3f} | {fmt(p['ntp'])} → {fmt(p[r['loss']])} |")
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def plot(axis: Axis, levels: Sequence[tuple[float, Sequence[RunResult]]], path: Path) -> Path:
    """Held-out grounded CE and probe accuracy at the final checkpoint against the level's x,
    each weighting in its colour, a thin line per seed."""
    runs = [r for _, rs in levels for r in rs]

    def series(arch: str, metric: str) -> Series:
        points: dict = defaultdict(lambda: defaultdict(list))
        for x, rs in levels:
            for r in rs:
                if r.arch == arch:
                    points[(r.loss, r.prior_alpha)][r.seed].append((x, r.heldout[metric]))
        out: Series = defaultdict(list)
        for v, by_seed in points.items():
            for pts in by_seed.values():
                out[v].append(tuple(map(np.asarray, zip(*sorted(pts)))))
        return out

    return plot_grid(runs, {GROUNDED: "held-out CE, grounded tokens", "probe_accuracy": "probe accuracy"}, series,
                     path, f"{axis.title}: final checkpoint (thin: one seed)", log_y=False, marker="o",
                     xlabel=axis.xlabel, log_x=axis.log_x)


def build_parser(axis: Axis, prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description + " Arguments after -- go to "
                                "megatron_prior.demo.pipeline at every level.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default=f"demo_output/{axis.name}_grid",
                   help=f"grid folder: one pipeline folder per level ({axis.name}_...) and the grid's report")
    # SUPPRESS: the help names the default levels as they are typed, not as parsed tuples.
    p.add_argument(axis.values_flag, type=axis.parse, nargs="+", default=argparse.SUPPRESS, dest="values",
                   metavar=axis.metavar,
                   help=f"{axis.values_help} (default: {' '.join(map(axis.show, axis.default_values))})")
    return p


def main(axis: Axis, argv: Sequence[str], prog: str, description: str, summary: Optional[Summary] = None) -> dict:
    """Run the grid ``argv`` asks for (the command line of ``prog``); returns what it writes to
    ``{axis.name}_grid.json``."""
    argv = list(argv)
    ours, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser(axis, prog, description).parse_args(ours)
    for flag in (*axis.sets, "--output-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in passed):
            raise SystemExit(f"{prog}: {flag} is set per level by the grid; give {axis.values_flag} / --output-dir "
                             f"before --")
    out, values = Path(args.output_dir), list(getattr(args, "values", axis.default_values))
    try:
        if len(set(values)) != len(values):
            raise ValueError(f"{axis.values_flag} repeats a level: {values}")
        if axis.check:
            axis.check(values)
        if len({axis.level_dir(out, v) for v in values}) != len(values):
            raise ValueError(f"{axis.values_flag} {values}: two levels would share a folder "
                             f"({', '.join(axis.level_dir(out, v).name for v in values)})")
        settings = {v: pipeline.settings_from_args(pipeline.build_parser().parse_args(
            [*passed, *axis.pipeline_args(v)])) for v in values}
    except ValueError as err:
        raise SystemExit(f"{prog}: {err}") from None
    command = f"python -m {prog} " + " ".join(map(shlex.quote, argv))
    start = time.perf_counter()
    levels, plotted = [], []
    for i, value in enumerate(values):
        where = axis.level_dir(out, value)
        print(f"[{axis.name} grid] level {i + 1}/{len(values)}: {where.name} into {where}/", flush=True)
        pipeline.main([*passed, *axis.pipeline_args(value), "--output-dir", str(where)])
        s = settings[value]
        runs = load_runs(where, pipeline.run_specs(s))
        level = {**axis.describe(value, where, s), "output_dir": str(where),
                 "comparisons": comparisons(runs, s.headline_alpha, s.other_losses)}
        levels.append(level)
        plotted.append((axis.x(level), runs))
    wall = time.perf_counter() - start
    headline_alpha = settings[values[0]].headline_alpha
    extra_json, extra_md = summary(levels, headline_alpha) if summary else ({}, [])
    result = {"command": command, "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "wall_time_s": wall, "pipeline_args": passed, "headline_alpha": headline_alpha,
              "levels": levels, **extra_json}
    text = markdown(axis, levels, extra_md, command, wall)
    atomic_write_json(out / f"{axis.name}_grid.json", result)
    atomic_write_text(out / f"{axis.name}_grid.md", text)
    plot(axis, plotted, out / f"{axis.name}_grid.png")
    print(text)
    return result
