"""The demo pipeline's settings and the commands it builds, without running them: --seed-offset
moves every LVLM training seed and nothing else, each LVLM run saves checkpoints at fixed
fractions and each is evaluated, the declared headline, and bad flags refused by name."""

import pytest

from megatron_prior.demo import pipeline


def _steps(*argv: str) -> tuple[pipeline.DemoSettings, dict[str, list[str]]]:
    settings = pipeline.settings_from_args(pipeline.build_parser().parse_args(list(argv)))
    return settings, {s.name: s.command for s in pipeline.build_steps(settings, lambda: None)}


def _flag(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def test_seed_offset_moves_only_the_lvlm_training_seeds():
    base, plain = _steps()
    settings, shifted = _steps("--seed-offset", "3")
    assert base.seeds == (1, 2, 3) and base.seed_offset == 0
    assert settings.seeds == (4, 5, 6) and settings.seed_offset == 3
    trains = sorted(n for n in shifted if n.startswith("train_"))
    assert len(trains) == 3 * 2 * 3  # seeds x archs x (NTP + 2 alphas)
    for name in trains:
        seed = int(name.rsplit("seed", 1)[1])
        assert seed in (4, 5, 6) and _flag(shifted[name], "--seed") == str(seed)
        # The same command as seed - 3 of the plain demo, but for the seed and the run's folder.
        old = name.replace(f"seed{seed}", f"seed{seed - 3}")
        moved = [a.replace(f"seed{seed}", f"seed{seed - 3}") for a in shifted[name]]
        moved[moved.index("--seed") + 1] = str(seed - 3)
        assert moved == plain[old]
    for name in ("data", "tokenizer", "text_data", "reference", "score_train", "score_heldout", "vit_clip"):
        assert shifted[name] == plain[name], name
    assert _flag(shifted["reference"], "--seed") == _flag(shifted["vit_clip"], "--seed") == "1234"


def test_default_is_offset_zero():
    assert _steps() == _steps("--seed-offset", "0")
    quick, steps = _steps("--quick", "--seeds", "2", "--seed-offset", "5")
    assert quick.seeds == (6, 7) and "train_ulvlm_ntp_seed6" in steps and "train_ulvlm_ntp_seed7" in steps


@pytest.mark.parametrize("argv,interval,iters", [((), 50, 200), (("--quick",), 50, 100),
                                                 (("--train-iters", "301"), 76, 301),
                                                 (("--quick", "--num-checkpoints", "1"), 100, 100)])
def test_checkpoints_at_fixed_fractions_each_evaluated(argv, interval, iters):
    settings, steps = _steps(*argv)
    assert settings.save_interval == interval
    for name, argv_ in steps.items():
        if name.startswith("train_"):
            assert _flag(argv_, "--save-interval") == str(interval) and _flag(argv_, "--train-iters") == str(iters)
        elif name.startswith("eval_"):
            assert "--all-checkpoints" in argv_
    # The pre-training runs save once, at their end.
    assert "--save-interval" not in steps["reference"] and "--save-interval" not in steps["vit_clip"]


def test_headline_is_declared():
    assert _steps()[0].headline == {"loss": "prior", "prior_alpha": 0.5, "checkpoint": "final"}
    assert _steps("--quick")[0].headline == {"loss": "prior", "prior_alpha": 1.0, "checkpoint": "final"}
    assert _steps("--alphas", "1", "2", "--headline-alpha", "2")[0].headline["prior_alpha"] == 2.0


@pytest.mark.parametrize("argv,message", [
    (("--seed-offset", "-1"), "seed offset must be >= 0"),
    (("--headline-alpha", "2"), "headline alpha 2 is not among the PRIOR alphas run"),
    (("--alphas", "1"), "give --headline-alpha"),
    (("--num-checkpoints", "0"), "num_checkpoints must be between 1 and train_iters"),
])
def test_bad_settings_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit, match=message):
        pipeline.main([*argv, "--output-dir", "/nonexistent/never-made"])


def test_every_lvlm_starts_from_the_text_only_reference():
    """The reference has the LVLMs' language-model shape and is every LVLM run's --lm-load."""
    _, steps = _steps()
    shape = ("--num-layers", "--hidden-size", "--num-attention-heads")
    trains = [n for n in steps if n.startswith("train_")]
    assert trains
    for name in trains:
        assert _flag(steps[name], "--lm-load") == str(pipeline.DemoPaths.reference), name
        assert [_flag(steps[name], f) for f in shape] == [_flag(steps["reference"], f) for f in shape], name
    assert "--lm-load" not in steps["reference"] and "--lm-load" not in steps["vit_clip"]


def test_noise_rate_reaches_the_generator_and_is_checked():
    _, clean = _steps()
    settings, noisy = _steps("--noise-rate", "0.3")
    assert settings.noise_rate == 0.3 and _flag(noisy["data"], "--noise-rate") == "0.3"
    assert _flag(clean["data"], "--noise-rate") == "0"
    with pytest.raises(SystemExit, match=r"noise rate must be in \[0, 1\]"):
        pipeline.main(["--noise-rate", "1.5", "--output-dir", "/nonexistent/never-made"])


