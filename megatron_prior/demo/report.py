"""The demo's report: gathers each run's ``eval.json`` and training log, the reference's
separation of token kinds and the probe's text-only baseline, and hands them to
``megatron_prior.eval.report.write_report`` (results.md, results.json, the figures)."""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path
from typing import Optional, Sequence

from megatron_prior.demo.analysis import caption_weights, reference_separation
from megatron_prior.demo.paths import DemoPaths
from megatron_prior.eval.report import METRIC_LABELS, REQUIRED_METRICS, write_report
from megatron_prior.models.arch import ARCHS
from megatron_prior.results import EVAL, SUMMARY, RunResult, load_json, read_run
from megatron_prior.tokenizer import load_tokenizer

# eval.json keys carried into results.json (the table shows those METRIC_LABELS knows).
RUN_METRICS = (*REQUIRED_METRICS, *(m for m in METRIC_LABELS if m not in REQUIRED_METRICS),
               "heldout_ce_other", "heldout_ce")


def load_run(out: Path, spec) -> RunResult:
    """One run's RunResult from ``runs/{name}/summary.json`` and ``eval.json``, checked against
    the run the pipeline asked for."""
    rdir = out / DemoPaths.run_dir(spec.name)
    run = read_run(rdir)
    missing = [k for k in RUN_METRICS if k not in run.heldout]
    if missing:
        raise ValueError(f"{rdir / EVAL}: lacks {', '.join(missing)}")
    for key, got, want in (("model", run.arch, spec.arch), ("loss", run.loss, spec.loss), ("seed", run.seed, spec.seed),
                           ("prior_alpha", run.prior_alpha, spec.alpha)):
        if got != want:
            raise ValueError(f"{rdir / SUMMARY}: {key} is {got!r}, expected {want!r}")
    run.heldout = {k: run.heldout[k] for k in RUN_METRICS}
    if not run.checkpoints or run.checkpoints[-1]["iteration"] != run.iterations:
        raise ValueError(f"{rdir / EVAL}: its last checkpoint is not the run's final iteration {run.iterations}")
    for c in run.checkpoints:
        lacking = [k for k in RUN_METRICS if k not in c["metrics"]]
        if lacking:
            raise ValueError(f"{rdir / EVAL}: checkpoint {c['iteration']} lacks {', '.join(lacking)}")
        c["metrics"] = {k: c["metrics"][k] for k in RUN_METRICS}
    return run


def load_runs(out: Path, specs: Sequence) -> list[RunResult]:
    """``load_run`` of each spec, with the noise rate of the data they trained on (the generator's)."""
    noise_rate = float(load_json(out / DemoPaths.data / "kinds_summary.json")["config"]["noise_rate"])
    return [dataclasses.replace(load_run(out, spec), noise_rate=noise_rate) for spec in specs]


def _step_times(out: Path) -> dict[str, dict]:
    """Wall and CPU seconds of each finished step, from the runner's stamps."""
    times = {}
    for stamp in sorted((out / "logs").glob("*.stamp.json")):
        data = load_json(stamp)
        times[stamp.name.removesuffix(".stamp.json")] = {"seconds": data.get("seconds"),
                                                          "cpu_seconds": data.get("cpu_seconds")}
    return times


