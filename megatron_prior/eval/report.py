"""The demo's report folder: ``results.json``, ``results.md``, loss curves and a picture of
held-out captions shaded by their PRIOR weights.

``results.json`` holds at least (issue 6)::

    {"reference_auc": float,
     "runs": [{"arch": "ulvlm"|"hlvlm", "loss": "ntp"|"prior", "seed": int,
               "metrics": {"heldout_ce_grounded": float, "heldout_ce_template": float,
                           "heldout_ce_unrelated": float, "probe_accuracy": float, ...}}]}

plus per run ``prior_alpha`` (null for NTP), its name, iterations, parameters and loss tokens,
``summary`` (mean, sd and n over seeds per arch, loss and alpha), ``paired`` (each loss minus
NTP, the first of ``megatron_prior.loss.LOSSES``, on the same seed) and whatever the caller
passes as ``extra``. Architecture and loss names come from their registries. Every file is
written under a temporary name and renamed. Figures are drawn on matplotlib's Agg canvas
directly (no pyplot), so importing this module changes no global backend.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties
from matplotlib.patches import Patch
from PIL import Image

from megatron_prior.eval.stats import paired_differences, spread
from megatron_prior.files import atomic_savefig, atomic_write_json, atomic_write_text
from megatron_prior.loss import LOSSES
from megatron_prior.models.arch import ARCHS
from megatron_prior.results import RunResult, fmt, variant

BASELINE = LOSSES[0]  # ntp: every other loss is paired against it
REQUIRED_METRICS: tuple[str, ...] = ("heldout_ce_grounded", "heldout_ce_template",
                                     "heldout_ce_unrelated", "probe_accuracy")
# Column titles, and whether larger is better (for the arrows in the table header).
METRIC_LABELS: dict[str, tuple[str, bool]] = {
    "heldout_ce_grounded": ("CE grounded", False),
    "heldout_ce_template": ("CE template", False),
    "heldout_ce_unrelated": ("CE unrelated", False),
    "probe_accuracy": ("probe accuracy", True),
    "probe_accuracy_random": ("probe random", True),
    "probe_accuracy_popular": ("probe popular", True),
    "probe_accuracy_adversarial": ("probe adversarial", True),
}
# Training curves drawn from metrics.jsonl, when the runs logged them. "ce" (not
# "weighted_ce") because PRIOR's weighted_ce is the weighted loss and not comparable with NTP's.
CURVES: dict[str, str] = {"ce": "training CE, all tokens (unweighted)",
                          "ce_grounded": "training CE, grounded tokens",
                          "ce_template": "training CE, template tokens"}
KIND_EDGE_COLORS: dict[str, str] = {"grounded": "#1b7837", "template": "#8c8c8c", "unrelated": "#762a83"}


def validate_run(run: RunResult) -> None:
    """Refuse a run the report cannot show: unknown names, missing or non-finite metrics."""
    name = f"run {run.arch}/{run.loss}/seed {run.seed}"
    if run.arch not in ARCHS:
        raise ValueError(f"{name}: arch must be one of {', '.join(ARCHS)}")
    if run.loss not in LOSSES:
        raise ValueError(f"{name}: loss must be one of {', '.join(LOSSES)}")
    if not isinstance(run.seed, int) or isinstance(run.seed, bool):
        raise ValueError(f"{name}: seed must be an int, got {run.seed!r}")
    if (run.loss == "prior") != (run.prior_alpha is not None):
        raise ValueError(f"{name}: prior_alpha is required for PRIOR runs and must be None for NTP")
    missing = [m for m in REQUIRED_METRICS if m not in run.heldout]
    if missing:
        raise ValueError(f"{name}: metrics lack {', '.join(missing)}")
    bad = {k: v for k, v in run.heldout.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    if bad:
        raise ValueError(f"{name}: metrics must be finite numbers, got {bad}")


def run_json(run: RunResult, output_dir: Path) -> dict:
    """A run as results.json lists it: issue 6's fields, its held-out metrics, what it trained
    on, and its directory relative to the report's."""
    out = {"arch": run.arch, "loss": run.loss, "seed": run.seed, "prior_alpha": run.prior_alpha,
           "metrics": {k: float(v) for k, v in run.heldout.items()}, "name": run.name,
           "iterations": run.iterations, "parameters": run.parameters, "loss_tokens": run.loss_tokens,
           "train_wall_time_s": run.wall_time_s}
    if run.run_dir is not None:
        out["run_dir"] = os.path.relpath(run.run_dir, output_dir)
    if run.metrics_jsonl is not None:
        out["metrics_jsonl"] = str(run.metrics_jsonl)
    return out