def test_other_losses_add_runs_and_the_image_scorer_only_when_needed():
    settings, steps = _steps("--other-losses", "mi", "rho1", "cal")
    assert len([n for n in steps if n.startswith("train_")]) == 3 * 2 * 6
    scorer, score = steps["image_scorer"], steps["score_images"]
    assert _flag(scorer, "--model") == "hlvlm" and _flag(scorer, "--seed") == str(settings.data_seed)
    assert _flag(scorer, "--vit-load") == str(pipeline.DemoPaths.vit_clip) and "--freeze-vit" in scorer
    assert _flag(scorer, "--lm-load") == str(pipeline.DemoPaths.reference)
    assert _flag(scorer, "--loss") == "ntp" and _flag(score, "--load") == str(pipeline.DemoPaths.image_scorer)
    runs = {s.name: s for s in pipeline.build_steps(settings, lambda: None)}
    assert "vit_clip" in runs["image_scorer"].deps
    for name in ("train_ulvlm_mi_seed1", "train_hlvlm_cal_seed2", "train_ulvlm_rho1_seed3", "train_hlvlm_ntp_seed1"):
        assert "score_images" in runs[name].deps, name  # scoring rewrites the metadata every run reads
    assert _flag(steps["train_hlvlm_rho1_seed1"], "--loss") == "rho1"
    _, rho1_only = _steps("--other-losses", "rho1")
    assert "image_scorer" not in rho1_only and "score_images" not in rho1_only
    # Without an H-LVLM run the scorer still needs the CLIP-style encoder: it is trained.
    _, u_only = _steps("--archs", "ulvlm", "--other-losses", "mi")
    assert {"vit_clip", "image_scorer"} <= set(u_only) and _flag(u_only["image_scorer"], "--model") == "hlvlm"
    with pytest.raises(SystemExit):
        pipeline.main(["--other-losses", "prior", "--output-dir", "/nonexistent/never-made"])


def test_the_report_waits_for_the_vision_encoder_report():
    steps = {s.name: s for s in pipeline.build_steps(_steps()[0], lambda: None)}
    assert "vit_quality" in steps["report"].deps and "vit_clip" in steps["vit_quality"].deps
    assert steps["vit_clip"].deps == ["text_data"]  # trained beside the reference, not after it
    only_u = {s.name: s for s in pipeline.build_steps(_steps("--archs", "ulvlm")[0], lambda: None)}
    assert "vit_quality" not in only_u and "vit_quality" not in only_u["report"].deps


def test_a_reference_of_another_size_only_scores():
    """--reference-num-layers/--reference-hidden-size: a second text-only GPT of that shape scores
    both splits (and so weighs PRIOR, Rho-1 and MI), trained like the first but for its shape,
    while every LVLM and the image scorer still start from the first."""
    _, plain = _steps("--other-losses", "mi")
    settings, steps = _steps("--other-losses", "mi", "--reference-num-layers", "1", "--reference-hidden-size", "32")
    assert settings.separate_reference and settings.reference_shape == (1, 32)
    ref, scorer = steps["reference"], steps["scoring_reference"]
    assert ref == plain["reference"]
    assert (_flag(scorer, "--num-layers"), _flag(scorer, "--hidden-size")) == ("1", "32")
    moved = [a.replace("scoring_reference", "reference") for a in scorer]
    for flag, value in (("--num-layers", "2"), ("--hidden-size", "128")):
        moved[moved.index(flag) + 1] = value
    assert moved == ref  # the same data, seed, iterations and schedule
    for split in ("train", "heldout"):
        assert _flag(steps[f"score_{split}"], "--reference-load") == str(pipeline.DemoPaths.scoring_reference)
    graph = {s.name: s for s in pipeline.build_steps(settings, lambda: None)}
    assert graph["score_train"].deps == ["scoring_reference"]
    for name in ("train_ulvlm_prior0p5_seed1", "train_hlvlm_ntp_seed2", "image_scorer"):
        assert _flag(steps[name], "--lm-load") == str(pipeline.DemoPaths.reference), name
        assert "reference" in graph[name].deps, name
    # The LVLMs' own shape is the plain demo: one text-only GPT in both roles.
    same, steps_same = _steps("--other-losses", "mi", "--reference-num-layers", "2", "--reference-hidden-size", "128")
    assert not same.separate_reference and steps_same == plain and "scoring_reference" not in plain
    data_only = [s.name for s in pipeline.build_steps(settings, lambda: None) if s.name in pipeline.DATA_STEPS]
    assert data_only == ["data", "tokenizer", "text_data", "reference", "scoring_reference", "score_train",
                         "score_heldout"]


@pytest.mark.parametrize("argv", [("--reference-hidden-size", "30"), ("--reference-num-layers", "0")])
def test_a_reference_shape_that_cannot_be_built_is_refused(argv):
    with pytest.raises(SystemExit, match="the reference needs >= 1 layer and a width divisible by its 4 attention"):
        pipeline.main([*argv, "--output-dir", "/nonexistent/never-made"])
