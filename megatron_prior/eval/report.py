"""The demo's report folder: ``results.json``, ``results.md``, loss curves and a picture of
held-out captions shaded by their PRIOR weights.

``results.json`` holds at least (issue 6)::

    {"reference_auc": float,
     "runs": [{"arch": "ulvlm"|"hlvlm", "loss": "ntp"|"prior", "seed": int,
               "metrics": {"heldout_ce_grounded": float, "heldout_ce_template": float,
                           "heldout_ce_unrelated": float, "probe_accuracy": float, ...}}]}

plus per run ``prior_alpha`` (null for NTP), ``noise_rate``, its name, iterations, parameters
and loss tokens, ``checkpoints`` (``{"iteration": N, "metrics": {...}}`` for each evaluated
checkpoint in training order, the last equal to ``metrics``), ``summary`` (mean, sd and n over
seeds per arch, loss and alpha), ``paired`` (each loss minus NTP, the first of
``megatron_prior.loss.LOSSES``, on the same seed), ``along_training`` (summary and paired at
each checkpoint iteration), ``headline_comparison`` when a headline is declared (see
``headline_comparison``) and whatever the caller passes as ``extra``. Architecture and loss
names come from their registries. Every file is
written under a temporary name and renamed. Figures are drawn on matplotlib's Agg canvas
directly (no pyplot), so importing this module changes no global backend.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

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
# Results along training (one row each in checkpoint_curves.png), from each run's checkpoints.
CHECKPOINT_CURVES: dict[str, str] = {"heldout_ce_grounded": "held-out CE, grounded tokens",
                                     "probe_accuracy": "probe accuracy"}
# The metrics of the headline comparison: what PRIOR is for, what it costs, what the probe says.
HEADLINE_METRICS: tuple[str, ...] = ("heldout_ce_grounded", "heldout_ce_template", "probe_accuracy")
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
    if run.checkpoints:
        its = [c["iteration"] for c in run.checkpoints]
        if its != sorted(set(its)):
            raise ValueError(f"{name}: checkpoint iterations must ascend without repeats, got {its}")
        if run.checkpoints[-1]["metrics"] != run.heldout:
            raise ValueError(f"{name}: the last checkpoint's metrics must be the run's metrics")
        for c in run.checkpoints:
            lacking = [m for m in run.heldout if m not in c["metrics"]]
            if lacking or not all(math.isfinite(v) for v in c["metrics"].values()):
                raise ValueError(f"{name}: checkpoint {c['iteration']}'s metrics lack {', '.join(lacking)} "
                                 "or are not finite")


def run_checkpoints(run: RunResult) -> list[dict]:
    """The run's evaluated checkpoints; a run evaluated at its end only has that one."""
    return run.checkpoints or [{"iteration": run.iterations, "metrics": dict(run.heldout)}]


