"""Fit a collected sweep and write its report: ``fit.json``, ``results.md``, ``scaling.png``.

``fit.json`` schema (version 1)::

    {
      "schema_version": 2, "sweep": name, "law": "L(D) = E + B * D**-beta",
      "x": "loss_tokens", "y": "eval_ce",          # summary.json keys: D and L
      "reference_size": "s",                       # the largest size (by parameters)
      "ntp":   {<fit of the reference size>, "size": "s", "parameters": N},
      "prior": {...},
      "per_size": {"xs": {"ntp": {<fit>, "parameters": N}, "prior": {...}}, "s": {...}},
      "chinchilla": {"ntp": {E, A, alpha, alpha_ci, B, beta, beta_ci, r2, ...}, "prior": ...},
      "comparisons": {"prior": {"xs": {"beta_ntp", "beta_prior", "beta_ratio", "ci_overlap"}, ...}, ...},
      "comparison": {"xs": {...}, ...},          # comparisons' one entry, when one loss besides NTP
      "by_kind": {"grounded": {<the same fields, "y": "eval_ce_grounded">}}   # the sweep's fit_kinds
    }

D counts the tokens that carried loss (summary.json ``loss_tokens``), not the positions a run
computed: padding and image positions train nothing (schema 1 used ``tokens_seen``, every
position of the text including padding). A fit entry is fit_power_law's dict (E, B, beta,
beta_ci, r2, extrapolation_error, ...). Where a curve admits no power law the entry is
``{"error": "<why>"}`` instead, so one bad curve does not hide the others; the report prints
every such error. ``chinchilla`` is present only with >= 2 sizes (its entries may be errors
too); ``comparisons`` (each loss against NTP, the first of ``megatron_prior.loss.LOSSES``) only
with NTP and another loss; ``comparison``, the key read before sweeps could hold more than one
other loss, repeats its entry when there is exactly one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prior.files import atomic_write_json, atomic_write_text
from megatron_prior.loss import LOSSES
from megatron_prior.results import RunResult

from .collect import collect, results_markdown
from .fit import FitError, fit_chinchilla, fit_power_law
from .plots import plot_scaling
from .rundirs import SUMMARY
from .spec import SweepSpec

SCHEMA_VERSION = 2
BASELINE = LOSSES[0]  # ntp: the exponent every other loss is compared with


def fit_sweep(results: list[RunResult], name: str, losses: tuple[str, ...], *, metric: str = "ce",
              n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per-size L(D) fits for each loss, the Chinchilla L(N, D) fit, and each loss's exponent
    against NTP's, of the validation loss ``metric`` (RunResult.metric: ``ce`` over all caption
    tokens, ``ce_<kind>`` over one token kind) against the loss tokens D."""
    sizes = sorted({r.size for r in results},
                   key=lambda s: next(r.parameters for r in results if r.size == s))
    if not sizes:
        raise FitError("no finished runs to fit")
    params = {s: next(r.parameters for r in results if r.size == s) for s in sizes}
    per_size: dict[str, dict] = {}
    for size in sizes:
        per_size[size] = {}
        for loss in losses:
            pts = [r for r in results if r.size == size and r.loss == loss]
            try:
                fit = fit_power_law([r.loss_tokens for r in pts], [r.metric(metric) for r in pts],
                                    n_bootstrap=n_bootstrap, seed=seed)
            except FitError as err:
                fit = {"error": str(err)}
            per_size[size][loss] = {**fit, "parameters": params[size]}
    reference = sizes[-1]
    out: dict = {"schema_version": SCHEMA_VERSION, "sweep": name, "law": "L(D) = E + B * D**-beta",
                 "x": "loss_tokens", "y": f"eval_{metric}", "reference_size": reference}
    for loss in losses:
        out[loss] = {**per_size[reference][loss], "size": reference}
    out["per_size"] = per_size
    if len(sizes) >= 2:
        out["chinchilla"] = {}
        for loss in losses:
            pts = [r for r in results if r.loss == loss]
            try:
                out["chinchilla"][loss] = fit_chinchilla(
                    [r.parameters for r in pts], [r.loss_tokens for r in pts],
                    [r.metric(metric) for r in pts], n_bootstrap=min(n_bootstrap, 300), seed=seed)
            except FitError as err:
                out["chinchilla"][loss] = {"error": str(err)}
    others = [loss for loss in losses if loss != BASELINE]
    if BASELINE in losses and others:
        out["comparisons"] = {other: {size: _compare(BASELINE, per_size[size][BASELINE], other, per_size[size][other])
                                      for size in sizes} for other in others}
        if len(others) == 1:
            out["comparison"] = out["comparisons"][others[0]]
    return out


