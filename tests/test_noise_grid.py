"""The caption-noise grid: comparisons of each weighting with NTP per level, the MI target
by hand, the plot, and bad arguments refused before anything trains."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_prior.demo import grid, noise_grid
from megatron_prior.results import RunResult

# Held-out grounded CE of each (noise rate, loss) at seed s: base + 0.01 s; NTP's is 1.0.
GROUNDED = {0.0: {"ntp": 1.0, "prior": 0.9, "mi": 0.92},
            0.3: {"ntp": 1.0, "prior": 0.98, "mi": 0.94}}


def _runs(rate: float) -> list[RunResult]:
    runs = []
    for loss, alpha in (("ntp", None), ("prior", 0.5), ("mi", None)):
        for seed in (1, 2, 3):
            metrics = {"heldout_ce_grounded": GROUNDED[rate][loss] + 0.01 * seed, "heldout_ce_template": 0.2,
                       "heldout_ce_unrelated": 3.0, "probe_accuracy": 0.7 + (0.05 if loss != "ntp" else 0.0)}
            ckpts = [{"iteration": 100, "metrics": {k: v + 0.1 for k, v in metrics.items()}},
                     {"iteration": 200, "metrics": dict(metrics)}]
            runs.append(RunResult(name=f"hlvlm_{loss}_seed{seed}", arch="hlvlm", loss=loss, seed=seed,
                                  prior_alpha=alpha, iterations=200, parameters=1000, flops=1e12, loss_tokens=64000,
                                  heldout=metrics, checkpoints=ckpts, noise_rate=rate))
    return runs


def _levels() -> list[dict]:
    return [{"noise_rate": r, "output_dir": f"noise_{r}", "comparisons": grid.comparisons(_runs(r), 0.5, ["mi"])}
            for r in (0.0, 0.3)]


def test_each_weighting_is_paired_with_ntp_at_each_level():
    rows = _levels()[1]["comparisons"]
    assert [(r["loss"], r["prior_alpha"], r["at"]) for r in rows] == [
        ("prior", 0.5, "final"), ("prior", 0.5, "mean_over_checkpoints"), ("mi", None, "final"),
        ("mi", None, "mean_over_checkpoints")]
    mi = rows[2]["metrics"]["heldout_ce_grounded"]
    assert mi["difference"]["per_seed"] == pytest.approx([-0.06] * 3)
    assert mi["percent_change"] == pytest.approx(100 * -0.06 / 1.02)


def test_mi_target_by_hand():
    (target,) = noise_grid.mi_target(_levels(), 0.5).values()
    # PRIOR: 0.10 nats clean, 0.02 at 30 %; MI 0.06 at 30 % >= half of 0.10.
    assert target["prior_gain_clean"] == pytest.approx(0.10)
    assert target["prior_gain_noisy"] == pytest.approx(0.02)
    assert target["mi_gain_noisy"] == pytest.approx(0.06)
    assert target["prior_loses_its_gain"] and target["met"]
    GROUNDED[0.3]["mi"] = 0.96  # 0.04 < 0.05: not met
    try:
        (target,) = noise_grid.mi_target(_levels(), 0.5).values()
        assert not target["met"]
    finally:
        GROUNDED[0.3]["mi"] = 0.94


def test_the_target_needs_a_clean_and_a_noisy_level():
    assert noise_grid.mi_target(_levels()[:1], 0.5) == {}
    assert noise_grid.mi_target(_levels()[1:], 0.5) == {}


def test_markdown_and_plot(tmp_path: Path):
    levels = _levels()
    text = grid.markdown(noise_grid.AXIS, levels, noise_grid.summary(levels, 0.5)[1], "python -m x", 90.0)
    assert "| 30 % | H-LVLM | MI | final | 1.020 → 0.960 | -0.060 ± 0.000 (-0.060, -0.060, -0.060) | -5.9 |" in text
    assert "MI's +0.060 there: **met**" in text
    path = grid.plot(noise_grid.AXIS, [(r, _runs(r)) for r in (0.0, 0.3)], tmp_path / "grid.png")
    with Image.open(path) as img:
        assert img.size[0] > 300 and np.asarray(img).std() > 0


@pytest.mark.parametrize("argv, message", [
    (["--", "--noise-rate", "0.1"], "--noise-rate is set per level by the grid"),
    (["--", "--output-dir=/tmp/x"], "--output-dir is set per level by the grid"),
    (["--noise-rates", "0", "0"], "--noise-rates repeats a level"),
    (["--noise-rates", "1.5"], "--noise-rates must be in"),
    (["--noise-rates", "0.15", "0.151"], "two levels would share a folder"),
    (["--", "--alphas", "2"], "leaves out the preset's headline alpha"),
])
def test_bad_arguments_are_refused_before_training(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        noise_grid.main(["--output-dir", str(tmp_path / "never"), *argv])
    assert not (tmp_path / "never").exists()
