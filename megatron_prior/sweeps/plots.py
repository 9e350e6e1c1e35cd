"""The sweep's figure: held-out loss vs loss tokens D per size with the fitted curves, one
panel per loss (NTP and PRIOR side by side, same axes), and a last panel with the fitted data
exponents per size and their confidence intervals, which is where "PRIOR scales better" is read.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from megatron_prior.files import atomic_savefig  # noqa: E402
from megatron_prior.loss import LOSSES  # noqa: E402
from megatron_prior.results import RunResult  # noqa: E402

from .fit import power_law  # noqa: E402

_MARKERS = "osD^v"  # one per loss, in LOSSES order


def _marker(loss: str) -> str:
    return _MARKERS[LOSSES.index(loss) % len(_MARKERS)]


def plot_scaling(results: list[RunResult], fit: dict, path: Path, title: str = "",
                 metric: str = "ce") -> None:
    """Write the figure of ``metric`` (RunResult.metric) and its ``fit`` to ``path`` (PNG)."""
    what = "held-out loss" if metric == "ce" else f"held-out CE, {metric.removeprefix('ce_')} tokens"
    losses = [k for k in LOSSES if k in {r.loss for r in results}]
    sizes = list(fit["per_size"])  # ordered by parameter count
    colors = plt.get_cmap("viridis")(np.linspace(0.0, 0.85, max(len(sizes), 2)))
    fig, axes = plt.subplots(1, len(losses) + 1, figsize=(5.2 * (len(losses) + 1), 4.4),
                             gridspec_kw={"width_ratios": [1.25] * len(losses) + [1.0]})
    loss_axes = axes[:-1]
    tokens = np.array([r.loss_tokens for r in results], dtype=float)
    x_grid = np.geomspace(tokens.min() / 1.3, tokens.max() * 1.6, 200)
    for ax, loss in zip(loss_axes, losses):
        for color, size in zip(colors, sizes):
            pts = [r for r in results if r.size == size and r.loss == loss]
            d = np.array([r.loss_tokens for r in pts], dtype=float)
            y = np.array([r.metric(metric) for r in pts])
            f = fit["per_size"][size][loss]
            label = f"{size} ({f['parameters'] / 1e6:.2g}M)"
            if "error" in f:
                label += ": no fit"
            else:
                inside = x_grid <= d.max()
                ax.plot(x_grid[inside], power_law(x_grid[inside], f["E"], f["B"], f["beta"]),
                        color=color, lw=1.6)
                ax.plot(x_grid[~inside], power_law(x_grid[~inside], f["E"], f["B"], f["beta"]),
                        color=color, lw=1.2, ls=":")
                ci = f"[{f['beta_ci'][0]:.2f}, {f['beta_ci'][1]:.2f}]" if f["beta_ci"] else ""
                label += f": β={f['beta']:.2f} {ci}, R²={f['r2']:.3f}"
            ax.scatter(d, y, color=color, marker=_marker(loss), s=26,
                       edgecolor="black", linewidth=0.4, zorder=3, label=label)
        ax.set_xscale("log")
        ax.set_title(f"{loss.upper()}: {what} vs loss tokens")
        ax.set_xlabel("loss tokens D (tokens that carried loss)")
        ax.grid(True, which="both", alpha=0.25)
        ax.legend(fontsize=7.5, loc="upper right", title="size: L = E + B·D^-β", title_fontsize=7.5)
    loss_axes[0].set_ylabel(f"{what} (nats/token)")
    # Same y range on every loss panel, so the curves compare by eye.
    lo = min(a.get_ylim()[0] for a in loss_axes)
    hi = max(a.get_ylim()[1] for a in loss_axes)
    for a in loss_axes:
        a.set_ylim(lo, hi)
    _plot_exponents(axes[-1], fit, losses, sizes)
    fig.suptitle(f"{title}: dotted = extrapolation beyond the largest budget" if title
                 else "dotted = extrapolation beyond the largest budget", fontsize=10)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def _plot_exponents(ax, fit: dict, losses: list[str], sizes: list[str]) -> None:
    # A percentile bootstrap interval need not contain the point estimate (a skewed bootstrap
    # distribution puts both ends on one side of it), so the interval is drawn as its own
    # segment from its two ends and the estimate as a marker, never as offsets around it.
    width = 0.8 / len(losses)
    for i, loss in enumerate(losses):
        xs, betas, lows, highs = [], [], [], []
        for j, size in enumerate(sizes):
            f = fit["per_size"][size][loss]
            if "error" in f:
                continue
            xs.append(j + (i - (len(losses) - 1) / 2) * width)
            betas.append(f["beta"])
            lo, hi = f["beta_ci"] or (f["beta"], f["beta"])
            lows.append(lo)
            highs.append(hi)
        mid, half = (np.add(lows, highs) / 2.0, np.subtract(highs, lows) / 2.0)
        ax.errorbar(xs, mid, yerr=half, fmt="none", capsize=4, color=f"C{i}")
        ax.plot(xs, betas, _marker(loss), label=loss.upper(), color=f"C{i}")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_xlim(-0.6, len(sizes) - 0.4)
    ax.set_xlabel("model size")
    ax.set_ylabel("data exponent β (95 % CI)")
    ax.set_title("fitted exponents: higher = scales better")
    ax.grid(True, axis="y", alpha=0.25)
    ax.legend(fontsize=8)
