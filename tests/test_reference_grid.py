"""The reference-size grid: sizes parsed and refused by name before anything trains, each level's
reference read back from its folder, PRIOR's gain beside the reference's quality by hand, and the
log-scale plot."""

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_prior.demo import grid, pipeline, reference_grid
from megatron_prior.results import RunResult

# Held-out grounded CE of PRIOR alpha 0.5 at each reference width (seed s adds 0.01 s); NTP's is 1.0.
PRIOR_GROUNDED = {32: 0.97, 128: 0.9}


def _runs(width: int) -> list[RunResult]:
    runs = []
    for loss, alpha in (("ntp", None), ("prior", 0.5)):
        for seed in (1, 2):
            ce = (1.0 if loss == "ntp" else PRIOR_GROUNDED[width]) + 0.01 * seed
            metrics = {"heldout_ce_grounded": ce, "heldout_ce_template": 0.2, "heldout_ce_unrelated": 3.0,
                       "probe_accuracy": 0.7 + (0.04 if loss == "prior" and width == 128 else 0.0)}
            runs.append(RunResult(name=f"hlvlm_{loss}_seed{seed}", arch="hlvlm", loss=loss, seed=seed,
                                  prior_alpha=alpha, iterations=200, parameters=1000, flops=1e12,
                                  loss_tokens=64000, heldout=metrics,
                                  checkpoints=[{"iteration": 200, "metrics": dict(metrics)}]))
    return runs


def _level_dir(tmp_path: Path, size: tuple[int, int], separate: bool, parameters: int) -> Path:
    where = tmp_path / f"reference_{size[0]}x{size[1]}"
    ckpt = where / (pipeline.DemoPaths.scoring_reference if separate else pipeline.DemoPaths.reference)
    ckpt.mkdir(parents=True)
    (ckpt / "summary.json").write_text(json.dumps({"parameters": parameters}))
    (where / "results.json").write_text(json.dumps({"reference": {
        "mean_nll_all": 2.0 if separate else 0.9, "mean_nll": {"grounded": 1.9, "template": 1.7, "unrelated": 5.8},
        "auc_grounded_vs_template": 0.6 if separate else 0.89, "auc_grounded_vs_unrelated": 0.01,
        "mean_multiplier": {"0.5": {"grounded": 1.2}}}}))
    return where


def _settings(size: tuple[int, int]) -> pipeline.DemoSettings:
    return pipeline.settings_from_args(pipeline.build_parser().parse_args(
        reference_grid.AXIS.pipeline_args(size) + ["--archs", "hlvlm", "--alphas", "0.5"]))


def _levels(tmp_path: Path) -> list[dict]:
    levels = []
    for size, params in (((1, 32), 29152), ((2, 128), 462336)):
        s = _settings(size)
        level = reference_grid.describe(size, _level_dir(tmp_path, size, s.separate_reference, params), s)
        levels.append({**level, "comparisons": grid.comparisons(_runs(size[1]), 0.5, [])})
    return levels


def test_sizes_parse_as_layers_x_width():
    assert reference_grid.parse_size("4x256") == (4, 256)
    with pytest.raises(argparse.ArgumentTypeError, match="LAYERSxWIDTH, e.g. 2x128; got '4-256'"):
        reference_grid.parse_size("4-256")
    assert reference_grid.AXIS.level_dir(Path("g"), (1, 32)) == Path("g/reference_1x32")


def test_each_level_reads_its_own_reference(tmp_path: Path):
    small, own = _levels(tmp_path)
    assert small["reference"]["parameters"] == 29152 and not small["reference"]["is_lm_init"]
    assert own["reference"]["parameters"] == 462336 and own["reference"]["is_lm_init"]
    assert small["reference"]["heldout_nll"] == 2.0 and own["reference"]["auc_grounded_vs_template"] == 0.89
    assert [reference_grid.AXIS.label(lv) for lv in (small, own)] == ["1x32", "2x128 (LM init)"]


def test_prior_gain_beside_the_reference_by_hand(tmp_path: Path):
    levels = _levels(tmp_path)
    extra, lines = reference_grid.summary(levels, 0.5)
    small, own = extra["reference_effect"]
    assert small["prior_gain"]["hlvlm"]["grounded_ce"] == pytest.approx(0.03)
    assert own["prior_gain"]["hlvlm"]["grounded_ce"] == pytest.approx(0.10)
    assert small["prior_gain"]["hlvlm"]["probe_accuracy"] == pytest.approx(0.0)
    assert own["prior_gain"]["hlvlm"]["probe_accuracy"] == pytest.approx(0.04)
    assert extra["ntp_spread_between_levels"] == {"hlvlm": pytest.approx(0.0)}
    assert "| 2x128 (LM init) | 462,336 | 0.900 (1.900 / 1.700 / 5.800) | 0.890 | 0.010 | +0.100, +0.040 |" in lines
    text = grid.markdown(reference_grid.AXIS, levels, lines, "python -m x", 60.0)
    assert "| 1x32 | H-LVLM | PRIOR α=0.5 | final | 1.015 → 0.985 | -0.030 ± 0.000 (-0.030, -0.030) | -3.0 |" in text


def test_plot_on_a_log_scale_of_parameters(tmp_path: Path):
    levels = _levels(tmp_path)
    path = grid.plot(reference_grid.AXIS, [(reference_grid.AXIS.x(lv), _runs(w)) for lv, w in zip(levels, (32, 128))],
                     tmp_path / "grid.png")
    with Image.open(path) as img:
        assert img.size[0] > 300 and np.asarray(img).std() > 0


@pytest.mark.parametrize("argv, message", [
    (["--", "--reference-hidden-size", "64"], "--reference-hidden-size is set per level by the grid"),
    (["--", "--reference-num-layers=1"], "--reference-num-layers is set per level by the grid"),
    (["--reference-sizes", "2x128", "2x128"], "--reference-sizes repeats a level"),
    (["--reference-sizes", "2x30"], "a width divisible by its 4 attention heads"),
    (["--reference-sizes", "0x64"], "the reference needs >= 1 layer"),
])
def test_bad_arguments_are_refused_before_training(argv, message, tmp_path):
    with pytest.raises(SystemExit, match=message):
        reference_grid.main(["--output-dir", str(tmp_path / "never"), *argv])
    assert not (tmp_path / "never").exists()


def test_a_malformed_size_is_refused_by_argparse(tmp_path, capsys):
    with pytest.raises(SystemExit):
        reference_grid.main(["--output-dir", str(tmp_path / "never"), "--reference-sizes", "2-128"])
    assert "LAYERSxWIDTH, e.g. 2x128; got '2-128'" in capsys.readouterr().err
    assert not (tmp_path / "never").exists()
