"""The reference-size grid: the demo pipeline with PRIOR's text-only reference at several sizes,
each weighting against NTP at each, beside how well each reference models the captions (held-out
NLL) and tells grounded from template tokens (AUC): how the reference's capacity carries into
PRIOR's gain.

    python -m megatron_prior.demo.reference_grid --output-dir demo_output/reference_grid \\
        --reference-sizes 1x32 2x128 4x256 -- --seed-offset 6 --alphas 0.5

A size is LAYERSxWIDTH. The LVLMs' initial language model keeps the demo's shape at every level
(a reference of another width cannot initialise them), so only the scores change: the level whose
size is that shape is the demo itself, the others train a second text-only GPT that only scores
(``--reference-num-layers``/``--reference-hidden-size`` of the pipeline). Each level runs into
``{output-dir}/reference_{size}/``; NTP runs are trained again at each (their seeds and data are
the same, so they repeat). Writes ``reference_grid.{json,md,png}`` (``megatron_prior.demo.grid``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Optional, Sequence

from megatron_prior.demo import grid
from megatron_prior.demo.pipeline import DemoSettings, prior_reference
from megatron_prior.models.arch import ARCHS
from megatron_prior.results import SUMMARY, load_json


def parse_size(text: str) -> tuple[int, int]:
    """``"2x128"`` -> (2, 128)."""
    m = re.fullmatch(r"(\d+)x(\d+)", text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"a reference size is LAYERSxWIDTH, e.g. 2x128; got {text!r}")
    return int(m.group(1)), int(m.group(2))


def size_text(size: tuple[int, int]) -> str:
    """(2, 128) -> ``"2x128"``: the level's folder suffix and how its size is typed."""
    return f"{size[0]}x{size[1]}"


def describe(size: tuple[int, int], where: Path, settings: DemoSettings) -> dict:
    """The level's reference: its shape and parameters, and what the demo report measured of its
    scores on the held-out captions."""
    reference = load_json(where / "results.json")["reference"]
    _, ckpt = prior_reference(settings)
    return {"reference": {
        "num_layers": size[0], "hidden_size": size[1],
        "parameters": int(load_json(where / ckpt / SUMMARY)["parameters"]),
        "is_lm_init": not settings.separate_reference,
        "heldout_nll": reference["mean_nll_all"], "heldout_nll_by_kind": reference["mean_nll"],
        "auc_grounded_vs_template": reference["auc_grounded_vs_template"],
        "auc_grounded_vs_unrelated": reference.get("auc_grounded_vs_unrelated"),
        "mean_multiplier": reference["mean_multiplier"]}}


def _label(level: dict) -> str:
    r = level["reference"]
    return size_text((r["num_layers"], r["hidden_size"])) + (" (LM init)" if r["is_lm_init"] else "")


AXIS = grid.Axis(
    name="reference", values_flag="--reference-sizes", default_values=((1, 32), (2, 128), (4, 256)),
    parse=parse_size, values_help="sizes of PRIOR's reference GPT, LAYERSxWIDTH (the demo's LVLM language model is "
                                  "2x128: that level's reference is also their initial LM)",
    tag=size_text,
    pipeline_args=lambda size: ["--reference-num-layers", str(size[0]), "--reference-hidden-size", str(size[1])],
    sets=("--reference-num-layers", "--reference-hidden-size"), describe=describe,
    x=lambda lv: lv["reference"]["parameters"], label=_label, column="reference", title="Reference size",
    xlabel="parameters of PRIOR's reference (log scale)", log_x=True, metavar="LAYERSxWIDTH",
    show=size_text)


def summary(levels: list[dict], headline_alpha: float) -> tuple[dict, list[str]]:
    """Each reference's quality beside PRIOR's gain over NTP at the headline alpha."""
    archs = [a for a in ARCHS if any(r["arch"] == a for lv in levels for r in lv["comparisons"])]
    rows, lines = [], [
        f"## The reference against PRIOR's gain (alpha {headline_alpha:g}, final checkpoint, mean over seeds)", "",
        "Reference NLL and AUC are on the held-out captions (weight 1 - p_ref; AUC 0.5 is no separation). "
        "Gains are NTP's minus PRIOR's grounded CE and PRIOR's minus NTP's probe accuracy.", "",
        "| reference | parameters | held-out NLL (grounded / template / unrelated) | AUC grounded vs template | "
        "AUC grounded vs unrelated | " + " | ".join(f"{ARCHS[a].display_name} gain: grounded CE, probe" for a in archs)
        + " |", "|---" * (5 + len(archs)) + "|"]
    for lv in levels:
        r = lv["reference"]
        gains = {a: {"grounded_ce": grid.gain(lv["comparisons"], a, "prior", headline_alpha),
                     "probe_accuracy": grid.gain(lv["comparisons"], a, "prior", headline_alpha, "probe_accuracy")}
                 for a in archs}
        rows.append({"reference": _label(lv), "parameters": r["parameters"], "heldout_nll": r["heldout_nll"],
                     "auc_grounded_vs_template": r["auc_grounded_vs_template"], "prior_gain": gains})
        by_kind = " / ".join(f"{r['heldout_nll_by_kind'][k]:.3f}" for k in ("grounded", "template", "unrelated")
                             if k in r["heldout_nll_by_kind"])
        unrelated = r["auc_grounded_vs_unrelated"]
        lines.append(f"| {_label(lv)} | {r['parameters']:,} | {r['heldout_nll']:.3f} ({by_kind}) | "
                     f"{r['auc_grounded_vs_template']:.3f} | {'-' if unrelated is None else f'{unrelated:.3f}'} | "
                     + " | ".join("-" if g["grounded_ce"] is None else
                                  f"{g['grounded_ce']:+.3f}, {g['probe_accuracy']:+.3f}" for g in gains.values())
                     + " |")
    # NTP does not read the reference, and its seeds, data and initial LM are the same at every
    # level: its runs repeat, and any spread between levels is what the grid's numbers carry of
    # run-to-run nondeterminism.
    spread = {}
    for a in archs:
        ntp = [r["metrics"][grid.GROUNDED]["ntp"] for lv in levels for r in lv["comparisons"]
               if r["arch"] == a and r["at"] == "final" and r["declared"]]
        spread[a] = max(ntp) - min(ntp)
    lines += ["", "NTP runs repeat at every level (only the reference differs): their mean final grounded CE spans "
              + ", ".join(f"{v:.2g} nats ({ARCHS[a].display_name})" for a, v in spread.items()) + " between levels."]
    return {"reference_effect": rows, "ntp_spread_between_levels": spread}, lines


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return grid.main(AXIS, sys.argv[1:] if argv is None else argv, prog="megatron_prior.demo.reference_grid",
                     description="Run the demo pipeline with PRIOR's reference at several sizes and compare every "
                                 "weighting with NTP at each.", summary=summary)


if __name__ == "__main__":
    main()
