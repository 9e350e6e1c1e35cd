"""Fit a collected sweep and write its report: ``fit.json``, ``results.md``, ``scaling.png``.

``fit.json`` schema (version 1)::

    {
      "schema_version": 1, "sweep": name, "law": "L(D) = E + B * D**-beta",
      "x": "tokens_seen", "y": "eval_loss",
      "reference_size": "s",                       # the largest size (by parameters)
      "ntp":   {<fit of the reference size>, "size": "s", "parameters": N},
      "prior": {...},
      "per_size": {"xs": {"ntp": {<fit>, "parameters": N}, "prior": {...}}, "s": {...}},
      "chinchilla": {"ntp": {E, A, alpha, alpha_ci, B, beta, beta_ci, r2, ...}, "prior": ...},
      "comparison": {"xs": {"beta_ntp", "beta_prior", "beta_ratio", "ci_overlap"}, ...},
      "by_kind": {"grounded": {<the same fields, "y": "grounded">}}   # the sweep's fit_kinds
    }

A fit entry is fit_power_law's dict (E, B, beta, beta_ci, r2, extrapolation_error, ...).
Where a curve admits no power law the entry is ``{"error": "<why>"}`` instead, so one bad
curve does not hide the others; the report prints every such error. ``chinchilla`` is present
only with >= 2 sizes (its entries may be errors too); ``comparison`` only with both losses.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from megatron_prior.files import atomic_write_json, atomic_write_text

from .collect import RunResult, collect, results_markdown
from .fit import FitError, fit_chinchilla, fit_power_law
from .rundirs import SUMMARY
from .spec import SweepSpec

SCHEMA_VERSION = 1


def fit_sweep(results: list[RunResult], name: str, losses: tuple[str, ...], *, metric: str = "eval_loss",
              n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Per-size L(D) fits for each loss, the Chinchilla L(N, D) fit, and NTP-vs-PRIOR exponents,
    of ``metric`` (RunResult.metric: all caption tokens, or one token kind)."""
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
                fit = fit_power_law([r.tokens for r in pts], [r.metric(metric) for r in pts],
                                    n_bootstrap=n_bootstrap, seed=seed)
            except FitError as err:
                fit = {"error": str(err)}
            per_size[size][loss] = {**fit, "parameters": params[size]}
    reference = sizes[-1]
    out: dict = {"schema_version": SCHEMA_VERSION, "sweep": name, "law": "L(D) = E + B * D**-beta",
                 "x": "tokens_seen", "y": metric, "reference_size": reference}
    for loss in losses:
        out[loss] = {**per_size[reference][loss], "size": reference}
    out["per_size"] = per_size
    if len(sizes) >= 2:
        out["chinchilla"] = {}
        for loss in losses:
            pts = [r for r in results if r.loss == loss]
            try:
                out["chinchilla"][loss] = fit_chinchilla(
                    [r.parameters for r in pts], [r.tokens for r in pts],
                    [r.metric(metric) for r in pts], n_bootstrap=min(n_bootstrap, 300), seed=seed)
            except FitError as err:
                out["chinchilla"][loss] = {"error": str(err)}
    if {"ntp", "prior"} <= set(losses):
        out["comparison"] = {size: _compare(per_size[size]["ntp"], per_size[size]["prior"])
                             for size in sizes}
    return out


def _compare(ntp: dict, prior: dict) -> dict:
    if "error" in ntp or "error" in prior:
        return {"error": "a fit is missing: " + "; ".join(
            f"{k}: {v['error']}" for k, v in (("ntp", ntp), ("prior", prior)) if "error" in v)}
    out = {"beta_ntp": ntp["beta"], "beta_prior": prior["beta"],
           "beta_ratio": prior["beta"] / ntp["beta"], "ci_overlap": None}
    if ntp["beta_ci"] and prior["beta_ci"]:
        out["ci_overlap"] = not (prior["beta_ci"][0] > ntp["beta_ci"][1]
                                 or ntp["beta_ci"][0] > prior["beta_ci"][1])
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
    from .plots import plot_scaling  # matplotlib only when a report is made

    output_dir = Path(output_dir)
    results, missing = collect(spec, output_dir)
    if missing:
        raise FitError(f"{len(missing)} of {len(results) + len(missing)} runs have no "
                       f"{SUMMARY} yet (first: {missing[0].name}); finish the sweep first")
    atomic_write_json(output_dir / "results.json", [r.as_dict() for r in results], sort_keys=False)
    fit = fit_sweep(results, spec.name, spec.losses, n_bootstrap=n_bootstrap, seed=seed)
    sections = [f"## Fits: held-out loss of all caption tokens\n\n{fit_markdown(fit)}"]
    plots = {"scaling.png": ("eval_loss", fit)}
    if spec.fit_kinds:
        fit["by_kind"] = {kind: fit_sweep(results, spec.name, spec.losses, metric=kind,
                                          n_bootstrap=n_bootstrap, seed=seed) for kind in spec.fit_kinds}
        for kind, kind_fit in fit["by_kind"].items():
            sections.append(f"## Fits: held-out CE of the {kind} tokens\n\n{fit_markdown(kind_fit)}")
            plots[f"scaling_{kind}.png"] = (kind, kind_fit)
    atomic_write_json(output_dir / "fit.json", fit, sort_keys=False)
    atomic_write_text(output_dir / "results.md",
                      f"# Sweep {spec.name}\n\n" + "\n".join(sections)
                      + f"\n## Runs\n\n{results_markdown(results)}")
    for name, (metric, metric_fit) in plots.items():
        plot_scaling(results, metric_fit, output_dir / name, title=f"sweep {spec.name}", metric=metric)
    return {"fit": fit, "results": results, "errors": fit_errors(fit),
            "paths": [output_dir / n for n in ("results.json", "fit.json", "results.md", *plots)]}