def _notes(settings, reference: dict, baseline: dict, data_summary: dict, runs: Sequence[RunResult],
           command: str, started: datetime.datetime, wall_time_s: float, step_times: dict,
           vision: Optional[dict]) -> list[str]:
    frac = data_summary["splits"]["train"]["word_fraction"]
    m1 = reference["mean_multiplier"].get("1") or next(iter(reference["mean_multiplier"].values()))
    params = {r.arch: r.parameters for r in runs}
    reference_layers, reference_width = settings.reference_shape
    notes = [
        f"Command: `{command}`, started {started.strftime('%Y-%m-%d %H:%M %Z')}; this invocation took "
        f"{wall_time_s / 60:.1f} minutes (stages skipped as already done take no time); the stages used "
        f"{sum(t['cpu_seconds'] or 0 for t in step_times.values()) / 60:.1f} CPU minutes in all.",
        f"Data: {settings.num_train} training and {settings.num_heldout} held-out {settings.image_size}x"
        f"{settings.image_size} images of 1-3 shapes; training caption words are {frac['grounded']:.0%} grounded, "
        f"{frac['template']:.0%} template, {frac['unrelated']:.0%} unrelated.",
        f"Models: {settings.num_layers} layers of width {settings.hidden_size} "
        f"({', '.join(f'{a} {p:,} parameters' for a, p in params.items())}), "
        f"{settings.train_iters} iterations of {settings.global_batch_size} captions (seq {settings.seq_length}), "
        f"AdamW lr {settings.lr:g} cosine to {settings.min_lr:g}, a checkpoint every {settings.save_interval} "
        f"iterations, each evaluated. NTP and PRIOR runs of one seed share initialisation and data order.",
        (f"Text-only LMs: the initial language model of every LVLM run (--lm-load) is a GPT of their "
         f"language-model shape; PRIOR's reference is a second GPT of {reference_layers} layers of width "
         f"{reference_width} ({DemoPaths.scoring_reference}); both {settings.reference_iters} iterations of NTP on the "
         "training captions. "
         if settings.separate_reference else
         f"Text-only LM: a GPT of the same language-model shape, {settings.reference_iters} iterations of NTP on the "
         "training captions; it is PRIOR's reference and the initial language model of every LVLM run (--lm-load). ")
        + f"The reference's held-out NLL: {reference['mean_nll_all']:.3f} nats per token; mean reference probability: "
        + ", ".join(f"{k} {v:.2f}" for k, v in reference["mean_reference_probability"].items())
        + "; mean PRIOR multiplier (alpha 1): " + ", ".join(f"{k} {v:.2f}" for k, v in m1.items())
        + (f". Its weights rank unrelated tokens above grounded ones (AUC grounded vs unrelated "
           f"{reference['auc_grounded_vs_unrelated']:.3f}): the reference cannot tell image-dependent from "
           "merely unpredictable." if "auc_grounded_vs_unrelated" in reference else "."),
        f"Training seeds {', '.join(map(str, settings.seeds))} (seed offset {settings.seed_offset}); the "
        f"headline comparison was declared as PRIOR alpha {settings.headline_alpha:g} against NTP at the final "
        "checkpoint (settings.headline), alpha 1 reported beside it.",
        "Probe baseline: a scorer that ignores the image and knows only how often each object occurs in training "
        "scores " + ", ".join(f"{k} {v:.3f}" for k, v in baseline.items())
        + " (below 0.5 on popular/adversarial because the negatives there are the frequent objects); "
          "an image-blind model sits near that level, not at 0.5.",
    ]
    if vision is not None:
        r, probe = vision["retrieval"], vision["probe_patches"]
        notes.append(
            f"The H-LVLM's ViT: {settings.vit_clip_iters} iterations of CLIP-style contrastive pre-training on the "
            f"training pairs, then frozen. On the {r['candidates']} held-out images: caption retrieval top-1 "
            f"{r['i2t_top1']:.3f} image->text, {r['t2i_top1']:.3f} text->image (chance {r['chance_top1']:.4f}); "
            "linear probes of which colours and shapes are present, on its patch features: colour "
            f"{probe['color']['accuracy']:.3f} (chance {probe['color']['chance']['accuracy']:.3f}), shape "
            f"{probe['shape']['accuracy']:.3f} (chance {probe['shape']['chance']['accuracy']:.3f}) "
            "(runs/vit_clip/vision_quality.json).")
    blind: dict[str, list[int]] = {}
    for r in runs:
        if r.heldout["probe_accuracy_popular"] <= baseline["popular"] + 0.05:
            blind.setdefault(f"{ARCHS[r.arch].display_name} {r.variant}", []).append(r.seed)
    if blind:
        notes.append("Runs whose popular-split probe accuracy is within 0.05 of that baseline, i.e. that have not "
                     f"yet learned to read the image at {settings.train_iters} iterations: "
                     + "; ".join(f"{k} (seed {', '.join(map(str, v))})" for k, v in blind.items()) + ".")
    return notes


def write_demo_report(out: Path, settings, specs: Sequence, command: str, started: datetime.datetime,
                      wall_time_s: float) -> dict[str, Path]:
    """Write the report files into ``out``; returns what ``write_report`` wrote."""
    out = Path(out)
    tokenizer = load_tokenizer(str(out / DemoPaths.tokenizer))
    heldout = str(out / DemoPaths.documents(DemoPaths.prefix("heldout")))
    runs = load_runs(out, specs)
    data_summary = load_json(out / DemoPaths.data / "kinds_summary.json")
    reference = reference_separation(heldout, tokenizer, sorted({1.0, *settings.alphas}, reverse=True))
    captions = caption_weights(heldout, out / DemoPaths.data / "heldout.jsonl", tokenizer, settings.alphas[0])
    baseline = data_summary["probe"]["pair_frequency_baseline"]
    step_times = _step_times(out)
    quality = out / DemoPaths.vit_clip / "vision_quality.json"
    vision = load_json(quality) if quality.is_file() else None  # no H-LVLM in --archs: no encoder
    extra = {
        "vision_encoder": vision,
        "reference": reference,
        "probe_text_prior_baseline": baseline,
        "data": {"splits": data_summary["splits"], "heldout_scenes_seen_in_train":
                 data_summary["heldout_scenes_seen_in_train"]},
        "settings": {**dataclasses.asdict(settings), "headline": settings.headline,
                     "save_interval": settings.save_interval},
        "command": command,
        "started": started.isoformat(timespec="seconds"),
        "wall_time_s": wall_time_s,
        "step_times": step_times,
    }
    return write_report(out, runs, reference["auc_grounded_vs_template"], captions=captions,
                        weight_label=f"PRIOR multiplier m (alpha {settings.alphas[0]:g})",
                        notes=_notes(settings, reference, baseline, data_summary, runs, command, started,
                                     wall_time_s, step_times, vision),
                        extra=extra, headline=settings.headline)
