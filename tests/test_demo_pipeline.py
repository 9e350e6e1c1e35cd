"""``make demo QUICK=1`` end to end: the quick pipeline through every real tool, its report
files (results.json with the issues' schema, results along training and the declared headline,
results.md, the figures), the data it trained on left in the report folder, and a rerun that
skips every finished stage."""

import json
import math

import pytest
from PIL import Image

from megatron_prior.demo import pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    results = pipeline.main(["--quick", "--output-dir", str(out)])
    return out, results


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def test_results_json_schema(demo):
    out, returned = demo
    results = json.loads((out / "results.json").read_text())
    assert results == returned
    assert _is_number(results["reference_auc"]) and 0.5 < results["reference_auc"] <= 1.0
    runs = {(r["arch"], r["loss"], r["prior_alpha"]): r for r in results["runs"]}
    assert set(runs) == {("ulvlm", "ntp", None), ("ulvlm", "prior", 1.0), ("hlvlm", "ntp", None),
                         ("hlvlm", "prior", 1.0)}
    for r in results["runs"]:
        assert r["seed"] == 1 and r["iterations"] == pipeline.QUICK.train_iters
        m = r["metrics"]
        for key in ("heldout_ce_grounded", "heldout_ce_template", "heldout_ce_unrelated", "probe_accuracy",
                    "probe_accuracy_random", "probe_accuracy_popular", "probe_accuracy_adversarial"):
            assert _is_number(m[key]), key
        assert 0.0 <= m["probe_accuracy"] <= 1.0
        assert all(v > 0 for k, v in m.items() if k.startswith("heldout_ce"))
        # Checkpoints at 1/2 and 1 of the run, each evaluated; the last is the run's final numbers.
        assert [c["iteration"] for c in r["checkpoints"]] == [50, 100] and r["checkpoints"][-1]["metrics"] == m
        assert r["checkpoints"][0]["metrics"] != m and r["noise_rate"] == 0.0
    assert results["settings"]["headline"] == {"loss": "prior", "prior_alpha": 1.0, "checkpoint": "final"}
    assert results["settings"]["seed_offset"] == 0 and results["settings"]["save_interval"] == 50
    assert {(h["arch"], h["prior_alpha"], h["at"]) for h in results["headline_comparison"]} == {
        (a, 1.0, at) for a in ("ulvlm", "hlvlm") for at in ("final", "mean_over_checkpoints")}
    assert [e["iteration"] for e in results["along_training"]] == [50, 100]
    assert {p["arch"] for p in results["paired"]} == {"ulvlm", "hlvlm"}
    baseline = results["probe_text_prior_baseline"]
    assert set(baseline) == {"random", "popular", "adversarial", "all"}
    ref = results["reference"]
    assert ref["auc_grounded_vs_template"] == results["reference_auc"]
    assert ref["mean_multiplier"]["1"]["grounded"] > ref["mean_multiplier"]["1"]["template"]


def test_report_files_exist_and_parse(demo):
    out, _ = demo
    md = (out / "results.md").read_text()
    assert "| U-LVLM | NTP |" in md and "| H-LVLM | PRIOR α=1 |" in md and "Probe baseline" in md
    assert "## Headline: PRIOR α=1 − NTP at the final checkpoint" in md and "## Along training" in md
    for name in ("checkpoint_curves.png", "loss_curves.png", "token_weights.png"):
        with Image.open(out / name) as img:
            img.verify()
        assert f"]({name})" in md


def test_training_data_is_left_in_the_report_folder(demo):
    out, _ = demo
    for split in ("train", "heldout"):
        for ext in (".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".logprobs.json", ".kinds.bin", ".kinds.idx",
                    ".images"):
            assert (out / "data" / f"{split}_caption_document{ext}").is_file(), (split, ext)
    assert (out / "data" / "tokenizer.model").is_file()
    for run in json.loads((out / "results.json").read_text())["runs"]:
        assert (out / run["run_dir"] / "eval.json").is_file()
        args = json.loads((out / run["run_dir"] / "summary.json").read_text())
        assert args["iterations"] == pipeline.QUICK.train_iters


def test_rerun_skips_finished_stages(demo, capsys):
    out, first = demo
    second = pipeline.main(["--quick", "--output-dir", str(out)])
    log = capsys.readouterr().out
    assert "start  write the report" in log
    assert [line for line in log.splitlines() if "] start " in line] == \
        [line for line in log.splitlines() if "start  write the report" in line]
    assert second["runs"] == first["runs"] and second["reference_auc"] == first["reference_auc"]


def test_data_only_stops_after_the_scored_benchmark(demo, capsys):
    out, _ = demo
    assert pipeline.main(["--quick", "--output-dir", str(out), "--data-only"]) == {}
    lines = [line for line in capsys.readouterr().out.splitlines() if "] start " in line or "] skip " in line]
    # The demo's reference also scores: no scoring_reference step.
    assert len(lines) == len(pipeline.DATA_STEPS) - 1 and all("] skip " in line for line in lines), lines
    assert not any(word in line for line in lines for word in ("train U-", "train H-", "evaluate", "report")), lines