def run_json(run: RunResult, output_dir: Path) -> dict:
    """A run as results.json lists it: issue 6's fields, its held-out metrics, what it trained
    on, and its directory relative to the report's."""
    out = {"arch": run.arch, "loss": run.loss, "seed": run.seed, "prior_alpha": run.prior_alpha,
           "noise_rate": run.noise_rate, "metrics": {k: float(v) for k, v in run.heldout.items()},
           "checkpoints": [{"iteration": c["iteration"], "metrics": {k: float(c["metrics"][k]) for k in run.heldout}}
                           for c in run_checkpoints(run)],
           "name": run.name,
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


def along_training(runs: Sequence[RunResult]) -> list[dict]:
    """``summarize`` at each checkpoint iteration: ``{"iteration", "summary", "paired"}``, in order."""
    at: dict[int, list[RunResult]] = defaultdict(list)
    for r in runs:
        for c in run_checkpoints(r):
            at[c["iteration"]].append(dataclasses.replace(r, heldout={k: c["metrics"][k] for k in r.heldout},
                                                          checkpoints=[]))
    return [{"iteration": it, **dict(zip(("summary", "paired"), summarize(at[it])))} for it in sorted(at)]


def _checkpoint_mean(run: RunResult, metric: str) -> float:
    return float(np.mean([c["metrics"][metric] for c in run_checkpoints(run)]))


def headline_comparison(runs: Sequence[RunResult], headline: dict) -> list[dict]:
    """The declared comparison: NTP against ``headline``'s loss at its ``prior_alpha`` and, for
    PRIOR, at the paper's alpha 1 beside it (when run), per architecture on paired seeds, at the
    final checkpoint and as the mean over checkpoints. Per metric of HEADLINE_METRICS: the mean
    of each side, the paired difference (mean, sd, n and each seed's) and its percent of NTP's mean."""
    loss, alpha = headline["loss"], headline.get("prior_alpha")
    alphas = [alpha] + ([1.0] if loss == "prior" and alpha != 1.0 else [])
    rows = []
    for arch in [a for a in ARCHS if any(r.arch == a for r in runs)]:
        base = {r.seed: r for r in runs if r.arch == arch and r.loss == BASELINE}
        for a in alphas:
            other = {r.seed: r for r in runs if r.arch == arch and r.loss == loss and r.prior_alpha == a}
            seeds = sorted(set(base) & set(other))
            if not seeds:
                if a == alpha:
                    raise ValueError(f"headline {variant(loss, a)}: no {ARCHS[arch].display_name} run of it "
                                     f"shares a seed with the {variant(BASELINE, None)} runs")
                continue
            iterations = [c["iteration"] for c in run_checkpoints(base[seeds[0]])]
            for s in seeds:
                for r in (base[s], other[s]):
                    if [c["iteration"] for c in run_checkpoints(r)] != iterations:
                        raise ValueError(f"run {r.name}: checkpoints differ from {base[seeds[0]].name}'s "
                                         f"{iterations}; a mean over checkpoints compares like with like only")
            for at, value in (("final", lambda r, m: float(r.heldout[m])), ("mean_over_checkpoints", _checkpoint_mean)):
                metrics = {}
                for m in HEADLINE_METRICS:
                    b, o = [value(base[s], m) for s in seeds], [value(other[s], m) for s in seeds]
                    diffs = [y - x for x, y in zip(b, o)]
                    ntp_mean = float(np.mean(b))
                    metrics[m] = {BASELINE: ntp_mean, loss: float(np.mean(o)),
                                  "difference": {**spread(diffs).to_json(), "per_seed": diffs},
                                  "percent_change": 100.0 * float(np.mean(diffs)) / ntp_mean if ntp_mean else None}
                rows.append({"arch": arch, "loss": loss, "prior_alpha": a, "declared": a == alpha, "at": at,
                             "iterations": iterations if at != "final" else iterations[-1:], "seeds": seeds,
                             "metrics": metrics})
    return rows


def _spread(entry: dict) -> str:
    return fmt(entry["mean"], sd=entry["sd"])


def _header(names: list[str]) -> list[str]:
    return [f"{METRIC_LABELS[m][0]} {'↑' if METRIC_LABELS[m][1] else '↓'}" for m in names]


def _table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _headline_markdown(headline: dict, rows: list[dict]) -> list[str]:
    name = variant(headline["loss"], headline.get("prior_alpha"))
    base = variant(BASELINE, None)
    at = {"final": "final checkpoint", "mean_over_checkpoints": "mean over checkpoints"}

    def diff(row: dict, m: str) -> str:
        d = row["metrics"][m]
        pct = "" if d["percent_change"] is None else f" ({d['percent_change']:+.1f} %)"
        return _spread(d["difference"]) + pct

    def sides(row: dict, m: str) -> str:
        return f"{fmt(row['metrics'][m][BASELINE])} → {fmt(row['metrics'][m][row['loss']])}"

    table = _table(
        ["arch", "loss", "at", "seeds", f"CE grounded {base} → loss", "Δ CE grounded", "Δ CE template",
         f"probe {base} → loss", "Δ probe", "Δ CE grounded per seed"],
        [[ARCHS[r["arch"]].display_name,
          variant(r["loss"], r["prior_alpha"]) + (" (declared)" if r["declared"] else ""),
          at[r["at"]] + f" ({', '.join(map(str, r['iterations']))})", ", ".join(map(str, r["seeds"])),
          sides(r, "heldout_ce_grounded"), diff(r, "heldout_ce_grounded"), diff(r, "heldout_ce_template"),
          sides(r, "probe_accuracy"), diff(r, "probe_accuracy"),
          ", ".join(f"{d:+.3f}" for d in r["metrics"]["heldout_ce_grounded"]["difference"]["per_seed"])]
         for r in rows])
    return ["", f"## Headline: {name} − {base} at the {headline['checkpoint']} checkpoint", "",
            f"The comparison declared in `settings.headline`. Paired by seed: loss minus "
            f"{base}, mean ± sd over seeds, percent of {base}'s mean in brackets; negative CE and positive probe "
            "differences favour the loss. The paper's alpha 1 is shown beside the declared alpha; the mean over "
            "checkpoints weighs the early rise as much as the end.", "", table]


def _along_training_markdown(along: list[dict]) -> list[str]:
    cols = list(HEADLINE_METRICS)
    rows = []
    for entry in along:
        deltas = {(p["arch"], p["loss"], p["prior_alpha"]): p[f"{p['loss']}_minus_{BASELINE}"] for p in entry["paired"]}
        for s in entry["summary"]:
            d = deltas.get((s["arch"], s["loss"], s["prior_alpha"]))
            rows.append([ARCHS[s["arch"]].display_name, variant(s["loss"], s["prior_alpha"]), str(entry["iteration"]),
                         ", ".join(map(str, s["seeds"]))] + [_spread(s["metrics"][m]) for m in cols]
                        + [_spread(d[m]) if d else "-" for m in cols])
    rows.sort(key=lambda r: (r[0], r[1], int(r[2])))
    head = (["arch", "loss", "iteration", "seeds"] + _header(cols)
            + [f"Δ {METRIC_LABELS[m][0]} vs {variant(BASELINE, None)}" for m in cols])
    return ["", "## Along training: mean ± sd over seeds at each checkpoint", "",
            "Each run evaluated at every checkpoint it saved; the Δ columns pair each loss with "
            f"{variant(BASELINE, None)} on the same seed at the same iteration.", "", _table(head, rows)]


def render_markdown(reference_auc: float, runs: Sequence[RunResult], summary: list[dict], paired: list[dict],
                    title: str, notes: Sequence[str], figures: dict[str, str], along: Sequence[dict] = (),
                    headline: dict | None = None, headline_rows: Sequence[dict] = ()) -> str:
    names = _metric_names(runs)
    parts = [f"# {title}", "",
             f"Reference-LM weights separate grounded from template tokens with ROC AUC "
             f"**{reference_auc:.3f}** (1 = every grounded token outweighs every template token, 0.5 = chance).",
             "", "CE: held-out cross-entropy in nats per token of each kind; probe: POPE-style accuracy "
             "(1 = always prefers the true caption, 0.5 = cannot tell)."]
    if headline is not None:
        parts += _headline_markdown(headline, list(headline_rows))
    parts += ["", "## Mean ± sd over seeds (final checkpoint)", "",
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
    if len(along) > 1:
        parts += _along_training_markdown(list(along))
    parts += ["", "## Every run", "",
              _table(["arch", "loss", "seed"] + _header(names),
                     [[ARCHS[r.arch].display_name, r.variant, str(r.seed)] + [fmt(float(r.heldout[m])) for m in names]
                      for r in sorted(runs, key=lambda r: (_group_key(r), r.seed))])]
    if notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in notes]
    captions = {"checkpoint_curves": "Held-out results along training", "loss_curves": "Training curves",
                "token_weights": "Held-out captions shaded by PRIOR weight"}
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


Series = dict[tuple, list[tuple[np.ndarray, np.ndarray]]]  # (loss, alpha) -> one (x, y) per seed


def plot_grid(runs: Sequence[RunResult], rows: dict[str, str], series: Callable[[str, str], Series],
              path: str | os.PathLike, title: str, log_y: bool, marker: str | None = None,
              xlabel: str = "iteration", log_x: bool = False) -> Path:
    """One column per architecture, one row per key of ``rows`` (its y label); on each axis
    ``series(arch, row)``: each loss and PRIOR alpha in its own colour, a thin line per seed and a
    thick line for the mean over seeds (where the seeds share their x values)."""
    archs = [a for a in ARCHS if any(r.arch == a for r in runs)]
    variants = sorted({(r.loss, r.prior_alpha) for r in runs}, key=lambda v: (LOSSES.index(v[0]), -(v[1] or 0)))
    colors = dict(zip(variants, colormaps["tab10"].colors))
    fig = Figure(figsize=(5.2 * len(archs), 3.0 * len(rows)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(rows), len(archs), squeeze=False, sharex="col")
    for col, arch in enumerate(archs):
        for row, key in enumerate(rows):
            ax = axes[row][col]
            drawn = series(arch, key)
            for v in variants:
                lines = drawn.get(v, [])
                if not lines:
                    continue
                for x, y in lines:
                    ax.plot(x, y, color=colors[v], alpha=0.3, linewidth=0.8)
                label, common = variant(*v), lines[0][0]
                if all(np.array_equal(x, common) for x, _ in lines):
                    ax.plot(common, np.mean([y for _, y in lines], axis=0), color=colors[v], linewidth=2.0,
                            marker=marker, label=label + (f" (mean of {len(lines)})" if len(lines) > 1 else ""))
                else:
                    ax.plot([], [], color=colors[v], label=label)
            if log_y:
                ax.set_yscale("log")
            if log_x:
                ax.set_xscale("log")
            ax.grid(True, which="both", alpha=0.25)
            if row == 0:
                ax.set_title(ARCHS[arch].display_name)
                ax.legend(fontsize=8)
            if row == len(rows) - 1:
                ax.set_xlabel(xlabel)
            if col == 0:
                ax.set_ylabel(rows[key], fontsize=9)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    return atomic_savefig(fig, path, dpi=120)


def plot_loss_curves(runs: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """The training curves of each run's metrics.jsonl (CURVES), per architecture."""
    logs = {id(r): read_metrics_jsonl(r.metrics_jsonl) for r in runs}
    curves = {c: label for c, label in CURVES.items() if any(c in row for r in runs for row in logs[id(r)])}
    if not curves:
        raise ValueError(f"no run's metrics.jsonl logs any of {', '.join(CURVES)}")

    def series(arch: str, curve: str) -> Series:
        out: Series = defaultdict(list)
        for r in runs:
            pts = [(x["iteration"], x[curve]) for x in logs[id(r)] if curve in x]
            if r.arch == arch and pts:
                out[(r.loss, r.prior_alpha)].append(tuple(map(np.asarray, zip(*pts))))
        return out

    return plot_grid(runs, curves, series, path, "Training curves: NTP vs PRIOR (thin: one seed)", log_y=True)


def plot_checkpoint_curves(runs: Sequence[RunResult], path: str | os.PathLike) -> Path:
    """Held-out metrics (CHECKPOINT_CURVES) at each evaluated checkpoint, per architecture."""

    def series(arch: str, metric: str) -> Series:
        out: Series = defaultdict(list)
        for r in runs:
            if r.arch == arch:
                ckpts = run_checkpoints(r)
                out[(r.loss, r.prior_alpha)].append((np.asarray([c["iteration"] for c in ckpts]),
                                                     np.asarray([c["metrics"][metric] for c in ckpts])))
        return out

    return plot_grid(runs, CHECKPOINT_CURVES, series, path,
                      "Held-out results along training: NTP vs PRIOR (thin: one seed)", log_y=False, marker="o")


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
                 notes: Sequence[str] = (), extra: dict | None = None,
                 headline: dict | None = None) -> dict[str, Path]:
    """Write the report files into ``output_dir``; returns {kind: path} of what was written.
    Loss curves need every run's ``metrics_jsonl``; the token picture needs ``captions``; the
    curves along training need more than one checkpoint. ``headline`` (``{"loss", "prior_alpha",
    "checkpoint"}``) adds the declared comparison (``headline_comparison``)."""
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
    clash = set(extra or {}) & {"reference_auc", "runs", "summary", "paired", "figures", "along_training",
                                "headline_comparison"}
    if clash:
        raise ValueError(f"extra must not override {', '.join(sorted(clash))}")

    out = Path(output_dir)
    summary, paired = summarize(runs)
    along = along_training(runs)
    headline_rows = headline_comparison(runs, headline) if headline is not None else []
    written = {}
    if len(along) > 1:
        written["checkpoint_curves"] = plot_checkpoint_curves(runs, out / "checkpoint_curves.png")
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
           "summary": summary, "paired": paired, "along_training": along, "figures": figures, **(extra or {})}
    if headline is not None:
        doc["headline_comparison"] = headline_rows
    written["results_json"] = atomic_write_json(out / "results.json", doc)
    written["results_md"] = atomic_write_text(
        out / "results.md", render_markdown(reference_auc, runs, summary, paired, title, notes, figures, along,
                                            headline, headline_rows))
    return written