@dataclass
class CaptionWeights:
    """A caption as the model saw it: token strings (SentencePiece's "▁" marks a word start),
    one weight per token, optionally each token's kind and the image."""

    tokens: list[str]
    weights: list[float]
    kinds: list[str] | None = None
    image: str | os.PathLike | None = None

    @classmethod
    def from_offsets(cls, caption: str, starts: Sequence[int], weights: Sequence[float],
                     kinds: Sequence[str] | None = None, image: str | os.PathLike | None = None) -> "CaptionWeights":
        """From a caption and each token's first character (``tokenize_with_offsets``), for
        tokenizers whose ``detokenize`` of one id drops the word-start marker. A token whose
        start repeats the next one's (a lone "▁" piece) is drawn as "␣"."""
        ends = list(starts[1:]) + [len(caption)]
        if any(not 0 <= s <= e <= len(caption) for s, e in zip(starts, ends)):
            raise ValueError(f"token starts {list(starts)} are not ascending offsets into a caption of "
                             f"{len(caption)} characters")
        tokens = [("▁" if s == 0 or caption[s - 1] == " " else "") + caption[s:e].strip() for s, e in zip(starts, ends)]
        return cls(tokens, list(weights), None if kinds is None else list(kinds), image)

    def validate(self, index: int) -> None:
        if not self.tokens:
            raise ValueError(f"caption {index}: no tokens")
        if len(self.weights) != len(self.tokens) or (self.kinds is not None and len(self.kinds) != len(self.tokens)):
            raise ValueError(f"caption {index}: {len(self.tokens)} tokens but {len(self.weights)} weights"
                             + ("" if self.kinds is None else f" and {len(self.kinds)} kinds"))
        if not all(math.isfinite(w) and w >= 0 for w in self.weights):
            raise ValueError(f"caption {index}: weights must be finite and >= 0")


def _group_key(run: RunResult) -> tuple:
    return (list(ARCHS).index(run.arch), LOSSES.index(run.loss), run.prior_alpha or 0.0)


def _metric_names(runs: Sequence[RunResult]) -> list[str]:
    """Required metrics first, then the optional ones every run has, in METRIC_LABELS order."""
    extra = [m for m in METRIC_LABELS if m not in REQUIRED_METRICS and all(m in r.heldout for r in runs)]
    return list(REQUIRED_METRICS) + extra


def summarize(runs: Sequence[RunResult]) -> tuple[list[dict], list[dict]]:
    """(summary over seeds per arch/loss/alpha, paired differences of each loss from NTP per arch/alpha)."""
    groups: dict[tuple, list[RunResult]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: (_group_key(r), r.seed)):
        groups[(r.arch, r.loss, r.prior_alpha)].append(r)
    names = _metric_names(runs)
    summary = [{"arch": a, "loss": l, "prior_alpha": al, "seeds": [r.seed for r in rs],
                "metrics": {m: spread([r.heldout[m] for r in rs]).to_json() for m in names}}
               for (a, l, al), rs in groups.items()]
    paired = []
    for (a, l, al), rs in groups.items():
        base = groups.get((a, BASELINE, None))
        if l == BASELINE or not base:
            continue
        entry = {"arch": a, "loss": l, "prior_alpha": al, "seeds": [], f"{l}_minus_{BASELINE}": {}}
        for m in names:
            seeds, diffs = paired_differences({r.seed: r.heldout[m] for r in rs}, {r.seed: r.heldout[m] for r in base})
            if seeds:
                entry["seeds"] = seeds
                entry[f"{l}_minus_{BASELINE}"][m] = spread(diffs).to_json()
        if entry["seeds"]:
            paired.append(entry)
    return summary, paired


