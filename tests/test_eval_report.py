"""The report writer: results.json with issue 6's schema, results.md, the PNGs, all parse;
bad run results are refused; a failed write leaves the previous file intact; results along
training (checkpoints) and the declared headline comparison, numbers by hand."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_prior.files import atomic_write_json, atomic_write_text, atomic_write_with
from megatron_prior.eval.report import CaptionWeights, write_report
from megatron_prior.results import ResultError, RunResult, read_run

METRICS = ("heldout_ce_grounded", "heldout_ce_template", "heldout_ce_unrelated", "probe_accuracy")


def _metrics_jsonl(path: Path, loss: str, seed: int) -> Path:
    rows = []
    for it in range(10, 210, 10):
        g = 3 * math.exp(-it / (100 if loss == "ntp" else 70)) + 0.3 + 0.01 * seed
        t = 2 * math.exp(-it / 50) + 0.1
        rows.append({"iteration": it, "weighted_ce": g, "ce": (g + t) / 2, "ce_grounded": g, "ce_template": t,
                     "positions_per_s": 1e4, "lr": 1e-3, "grad_norm": 1.0})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _runs(tmp_path: Path, seeds=(1, 2, 3), logs=True) -> list[RunResult]:
    runs = []
    for arch in ("ulvlm", "hlvlm"):
        for loss, alpha in (("ntp", None), ("prior", 1.0)):
            for seed in seeds:
                base = 0.6 if loss == "ntp" else 0.5
                metrics = {"heldout_ce_grounded": base + 0.01 * seed, "heldout_ce_template": 0.1,
                           "heldout_ce_unrelated": 3.0, "probe_accuracy": 1.0 - base + 0.001 * seed,
                           "probe_accuracy_popular": 0.4}
                log = _metrics_jsonl(tmp_path / f"{arch}-{loss}-{seed}.jsonl", loss, seed) if logs else None
                runs.append(RunResult(name=f"{arch}_{loss}_seed{seed}", arch=arch, loss=loss, seed=seed,
                                      prior_alpha=alpha, iterations=200, parameters=1000, flops=1e12,
                                      loss_tokens=64000, heldout=metrics, run_dir=tmp_path / "runs" / arch,
                                      metrics_jsonl=log))
    return runs


def _captions(tmp_path: Path) -> list[CaptionWeights]:
    img = tmp_path / "img.png"
    Image.fromarray(np.full((32, 32, 3), 90, dtype=np.uint8)).save(img)
    tokens = ["▁a", "▁photo", "▁of", "▁two", "▁shapes", ":", "▁a", "▁red", "▁cir", "cle", "."]
    kinds = ["template"] * 3 + ["grounded", "template", "template", "template", "grounded", "grounded",
                                "grounded", "template"]
    weights = [0.1, 0.2, 0.05, 2.0, 0.3, 0.0, 0.1, 2.5, 3.0, 1.0, 0.1]
    return [CaptionWeights(tokens, weights, kinds, img), CaptionWeights(tokens[:5], weights[:5])]


def test_report_files_exist_and_parse(tmp_path):
    out = tmp_path / "report"
    written = write_report(out, _runs(tmp_path), 0.9875, captions=_captions(tmp_path),
                           notes=["a note"], extra={"config": {"train_iters": 200}})
    assert set(written) == {"results_json", "results_md", "loss_curves", "token_weights"}
    doc = json.loads((out / "results.json").read_text())
    assert doc["reference_auc"] == 0.9875 and doc["config"] == {"train_iters": 200}
    assert len(doc["runs"]) == 12
    for run in doc["runs"]:  # issue 6's schema, exactly typed
        assert run["arch"] in ("ulvlm", "hlvlm") and run["loss"] in ("ntp", "prior")
        assert isinstance(run["seed"], int)
        assert all(isinstance(run["metrics"][m], float) for m in METRICS)
    ntp = next(s for s in doc["summary"] if (s["arch"], s["loss"]) == ("ulvlm", "ntp"))
    assert ntp["seeds"] == [1, 2, 3]
    assert ntp["metrics"]["heldout_ce_grounded"]["mean"] == pytest.approx(0.62)
    assert ntp["metrics"]["heldout_ce_grounded"]["sd"] == pytest.approx(0.01)
    (paired,) = [p for p in doc["paired"] if p["arch"] == "hlvlm"]
    assert paired["prior_minus_ntp"]["heldout_ce_grounded"] == pytest.approx({"mean": -0.1, "sd": 0.0, "n": 3})
    assert doc["runs"][0]["run_dir"] == "../runs/ulvlm" and doc["runs"][0]["loss_tokens"] == 64000
    assert paired["prior_minus_ntp"]["probe_accuracy"]["mean"] == pytest.approx(0.1)

    md = (out / "results.md").read_text()
    assert "0.988" in md and "| U-LVLM | NTP | 1, 2, 3 | 0.620 ± 0.010 |" in md
    assert "| H-LVLM | PRIOR α=1 | 1, 2, 3 | -0.100 ± 0.000 |" in md
    assert "- a note" in md and "![Training curves](loss_curves.png)" in md
    for name, min_size in (("loss_curves.png", (800, 600)), ("token_weights.png", (800, 150))):
        with Image.open(out / name) as im:
            im.load()
            assert im.format == "PNG" and im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
            assert np.asarray(im.convert("L")).std() > 5  # not blank
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_single_seed_without_logs_or_captions(tmp_path):
    written = write_report(tmp_path, _runs(tmp_path, seeds=(5,), logs=False), 0.5)
    assert set(written) == {"results_json", "results_md"}
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["summary"][0]["metrics"]["probe_accuracy"]["sd"] is None
    assert "| U-LVLM | NTP | 5 | 0.650 |" in (tmp_path / "results.md").read_text()


@pytest.mark.parametrize("change,message", [
    (lambda r: setattr(r[0], "arch", "vit"), "arch must be one of"),
    (lambda r: setattr(r[0], "loss", "rho2"), "loss must be one of"),
    (lambda r: r[0].heldout.pop("probe_accuracy"), "lack probe_accuracy"),
    (lambda r: r[0].heldout.update(probe_accuracy=float("nan")), "finite"),
    (lambda r: setattr(r[0], "prior_alpha", 1.0), "prior_alpha"),
    (lambda r: r.append(r[0]), "repeat"),
    (lambda r: setattr(r[0], "metrics_jsonl", None), "every run or none"),
])
def test_bad_runs_are_refused(tmp_path, change, message):
    runs = _runs(tmp_path, seeds=(1,))
    change(runs)
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "out", runs, 0.9)
    assert not (tmp_path / "out" / "results.json").exists()


def test_bad_metrics_log_and_captions_are_refused(tmp_path):
    runs = _runs(tmp_path, seeds=(1,))
    runs[0].metrics_jsonl.write_text('{"iteration": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"ulvlm-ntp-1.jsonl:2: not JSON"):
        write_report(tmp_path / "out", runs, 0.9)
    with pytest.raises(ValueError, match="caption 0: 2 tokens but 1 weights"):
        write_report(tmp_path / "out", _runs(tmp_path, seeds=(1,)), 0.9,
                     captions=[CaptionWeights(["▁a", "▁b"], [1.0])])
    with pytest.raises(ValueError, match="reference_auc"):
        write_report(tmp_path / "out", _runs(tmp_path, seeds=(1,)), 1.5)


def test_failed_write_keeps_the_previous_file(tmp_path):
    target = tmp_path / "results.md"
    atomic_write_text(target, "old")

    def half_then_fail(f):
        f.write(b"half of the new")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write_with(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["results.md"]


def test_json_refuses_nan_unless_allowed(tmp_path):
    target = tmp_path / "summary.json"
    with pytest.raises(ValueError, match="Out of range float values are not JSON compliant"):
        atomic_write_json(target, {"loss": float("nan")})
    assert not target.exists() and not list(tmp_path.iterdir())
    atomic_write_json(target, {"loss": float("nan")}, allow_nan=True)
    assert target.read_text() == '{\n  "loss": NaN\n}\n'


def test_caption_weights_from_offsets():
    caption = "a photo of 3 small."
    starts = [0, 2, 4, 8, 11, 11, 13, 18]  # "photo" split in two; a lone "▁" piece before "3"
    cw = CaptionWeights.from_offsets(caption, starts, [1.0] * 8)
    assert cw.tokens == ["▁a", "▁ph", "oto", "▁of", "▁", "▁3", "▁small", "."]
    with pytest.raises(ValueError, match="ascending"):
        CaptionWeights.from_offsets(caption, [0, 5, 3], [1.0] * 3)


def _with_checkpoints(runs: list[RunResult]) -> list[RunResult]:
    """Each run also evaluated at iteration 100, where every number is twice its final one."""
    for r in runs:
        r.checkpoints = [{"iteration": 100, "metrics": {k: 2 * v for k, v in r.heldout.items()}},
                         {"iteration": 200, "metrics": dict(r.heldout)}]
    return runs


def test_checkpoints_along_training_and_headline(tmp_path):
    runs = _with_checkpoints(_runs(tmp_path, logs=False))
    # PRIOR alpha 0.5: grounded CE 0.05 below NTP's where alpha 1 is 0.1 below.
    runs += [dataclasses.replace(r, prior_alpha=0.5, checkpoints=[dict(c) for c in r.checkpoints],
                                 heldout={**r.heldout, "heldout_ce_grounded": r.heldout["heldout_ce_grounded"] + 0.05})
             for r in runs if r.loss == "prior"]
    for r in runs[-6:]:
        r.checkpoints[-1] = {"iteration": 200, "metrics": dict(r.heldout)}
    out = tmp_path / "report"
    written = write_report(out, runs, 0.9, headline={"loss": "prior", "prior_alpha": 0.5, "checkpoint": "final"})
    assert set(written) == {"results_json", "results_md", "checkpoint_curves"}
    doc = json.loads((out / "results.json").read_text())
    for run in doc["runs"]:
        assert [c["iteration"] for c in run["checkpoints"]] == [100, 200]
        assert run["checkpoints"][-1]["metrics"] == run["metrics"] and run["noise_rate"] == 0.0
    assert [e["iteration"] for e in doc["along_training"]] == [100, 200]
    early = next(p for p in doc["along_training"][0]["paired"] if (p["arch"], p["prior_alpha"]) == ("ulvlm", 1.0))
    assert early["prior_minus_ntp"]["heldout_ce_grounded"]["mean"] == pytest.approx(-0.2)

    rows = {(r["arch"], r["prior_alpha"], r["at"]): r for r in doc["headline_comparison"]}
    assert len(rows) == 8 and all(r["declared"] == (r["prior_alpha"] == 0.5) for r in rows.values())
    final = rows[("hlvlm", 0.5, "final")]["metrics"]["heldout_ce_grounded"]
    assert final["ntp"] == pytest.approx(0.62) and final["prior"] == pytest.approx(0.57)
    assert final["difference"]["per_seed"] == pytest.approx([-0.05] * 3)
    assert final["percent_change"] == pytest.approx(-0.05 / 0.62 * 100)
    # Mean over checkpoints: NTP (2 x + x) / 2 = 1.5 x; PRIOR alpha 0.5 (2 (x - 0.1) + x - 0.05) / 2.
    mean = rows[("ulvlm", 0.5, "mean_over_checkpoints")]["metrics"]["heldout_ce_grounded"]
    assert mean["ntp"] == pytest.approx(0.93) and mean["difference"]["mean"] == pytest.approx(-0.125)
    assert rows[("ulvlm", 1.0, "final")]["metrics"]["probe_accuracy"]["difference"]["mean"] == pytest.approx(0.1)

    md = (out / "results.md").read_text()
    assert "## Headline: PRIOR α=0.5 − NTP at the final checkpoint" in md
    assert "| U-LVLM | PRIOR α=0.5 (declared) | final checkpoint (200) | 1, 2, 3 | 0.620 → 0.570 |" in md
    assert "| H-LVLM | PRIOR α=1 | mean over checkpoints (100, 200) |" in md
    assert "| U-LVLM | PRIOR α=1 | 100 | 1, 2, 3 | 1.040 ± 0.020 |" in md
    assert "![Held-out results along training](checkpoint_curves.png)" in md
    with Image.open(out / "checkpoint_curves.png") as im:
        assert im.size[0] >= 800 and np.asarray(im.convert("L")).std() > 5


@pytest.mark.parametrize("change,message", [
    (lambda r: r.checkpoints.reverse(), "ascend"),
    (lambda r: r.checkpoints[-1]["metrics"].update(probe_accuracy=0.0), "last checkpoint"),
    (lambda r: r.checkpoints[0]["metrics"].pop("heldout_ce_template"), "lack heldout_ce_template"),
])
def test_bad_checkpoints_are_refused(tmp_path, change, message):
    runs = _with_checkpoints(_runs(tmp_path, seeds=(1,), logs=False))
    change(runs[0])
    with pytest.raises(ValueError, match=message):
        write_report(tmp_path / "out", runs, 0.9)


def test_headline_needs_its_runs(tmp_path):
    with pytest.raises(ValueError, match="headline PRIOR α=0.5: no H-LVLM run of it shares a seed with the NTP runs"):
        write_report(tmp_path / "out", _runs(tmp_path, seeds=(1,), logs=False), 0.9,
                     headline={"loss": "prior", "prior_alpha": 0.5, "checkpoint": "final"})
    assert not (tmp_path / "out" / "results.json").exists()


def test_read_run_takes_checkpoints_from_eval_json(tmp_path):
    summary = {"model": "ulvlm", "loss": "ntp", "seed": 1, "iterations": 200, "parameters": 10, "flops": 1.0,
               "loss_tokens": 5, "image_positions": 0, "padding_positions": 0}
    atomic_write_json(tmp_path / "summary.json", summary)
    final = {"heldout_ce_grounded": 0.5, "probe_accuracy": 0.75}
    ckpts = [{"iteration": 100, "metrics": {"heldout_ce_grounded": 0.9, "probe_accuracy": 0.5}},
             {"iteration": 200, "metrics": final}]
    atomic_write_json(tmp_path / "eval.json", {**final, "iteration": 200, "checkpoints": ckpts})
    assert read_run(tmp_path).checkpoints == ckpts
    atomic_write_json(tmp_path / "eval.json", {**final, "iteration": 200, "checkpoints": ckpts[::-1]})
    with pytest.raises(ResultError, match="eval.json: checkpoint iterations must ascend"):
        read_run(tmp_path)
    atomic_write_json(tmp_path / "eval.json", {**final, "probe_accuracy": 0.7, "iteration": 200, "checkpoints": ckpts})
    with pytest.raises(ResultError, match="the last of 'checkpoints' must be the evaluated checkpoint"):
        read_run(tmp_path)
    atomic_write_json(tmp_path / "eval.json", final)  # one evaluated checkpoint: no list
    assert read_run(tmp_path).checkpoints == []
