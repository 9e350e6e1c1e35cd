"""The caption-noise grid: the demo pipeline at several shares of wrong training captions, each
weighting against NTP at each level, and whether MI keeps PRIOR's clean-data gain under noise.

    python -m megatron_prior.demo.noise_grid --output-dir demo_output/noise_grid \\
        --noise-rates 0 0.15 0.3 -- --seed-offset 6 --archs hlvlm --other-losses mi rho1 cal

Each level runs into ``{output-dir}/noise_{percent}/`` with its own data, reference, encoder and
scorer: the noise is in the training captions they all read (held-out data stay clean). Writes
``noise_grid.{json,md,png}`` (``megatron_prior.demo.grid``).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from megatron_prior.demo import grid
from megatron_prior.models.arch import ARCHS

# The noisiest level's MI gain must keep this share of PRIOR's gain on clean captions.
MI_SHARE = 0.5


def _check(rates: Sequence[float]) -> None:
    if not all(0 <= r <= 1 for r in rates):
        raise ValueError(f"--noise-rates must be in [0, 1], got {list(rates)}")


AXIS = grid.Axis(
    name="noise", values_flag="--noise-rates", default_values=(0.0, 0.15, 0.3), parse=float, check=_check,
    values_help="shares of training captions with one colour or shape word made wrong (0 = clean)",
    tag=lambda r: f"{round(100 * r):02d}", pipeline_args=lambda r: ["--noise-rate", str(r)], sets=("--noise-rate",),
    describe=lambda r, where, settings: {"noise_rate": r}, x=lambda lv: lv["noise_rate"],
    label=lambda lv: f"{100 * lv['noise_rate']:.0f} %", column="noise", title="Caption noise",
    xlabel="share of training captions with a wrong word", metavar="RATE")


def mi_target(levels: list[dict], headline_alpha: float) -> dict:
    """Per architecture: PRIOR's grounded-CE gain on clean captions and at the noisiest level,
    MI's gain at the noisiest level, and whether MI keeps MI_SHARE of PRIOR's clean gain."""
    clean = [lv for lv in levels if lv["noise_rate"] == 0]
    noisiest = max(levels, key=lambda lv: lv["noise_rate"])
    out = {}
    if not clean or noisiest["noise_rate"] == 0:
        return out
    for arch in ARCHS:
        prior_clean = grid.gain(clean[0]["comparisons"], arch, "prior", headline_alpha)
        prior_noisy = grid.gain(noisiest["comparisons"], arch, "prior", headline_alpha)
        mi_noisy = grid.gain(noisiest["comparisons"], arch, "mi", None)
        if None in (prior_clean, prior_noisy, mi_noisy):
            continue
        out[arch] = {"noise_rate": noisiest["noise_rate"], "prior_gain_clean": prior_clean,
                     "prior_gain_noisy": prior_noisy, "mi_gain_noisy": mi_noisy,
                     "prior_loses_its_gain": prior_noisy < prior_clean,
                     "met": prior_clean > 0 and mi_noisy >= MI_SHARE * prior_clean}
    return out


def summary(levels: list[dict], headline_alpha: float) -> tuple[dict, list[str]]:
    """``mi_target`` for noise_grid.json and its section of noise_grid.md."""
    targets = mi_target(levels, headline_alpha)
    lines = [f"## MI under noise: does it keep {MI_SHARE:.0%} of PRIOR's clean-data grounded-CE gain?", ""]
    if not targets:
        lines.append("Not measured: the grid needs a clean level, a noisy one, PRIOR and MI runs.")
    for arch, t in targets.items():
        lines.append(f"- {ARCHS[arch].display_name}: PRIOR's gain {t['prior_gain_clean']:+.3f} nats clean, "
                     f"{t['prior_gain_noisy']:+.3f} at {100 * t['noise_rate']:.0f} % noise; MI's "
                     f"{t['mi_gain_noisy']:+.3f} there: **{'met' if t['met'] else 'not met'}**"
                     + ("" if t["prior_gain_clean"] > 0 else " (PRIOR has no clean-data gain to keep)"))
    return {"mi_target": targets}, lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return grid.main(AXIS, sys.argv[1:] if argv is None else argv, prog="megatron_prior.demo.noise_grid",
                     description="Run the demo pipeline at several caption-noise rates and compare every weighting "
                                 "with NTP at each.", summary=summary)


if __name__ == "__main__":
    main()
