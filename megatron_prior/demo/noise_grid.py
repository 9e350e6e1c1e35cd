"""The caption-noise grid: the demo pipeline at several shares of wrong training captions, each
weighting against NTP at each level, and whether MI keeps PRIOR's clean-data gain under noise.

    python -m megatron_prior.demo.noise_grid --output-dir demo_output/noise_grid \\
        --noise-rates 0 0.15 0.3 -- --seed-offset 6 --archs hlvlm --other-losses mi rho1 cal

Everything after ``--`` goes to ``megatron_prior.demo.pipeline`` for every level; each level
runs into ``{output-dir}/noise_{percent}/`` (its own data, reference, encoder and scorer: the
noise is in the training captions they all read) and is resumable like the demo. The grid
writes ``noise_grid.json``, ``noise_grid.md`` and ``noise_grid.png`` (held-out grounded CE and
probe accuracy against the noise rate) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import datetime
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from megatron_prior.demo import pipeline
from megatron_prior.demo.report import load_runs
from megatron_prior.eval.report import Series, headline_comparison, plot_grid
from megatron_prior.files import atomic_write_json, atomic_write_text
from megatron_prior.models.arch import ARCHS
from megatron_prior.results import RunResult, fmt, variant

GROUNDED = "heldout_ce_grounded"
# The noisiest level's MI gain must keep this share of PRIOR's gain on clean captions.
MI_SHARE = 0.5


def level_dir(output_dir: Path, rate: float) -> Path:
    return output_dir / f"noise_{round(100 * rate):02d}"


def comparisons(runs: Sequence[RunResult], headline_alpha: float, other_losses: Sequence[str]) -> list[dict]:
    """Every weighting run against NTP on paired seeds (``headline_comparison``'s rows): PRIOR at
    the headline alpha (and alpha 1 beside it), then each other loss."""
    rows = headline_comparison(runs, {"loss": "prior", "prior_alpha": headline_alpha})
    for loss in other_losses:
        rows += headline_comparison(runs, {"loss": loss, "prior_alpha": None})
    return rows


def _gain(rows: list[dict], arch: str, loss: str, alpha: Optional[float]) -> Optional[float]:
    """NTP's minus the loss's held-out grounded CE at the final checkpoint, mean over paired seeds."""
    for r in rows:
        if (r["arch"], r["loss"], r["prior_alpha"], r["at"]) == (arch, loss, alpha, "final"):
            return -r["metrics"][GROUNDED]["difference"]["mean"]
    return None


def mi_target(levels: list[dict], headline_alpha: float) -> dict:
    """Per architecture: PRIOR's grounded-CE gain on clean captions and at the noisiest level,
    MI's gain at the noisiest level, and whether MI keeps MI_SHARE of PRIOR's clean gain."""
    clean = [lv for lv in levels if lv["noise_rate"] == 0]
    noisiest = max(levels, key=lambda lv: lv["noise_rate"])
    out = {}
    if not clean or noisiest["noise_rate"] == 0:
        return out
    for arch in ARCHS:
        prior_clean = _gain(clean[0]["comparisons"], arch, "prior", headline_alpha)
        prior_noisy = _gain(noisiest["comparisons"], arch, "prior", headline_alpha)
        mi_noisy = _gain(noisiest["comparisons"], arch, "mi", None)
        if None in (prior_clean, prior_noisy, mi_noisy):
            continue
        out[arch] = {"noise_rate": noisiest["noise_rate"], "prior_gain_clean": prior_clean,
                     "prior_gain_noisy": prior_noisy, "mi_gain_noisy": mi_noisy,
                     "prior_loses_its_gain": prior_noisy < prior_clean,
                     "met": prior_clean > 0 and mi_noisy >= MI_SHARE * prior_clean}
    return out


def _markdown(levels: list[dict], targets: dict, command: str, wall_s: float) -> str:
    lines = ["# Caption noise: each weighting against NTP", "",
             f"`{command}` ({wall_s / 60:.1f} min). Held-out data are clean at every level. Differences are the "
             "weighting's minus NTP's on the same seed (mean ± sd over seeds, then each seed); negative CE is better.",
             "", "| noise | arch | loss | at | CE grounded NTP → loss | Δ CE grounded (per seed) | Δ % | Δ CE template "
             "| probe NTP → loss |", "|---|---|---|---|---|---|---|---|---|"]
    for lv in levels:
        for r in lv["comparisons"]:
            g, t, p = (r["metrics"][m] for m in (GROUNDED, "heldout_ce_template", "probe_accuracy"))
            d = g["difference"]
            lines.append(f"| {100 * lv['noise_rate']:.0f} % | {ARCHS[r['arch']].display_name} | "
                         f"{variant(r['loss'], r['prior_alpha'])} | {'final' if r['at'] == 'final' else 'mean of ckpts'} | "
                         f"{fmt(g['ntp'])} → {fmt(g[r['loss']])} | {fmt(d['mean'], sd=d['sd'])} "
                         f"({', '.join(f'{x:+.3f}' for x in d['per_seed'])}) | {g['percent_change']:+.1f} | "
                         f"{t['difference']['mean']:+.3f} | {fmt(p['ntp'])} → {fmt(p[r['loss']])} |")
    lines += ["", f"## MI under noise: does it keep {MI_SHARE:.0%} of PRIOR's clean-data grounded-CE gain?", ""]
    if not targets:
        lines.append("Not measured: the grid needs a clean level, a noisy one, PRIOR and MI runs.")
    for arch, t in targets.items():
        lines.append(f"- {ARCHS[arch].display_name}: PRIOR's gain {t['prior_gain_clean']:+.3f} nats clean, "
                     f"{t['prior_gain_noisy']:+.3f} at {100 * t['noise_rate']:.0f} % noise; MI's "
                     f"{t['mi_gain_noisy']:+.3f} there: **{'met' if t['met'] else 'not met'}**"
                     + ("" if t["prior_gain_clean"] > 0 else " (PRIOR has no clean-data gain to keep)"))
    return "\n".join(lines) + "\n"


def plot_noise(runs: Sequence[RunResult], path: Path) -> Path:
    """Held-out grounded CE and probe accuracy at the final checkpoint against the noise rate,
    each weighting in its colour, a thin line per seed."""

    def series(arch: str, metric: str) -> Series:
        points: dict = defaultdict(lambda: defaultdict(list))
        for r in runs:
            if r.arch == arch:
                points[(r.loss, r.prior_alpha)][r.seed].append((r.noise_rate, r.heldout[metric]))
        out: Series = defaultdict(list)
        for v, by_seed in points.items():
            for pts in by_seed.values():
                out[v].append(tuple(map(np.asarray, zip(*sorted(pts)))))
        return out

    return plot_grid(runs, {GROUNDED: "held-out CE, grounded tokens", "probe_accuracy": "probe accuracy"}, series,
                     path, "Caption noise: final checkpoint (thin: one seed)", log_y=False, marker="o",
                     xlabel="share of training captions with a wrong word")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m megatron_prior.demo.noise_grid",
        description="Run the demo pipeline at several caption-noise rates and compare every weighting with NTP "
                    "at each. Arguments after -- go to megatron_prior.demo.pipeline for every level.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", default="demo_output/noise_grid",
                   help="grid folder: one pipeline folder per level (noise_00, noise_15, ...) and the grid's report")
    p.add_argument("--noise-rates", type=float, nargs="+", default=[0.0, 0.15, 0.3],
                   help="shares of training captions with one colour or shape word made wrong (0 = clean)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    ours, passed = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    args = build_parser().parse_args(ours)
    for flag in ("--noise-rate", "--output-dir"):
        if any(a == flag or a.startswith(flag + "=") for a in passed):
            raise SystemExit(f"megatron_prior.demo.noise_grid: {flag} is set per level by the grid; "
                             f"give --noise-rates / --output-dir before --")
    if len(set(args.noise_rates)) != len(args.noise_rates) or not all(0 <= r <= 1 for r in args.noise_rates):
        raise SystemExit(f"megatron_prior.demo.noise_grid: --noise-rates must be distinct and in [0, 1], "
                         f"got {args.noise_rates}")
    out = Path(args.output_dir)
    if len({level_dir(out, r) for r in args.noise_rates}) != len(args.noise_rates):
        raise SystemExit(f"megatron_prior.demo.noise_grid: --noise-rates {args.noise_rates} round to the same "
                         f"whole percent, which names each level's folder")
    try:  # every level's settings, checked before the first one trains
        settings = {r: pipeline.settings_from_args(pipeline.build_parser().parse_args(
            [*passed, "--noise-rate", str(r)])) for r in args.noise_rates}
    except ValueError as err:
        raise SystemExit(f"megatron_prior.demo.noise_grid: {err}") from None
    command = "python -m megatron_prior.demo.noise_grid " + " ".join(map(shlex.quote, argv))
    start = time.perf_counter()
    levels, runs = [], []
    for i, rate in enumerate(sorted(args.noise_rates)):
        print(f"[noise grid] level {i + 1}/{len(args.noise_rates)}: {100 * rate:.0f} % noisy captions "
              f"into {level_dir(out, rate)}/", flush=True)
        pipeline.main([*passed, "--noise-rate", str(rate), "--output-dir", str(level_dir(out, rate))])
        s = settings[rate]
        level_runs = load_runs(level_dir(out, rate), pipeline.run_specs(s))
        runs += level_runs
        levels.append({"noise_rate": rate, "output_dir": str(level_dir(out, rate)),
                       "comparisons": comparisons(level_runs, s.headline_alpha, s.other_losses)})
    wall = time.perf_counter() - start
    headline_alpha = settings[levels[0]["noise_rate"]].headline_alpha
    targets = mi_target(levels, headline_alpha)
    result = {"command": command, "finished": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "wall_time_s": wall, "pipeline_args": passed, "headline_alpha": headline_alpha,
              "levels": levels, "mi_target": targets}
    atomic_write_json(out / "noise_grid.json", result)
    atomic_write_text(out / "noise_grid.md", _markdown(levels, targets, command, wall))
    plot_noise(runs, out / "noise_grid.png")
    print((out / "noise_grid.md").read_text())
    return result


if __name__ == "__main__":
    main()