def _compare(base_name: str, base: dict, name: str, fit: dict) -> dict:
    if "error" in base or "error" in fit:
        return {"error": "a fit is missing: " + "; ".join(
            f"{k}: {v['error']}" for k, v in ((base_name, base), (name, fit)) if "error" in v)}
    out = {f"beta_{base_name}": base["beta"], f"beta_{name}": fit["beta"],
           "beta_ratio": fit["beta"] / base["beta"], "ci_overlap": None}
    if base["beta_ci"] and fit["beta_ci"]:
        out["ci_overlap"] = not (fit["beta_ci"][0] > base["beta_ci"][1]
                                 or base["beta_ci"][0] > fit["beta_ci"][1])
    return out


def fit_errors(fit: dict, prefix: str = "") -> list[str]:
    """Every curve that could not be fitted, as 'where: why' lines."""
    errors = [f"{prefix}{size} {loss}: {entry['error']}" for size, by_loss in fit["per_size"].items()
              for loss, entry in by_loss.items() if "error" in entry]
    errors += [f"{prefix}chinchilla {loss}: {entry['error']}"
               for loss, entry in fit.get("chinchilla", {}).items() if "error" in entry]
    for kind, kind_fit in fit.get("by_kind", {}).items():
        errors += fit_errors(kind_fit, prefix=f"{kind} tokens: ")
    return errors


def _ci(ci: Optional[list]) -> str:
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "-"


def fit_markdown(fit: dict) -> str:
    """Per-size exponents, fit quality and predictability, NTP and PRIOR on adjacent rows."""
    lines = ["| size | params | loss | beta | 95% CI | E | R^2 | extrapolation error |",
             "|---|---|---|---|---|---|---|---|"]
    for size, by_loss in fit["per_size"].items():
        for loss, f in by_loss.items():
            if "error" in f:
                lines.append(f"| {size} | {f['parameters']} | {loss} | fit failed: {f['error']} "
                             "| | | | |")
                continue
            extra = f"{100 * f['extrapolation_error']:.2f} %" if f["extrapolation_error"] is not None else "-"
            lines.append(f"| {size} | {f['parameters']} | {loss} | {f['beta']:.3f} | {_ci(f['beta_ci'])} "
                         f"| {f['E']:.3f} | {f['r2']:.4f} | {extra} |")
    for loss, f in fit.get("chinchilla", {}).items():
        if "error" not in f:
            lines.append(f"\nChinchilla {loss}: L(N, D) = {f['E']:.3f} + {f['A']:.4g} N^-{f['alpha']:.3f} "
                         f"+ {f['B']:.4g} D^-{f['beta']:.3f}  (alpha CI {_ci(f['alpha_ci'])}, "
                         f"beta CI {_ci(f['beta_ci'])}, R^2 {f['r2']:.4f})")
    return "\n".join(lines) + "\n"


def analyze(spec: SweepSpec, output_dir: Path, *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Collect, fit and plot a finished sweep; returns what was written (paths and fit)."""
    output_dir = Path(output_dir)
    results, missing = collect(spec, output_dir)
    if missing:
        raise FitError(f"{len(missing)} of {len(results) + len(missing)} runs have no "
                       f"{SUMMARY} yet (first: {missing[0].name}); finish the sweep first")
    atomic_write_json(output_dir / "results.json", [r.to_json() for r in results], sort_keys=False)
    fit = fit_sweep(results, spec.name, spec.losses, n_bootstrap=n_bootstrap, seed=seed)
    sections = [f"## Fits: held-out loss of all caption tokens\n\n{fit_markdown(fit)}"]
    plots = {"scaling.png": ("ce", fit)}
    if spec.fit_kinds:
        fit["by_kind"] = {kind: fit_sweep(results, spec.name, spec.losses, metric=f"ce_{kind}",
                                          n_bootstrap=n_bootstrap, seed=seed) for kind in spec.fit_kinds}
        for kind, kind_fit in fit["by_kind"].items():
            sections.append(f"## Fits: held-out CE of the {kind} tokens\n\n{fit_markdown(kind_fit)}")
            plots[f"scaling_{kind}.png"] = (f"ce_{kind}", kind_fit)
    atomic_write_json(output_dir / "fit.json", fit, sort_keys=False)
    atomic_write_text(output_dir / "results.md",
                      f"# Sweep {spec.name}\n\n" + "\n".join(sections)
                      + f"\n## Runs\n\n{results_markdown(results)}")
    for name, (metric, metric_fit) in plots.items():
        plot_scaling(results, metric_fit, output_dir / name, title=f"sweep {spec.name}", metric=metric)
    return {"fit": fit, "results": results, "errors": fit_errors(fit),
            "paths": [output_dir / n for n in ("results.json", "fit.json", "results.md", *plots)]}