def _spread(entry: dict) -> str:
    return fmt(entry["mean"], sd=entry["sd"])


def _header(names: list[str]) -> list[str]:
    return [f"{METRIC_LABELS[m][0]} {'↑' if METRIC_LABELS[m][1] else '↓'}" for m in names]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def render_markdown(reference_auc: float, runs: Sequence[RunResult], summary: list[dict], paired: list[dict],
                    title: str, notes: Sequence[str], figures: dict[str, str]) -> str:
    names = _metric_names(runs)
    parts = [f"# {title}", "",
             f"Reference-LM weights separate grounded from template tokens with ROC AUC "
             f"**{reference_auc:.3f}** (1 = every grounded token outweighs every template token, 0.5 = chance).",
             "", "CE: held-out cross-entropy in nats per token of each kind; probe: POPE-style accuracy "
             "(1 = always prefers the true caption, 0.5 = cannot tell).",
             "", "## Mean ± sd over seeds", "",
             _table(["arch", "loss", "seeds"] + _header(names),
                    [[ARCHS[s["arch"]].display_name, variant(s["loss"], s["prior_alpha"]),
                      ", ".join(map(str, s["seeds"]))] + [_spread(s["metrics"][m]) for m in names] for s in summary])]
    for loss in dict.fromkeys(p["loss"] for p in paired):
        name, base = variant(loss, None), variant(BASELINE, None)
        parts += ["", f"## {name} − {base}, paired by seed (same initialisation and data order)", "",
                  f"Negative loss differences and positive probe differences favour {name}.", "",
                  _table(["arch", "loss", "seeds"] + [f"Δ {METRIC_LABELS[m][0]}" for m in names],
                         [[ARCHS[p["arch"]].display_name, variant(loss, p["prior_alpha"]),
                           ", ".join(map(str, p["seeds"]))] + [_spread(p[f"{loss}_minus_{BASELINE}"][m]) for m in names]
                          for p in paired if p["loss"] == loss])]
    parts += ["", "## Every run", "",
              _table(["arch", "loss", "seed"] + _header(names),
                     [[ARCHS[r.arch].display_name, r.variant, str(r.seed)] + [fmt(float(r.heldout[m])) for m in names]
                      for r in sorted(runs, key=lambda r: (_group_key(r), r.seed))])]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    captions = {"loss_curves": "Training curves", "token_weights": "Held-out captions shaded by PRIOR weight"}
    for key, name in figures.items():
        parts += ["", f"## {captions[key]}", "", f"![{captions[key]}]({name})"]
    return "\n".join(parts) + "\n"


