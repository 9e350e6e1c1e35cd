"""Scaling-law sweeps for NTP vs PRIOR: grid spec, local or SLURM launch, power-law fits, plots.

    spec = load_sweep("examples/sweeps/cpu_default.yaml")   # validated grid
    run_local(spec, out) / render_sbatch(spec, runs, out)  # launch
    analyze(spec, out)                                      # results.md, fit.json, scaling.png
    fit_power_law(tokens, losses)                           # L(D) = E + B * D**-beta

The command-line front end is ``examples/sweeps/run_sweep.py``.
"""

from megatron_prior.runs import RunFailed

from .collect import CollectError, RunResult, collect
from .fit import FitError, fit_chinchilla, fit_power_law, predict
from .local import run_local
from .report import analyze, fit_sweep
from .slurm import render_sbatch, submit
from .spec import Run, SweepError, SweepSpec, load_sweep, parse_sweep

__all__ = [
    "CollectError", "FitError", "Run", "RunFailed", "RunResult", "SweepError", "SweepSpec",
    "analyze", "collect", "fit_chinchilla", "fit_power_law", "fit_sweep", "load_sweep",
    "parse_sweep", "predict", "render_sbatch", "run_local", "submit",
]