def read_metrics_jsonl(path: str | os.PathLike) -> list[dict]:
    """The training log of one run (one JSON object per logged iteration)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not JSON: {e}") from None
            if not isinstance(row, dict) or "iteration" not in row:
                raise ValueError(f"{path}:{lineno}: a metrics row must be an object with 'iteration'")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no logged iterations")
    return rows


def plot_loss_curves(runs: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """One column per architecture, one row per logged curve; each loss and PRIOR alpha in
    its own colour, thin lines per seed and a thick line for the mean over seeds."""
    logs = {id(r): read_metrics_jsonl(r.metrics_jsonl) for r in runs}
    archs = [a for a in ARCHS if any(r.arch == a for r in runs)]
    curves = [c for c in CURVES if any(c in row for r in runs for row in logs[id(r)])]
    if not curves:
        raise ValueError(f"no run's metrics.jsonl logs any of {', '.join(CURVES)}")
    variants = sorted({(r.loss, r.prior_alpha) for r in runs}, key=lambda v: (LOSSES.index(v[0]), -(v[1] or 0)))
    colors = dict(zip(variants, colormaps["tab10"].colors))
    fig = Figure(figsize=(5.2 * len(archs), 3.0 * len(curves)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(curves), len(archs), squeeze=False, sharex="col")
    for col, arch in enumerate(archs):
        for row, curve in enumerate(curves):
            ax = axes[row][col]
            for curve_variant in variants:
                series = []
                for r in runs:
                    if r.arch != arch or (r.loss, r.prior_alpha) != curve_variant:
                        continue
                    pts = [(x["iteration"], x[curve]) for x in logs[id(r)] if curve in x]
                    if pts:
                        it, val = map(np.asarray, zip(*pts))
                        ax.plot(it, val, color=colors[curve_variant], alpha=0.3, linewidth=0.8)
                        series.append((it, val))
                if not series:
                    continue
                label = variant(*curve_variant)
                common = series[0][0]
                if len(series) > 1 and all(np.array_equal(s[0], common) for s in series):
                    ax.plot(common, np.mean([s[1] for s in series], axis=0), color=colors[curve_variant],
                            linewidth=2.0, label=f"{label} (mean of {len(series)})")
                else:
                    ax.plot([], [], color=colors[curve_variant], label=label)
            ax.set_yscale("log")
            ax.grid(True, which="both", alpha=0.25)
            if row == 0:
                ax.set_title(ARCHS[arch].display_name)
            if row == len(curves) - 1:
                ax.set_xlabel("iteration")
            if col == 0:
                ax.set_ylabel(CURVES[curve], fontsize=9)
            if row == 0:
                ax.legend(fontsize=8)
    fig.suptitle("Training curves: NTP vs PRIOR (thin: one seed)", fontsize=11)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=120)


def _display_token(token: str) -> tuple[str, bool]:
    """(text to draw, whether a word starts here)."""
    starts_word = token.startswith(("▁", " "))
    text = token.lstrip("▁ ")
    return (text or "␣"), starts_word


def plot_token_weights(captions: Sequence[CaptionWeights], path: str | os.PathLike,
                       weight_label: str = "PRIOR multiplier m", title: str | None = None,
                       width_in: float = 11.0, dpi: int = 130) -> Path:
    """Each caption's tokens as boxes shaded by weight (one colour scale for all captions),
    framed by kind when kinds are given, with the image at the left when given."""
    for i, c in enumerate(captions):
        c.validate(i)
    if not captions:
        raise ValueError("no captions to draw")
    font = FontProperties(family="DejaVu Sans", size=10)
    renderer = FigureCanvasAgg(Figure(figsize=(width_in, 1), dpi=dpi)).get_renderer()
    measure = lambda s: renderer.get_text_width_height_descent(s, font, ismath=False)[0]  # noqa: E731

    px_w = width_in * dpi
    thumb = 64 if any(c.image is not None for c in captions) else 0
    left, right, gap, word_gap = 12 + thumb + (12 if thumb else 0), 12, 3, 9
    line_h = 22
    layouts, y = [], 40 + (24 if title else 0)
    for c in captions:
        x, lines, placed = left, 0, []
        for k, (tok, w) in enumerate(zip(c.tokens, c.weights)):
            text, starts_word = _display_token(tok)
            width = measure(text)
            x += word_gap if (starts_word and k) else gap
            if x + width > px_w - right:
                x, lines = left + gap, lines + 1
            placed.append((x, y + lines * line_h, text, w, None if c.kinds is None else c.kinds[k]))
            x += width
        layouts.append((y, placed, c.image))
        y += max((lines + 1) * line_h, thumb) + 16
    px_h = y + 70

    vmax = max(max(c.weights) for c in captions) or 1.0
    norm = Normalize(vmin=0.0, vmax=vmax)
    cmap = colormaps["YlOrRd"]
    fig = Figure(figsize=(width_in, px_h / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    to_fig = lambda x, y: (x / px_w, 1.0 - y / px_h)  # noqa: E731
    if title:
        fig.text(0.5, 1.0 - 22 / px_h, title, ha="center", va="center", fontsize=12)
    for top, placed, image in layouts:
        if image is not None:
            x0, y0 = to_fig(12, top - 10 + thumb)
            ax = fig.add_axes([x0, y0, thumb / px_w, thumb / px_h])
            ax.imshow(np.asarray(Image.open(image).convert("RGB")), interpolation="nearest")
            ax.set_axis_off()
        for x, yy, text, w, kind in placed:
            rgba = cmap(norm(w))
            dark = 0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2] < 0.5
            edge = KIND_EDGE_COLORS.get(kind, "none") if kind else "none"
            fig.text(*to_fig(x, yy), text, fontproperties=font, va="center", ha="left",
                     color="white" if dark else "black",
                     bbox=dict(boxstyle="square,pad=0.18", facecolor=rgba, edgecolor=edge, linewidth=1.4))
    cax = fig.add_axes([0.08, 28 / px_h, 0.45, 12 / px_h])
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=cax, orientation="horizontal")
    cax.set_xlabel(weight_label, fontsize=9)
    if any(c.kinds for c in captions):
        handles = [Patch(facecolor="white", edgecolor=col, linewidth=1.4, label=k)
                   for k, col in KIND_EDGE_COLORS.items()]
        fig.legend(handles=handles, loc="lower right", bbox_to_anchor=(0.98, 8 / px_h), ncol=3, fontsize=9,
                   title="frame: token kind", title_fontsize=9, frameon=False)
    return atomic_savefig(fig, path, dpi=dpi)


def write_report(output_dir: str | os.PathLike, runs: Sequence[RunResult], reference_auc: float, *,
                 captions: Sequence[CaptionWeights] | None = None, weight_label: str = "PRIOR multiplier m",
                 title: str = "PRIOR vs NTP on the synthetic grounded image-caption benchmark",
                 notes: Sequence[str] = (), extra: dict | None = None) -> dict[str, Path]:
    """Write the report files into ``output_dir``; returns {kind: path} of what was written.
    Loss curves need every run's ``metrics_jsonl``; the token picture needs ``captions``."""
    if not runs:
        raise ValueError("no runs to report")
    for r in runs:
        validate_run(r)
    keys = [(r.arch, r.loss, r.prior_alpha, r.seed) for r in runs]
    dupes = sorted({k for k in keys if keys.count(k) > 1}, key=str)
    if dupes:
        raise ValueError(f"runs repeat (arch, loss, prior_alpha, seed): {dupes}")
    if not (isinstance(reference_auc, (int, float)) and 0.0 <= reference_auc <= 1.0):
        raise ValueError(f"reference_auc must be a number in [0, 1], got {reference_auc!r}")
    clash = set(extra or {}) & {"reference_auc", "runs", "summary", "paired", "figures"}
    if clash:
        raise ValueError(f"extra must not override {', '.join(sorted(clash))}")

    out = Path(output_dir)
    summary, paired = summarize(runs)
    written = {}
    with_logs = [r for r in runs if r.metrics_jsonl is not None]
    if with_logs:
        if len(with_logs) != len(runs):
            raise ValueError("either every run or none gives metrics_jsonl (a curve plot missing some runs "
                             "would compare unlike things)")
        written["loss_curves"] = plot_loss_curves(runs, out / "loss_curves.png")
    if captions:
        written["token_weights"] = plot_token_weights(captions, out / "token_weights.png", weight_label)
    figures = {k: p.name for k, p in written.items()}
    doc = {"reference_auc": float(reference_auc), "runs": [run_json(r, out) for r in runs],
           "summary": summary, "paired": paired, "figures": figures, **(extra or {})}
    written["results_json"] = atomic_write_json(out / "results.json", doc)
    written["results_md"] = atomic_write_text(
        out / "results.md", render_markdown(reference_auc, runs, summary, paired, title, notes, figures))
    return written
