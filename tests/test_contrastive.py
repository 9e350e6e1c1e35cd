"""The contrastive (CLIP-style) pre-training of the H-LVLM's vision encoder: the InfoNCE loss
against a float64 reference, retrieval and the linear probe on constructed inputs, a short run
that lowers the loss and saves an encoder the H-LVLM loads through ``--vit-load``, and refusals."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_prior.eval.vision_quality import linear_probe, retrieval
from megatron_prior.loss.contrastive import LOGIT_SCALE_MAX, contrastive_logits, info_nce
from megatron_prior.testing import run_on_ranks

# --- the loss ---------------------------------------------------------------------------------


def _reference_info_nce(image: np.ndarray, text: np.ndarray, logit_scale: float) -> float:
    """Symmetric InfoNCE by hand, float64, one pair at a time."""
    b = image.shape[0]
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    scale = min(math.exp(logit_scale), LOGIT_SCALE_MAX)
    total = 0.0
    for i in range(b):
        row = [scale * float(image[i] @ text[j]) for j in range(b)]     # image i against every caption
        col = [scale * float(image[j] @ text[i]) for j in range(b)]     # caption i against every image
        total += -row[i] + math.log(sum(math.exp(v) for v in row))
        total += -col[i] + math.log(sum(math.exp(v) for v in col))
    return total / (2 * b)


@pytest.mark.parametrize("logit_scale", [math.log(1 / 0.07), math.log(250.0)])  # the second is clamped at 100
def test_info_nce_equals_a_float64_reference(logit_scale):
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    text[2] = image[2] * 3  # one pair aligned: the loss is not at its chance value
    loss = info_nce(contrastive_logits(image, text, torch.tensor(logit_scale)))
    reference = _reference_info_nce(image.double().numpy(), text.double().numpy(), logit_scale)
    # float32 logits of size <= 100 and their log-sum-exp: a few ulps of 100 each.
    assert abs(float(loss) - reference) <= 2e-5 * max(1.0, abs(reference)), (float(loss), reference)
    assert reference != pytest.approx(math.log(6), abs=0.05)


def test_info_nce_is_log_batch_when_every_similarity_is_equal():
    image, text = torch.eye(4), torch.ones(4, 4)  # each caption as close to every image
    logits = contrastive_logits(image, text, torch.tensor(0.0))
    assert torch.allclose(logits, torch.full((4, 4), 0.5))
    assert float(info_nce(logits)) == pytest.approx(math.log(4), abs=1e-6)


# --- retrieval and the probe ------------------------------------------------------------------

def test_retrieval_on_constructed_embeddings():
    images = torch.eye(8)
    texts = torch.eye(8)
    texts[7] = texts[6]   # caption 7 describes image 6; captions 6 and 7 tie for image 6
    r = retrieval(images, texts, ks=(1, 2))
    # image -> text: images 0-5 hit; image 6 ties with caption 7 (a tie counts against); image 7 matches nothing.
    assert r["i2t_top1"] == 6 / 8
    assert r["i2t_top2"] == 7 / 8   # image 6: one rival (caption 7), within the top 2
    # text -> image: captions 0-6 hit (images are distinct); caption 7 finds image 6.
    assert r["t2i_top1"] == 7 / 8
    same = retrieval(torch.ones(5, 3), torch.ones(5, 3))   # identical embeddings carry nothing
    assert same["i2t_top1"] == same["t2i_top1"] == 0.0


COLORS = ("red", "green", "blue", "yellow", "purple")
SHAPES = ("circle", "square", "triangle", "cross")


def _scenes(n: int, seed: int) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"color": rng.choice(COLORS), "shape": rng.choice(SHAPES)} for _ in range(rng.randint(1, 3))]
            for _ in range(n)]


def _presence_features(scenes, seed: int, noise: float) -> np.ndarray:
    """Colour and shape presence, mixed by a random linear map, plus noise: linearly separable."""
    rng = np.random.default_rng(seed)
    x = np.array([[float(any(o["color"] == c for o in s)) for c in COLORS]
                  + [float(any(o["shape"] == h for o in s)) for h in SHAPES] for s in scenes])
    mix = np.random.default_rng(99).normal(size=(x.shape[1], 24))
    return x @ mix + noise * rng.normal(size=(len(scenes), 24))


def test_linear_probe_reads_separable_features_and_not_noise():
    train, test = _scenes(600, 1), _scenes(300, 2)
    separable = linear_probe(_presence_features(train, 3, 0.05), train, _presence_features(test, 4, 0.05), test)
    for group in ("color", "shape"):
        assert separable[group]["accuracy"] >= 0.99 and separable[group]["exact"] >= 0.95, separable[group]
        assert separable[group]["chance"]["accuracy"] < 0.8
    rng = np.random.default_rng(5)
    noise = linear_probe(rng.normal(size=(600, 24)), train, rng.normal(size=(300, 24)), test)
    for group in ("color", "shape"):
        chance = noise[group]["chance"]["accuracy"]
        # 300 test images x 4-5 labels: the binomial spread of a chance-level accuracy is ~0.012.
        assert chance - 0.06 <= noise[group]["accuracy"] <= chance + 0.04, noise[group]
    assert separable["color"]["labels"] == sorted(COLORS)


# --- a short run, the checkpoint through --vit-load, eval-only --------------------------------

def _argv(corpus: dict, save: Path, *extra: str) -> list[str]:
    data = corpus["data"]
    return ["--data-path", data, "--tokenizer-model", corpus["tokenizer"], "--seq-length", "32",
            "--vit-num-layers", "1", "--vit-hidden-size", "32", "--vit-num-attention-heads", "2",
            "--text-num-layers", "1", "--text-hidden-size", "32", "--text-num-attention-heads", "2",
            "--embed-dim", "16", "--micro-batch-size", "32", "--seed", "7", "--log-interval", "5",
            "--eval-data-path", data, "--train-labels", str(Path(corpus["dir"]) / "gen" / "train.jsonl"),
            "--eval-labels", str(Path(corpus["dir"]) / "gen" / "train.jsonl"), "--probe-steps", "50",
            "--no-progress", "--save", str(save), *extra]


def _fixed_batch_loss(model, dataset) -> float:
    rows = [dataset[i] for i in range(64)]
    with torch.no_grad():
        logits = model(torch.stack([r["images"] for r in rows]), torch.stack([r["labels"] for r in rows]),
                       torch.stack([r["loss_mask"] for r in rows]).sum(dim=1).long())
    return float(info_nce(logits))


def _train_and_load(corpus: dict, root: str) -> dict:
    from megatron_prior import parallel
    from megatron_prior.checkpoint import checkpoint_dir, read_model_config
    from megatron_prior.data.caption_dataset import CaptionDataset
    from megatron_prior.models import contrastive
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.train_contrastive import main
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.loop import Trainer

    save = Path(root) / "clip"
    summary = main(_argv(corpus, save, "--train-iters", "80", "--lr", "2e-3", "--lr-warmup-iters", "5"))
    evaluated = main(_argv(corpus, Path(root) / "again", "--eval-only", "--vit-load", str(save)))

    parallel.initialize(seed=7)
    cfg = read_model_config(checkpoint_dir(save))
    trained = contrastive.ContrastiveModel(cfg)
    contrastive.load(trained, save)
    initial = contrastive.ContrastiveModel(cfg)
    initial.initialize(7, 0.02)
    data = CaptionDataset.of_prefix(corpus["data"], load_tokenizer(corpus["tokenizer"]), 32)
    losses = (_fixed_batch_loss(initial, data), _fixed_batch_loss(trained, data))
    row = data[0]
    n = int(row["loss_mask"].sum())
    assert n < 32, "the first caption must leave padding"
    with torch.no_grad():  # causal layers and a masked mean: the padding after a caption changes nothing
        padded = trained.text_embeddings(row["labels"][None], torch.tensor([n]))
        unpadded = trained.text_embeddings(row["labels"][None, :n], torch.tensor([n]))
    padding_effect = float((padded - unpadded).abs().max() / unpadded.abs().max())

    # The H-LVLM trainer with --vit-load: its shape flags come from the checkpoint, its ViT is the encoder.
    args = parse_args(["--model", "hlvlm", "--num-layers", "1", "--hidden-size", "32", "--num-attention-heads", "2",
                       "--seq-length", "32", "--micro-batch-size", "4", "--train-iters", "1", "--lr", "1e-3",
                       "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"], "--split", "100,0,0",
                       "--eval-iters", "0", "--vit-load", str(save), "--freeze-vit",
                       "--data-cache-path", str(Path(root) / "cache")])
    hlvlm = Trainer.build(args).model[0].module.vision_model
    ours, theirs = trained.vision_model.state_dict(), hlvlm.state_dict()
    tensors = [k for k, v in ours.items() if isinstance(v, torch.Tensor)]
    images = torch.stack([data[i]["images"] for i in range(8)])
    with torch.no_grad():
        same_features = torch.equal(trained.vision_model.eval()(images), hlvlm.eval()(images))
    return dict(summary=summary, evaluated=evaluated, losses=losses, padding_effect=padding_effect,
                config=cfg.to_dict(),
                vit_args=(args.vit_num_layers, args.vit_hidden_size, args.vit_num_attention_heads, args.patch_size),
                same_keys=sorted(ours) == sorted(theirs), tensors=len(tensors),
                same_weights=all(torch.equal(ours[k], theirs[k]) for k in tensors), same_features=same_features)


@pytest.fixture(scope="module")
def trained(tiny_corpus, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("contrastive")
    (result,) = run_on_ranks(_train_and_load, 1, tiny_corpus, str(root), timeout=300)
    return {**result, "root": root}


def test_a_short_run_lowers_the_infonce_loss(trained):
    before, after = trained["losses"]   # the same 64 pairs, initial weights vs trained
    # Below chance (log 64: every caption equally likely), not only below a bad start: a model
    # whose embeddings collapse to one point scores exactly log 64.
    assert after < math.log(64) - 0.4 and after < before - 0.4, trained["losses"]
    # float32 sums over 32 instead of n positions: rounding only.
    assert trained["padding_effect"] < 1e-5, trained["padding_effect"]
    first, last = trained["summary"]["first"], trained["summary"]["last"]
    assert last["infonce_loss"] < min(first["infonce_loss"], math.log(32)) - 0.3 and last["iteration"] == 80


def test_the_saved_encoder_is_what_vit_load_reads(trained):
    cfg = trained["config"]
    assert (cfg["arch"], cfg["vit_num_layers"], cfg["vit_hidden_size"], cfg["image_size"]) == ("hlvlm", 1, 32, 16)
    assert cfg["extra"]["contrastive"]["embed_dim"] == 16
    assert trained["vit_args"] == (1, 32, 2, 8)     # the H-LVLM's ViT flags, from model_config.json
    assert trained["same_keys"] and trained["tensors"] > 10
    assert trained["same_weights"] and trained["same_features"]


def test_the_report_and_its_eval_only_round_trip(trained):
    root = trained["root"]
    report = json.loads((root / "clip" / "vision_quality.json").read_text())
    assert report["heldout_images"] == 400 and report["retrieval"]["candidates"] == 400
    assert report["retrieval"]["chance_top1"] == 1 / 400
    for group in ("color", "shape"):
        probe = report["probe"][group]
        assert 0.0 <= probe["chance"]["accuracy"] <= 1.0 and probe["labels"]
    # --eval-only --vit-load on the saved checkpoint restores the text tower too: the same numbers.
    evaluated = json.loads((root / "again" / "vision_quality.json").read_text())
    assert evaluated["retrieval"] == report["retrieval"]
    assert evaluated["probe"] == report["probe"]
    assert evaluated["mode"] == "evaluated as loaded" and "text tower included" in evaluated["encoder"]


# --- refusals -----------------------------------------------------------------------------------

def _refusal(argv: list[str], capsys) -> str:
    from megatron_prior.train_contrastive import parse_args

    with pytest.raises(SystemExit):
        parse_args(argv)
    return capsys.readouterr().err


def test_bad_flags_are_refused_naming_them(tiny_corpus, tmp_path, capsys):
    base = _argv(tiny_corpus, tmp_path / "out", "--train-iters", "2", "--lr", "1e-3")

    def with_(flag: str, value: str) -> list[str]:
        argv = list(base)
        if flag in argv:
            argv[argv.index(flag) + 1] = value
        else:
            argv += [flag, value]
        return argv

    missing = str(tmp_path / "nothing" / "train")
    assert f"--data-path {missing}: missing {missing}.bin" in _refusal(with_("--data-path", missing), capsys)
    assert f"image size 16 (the images of --data-path {tiny_corpus['data']}) is not divisible by --patch-size 6" in \
        _refusal(with_("--patch-size", "6"), capsys)
    assert "image size 12 (--image-size) is not divisible by --patch-size 8" in _refusal(with_("--image-size", "12"),
                                                                                          capsys)
    gone = str(tmp_path / "gone.jsonl")
    assert f"--eval-labels {gone}: no such file" in _refusal(with_("--eval-labels", gone), capsys)
    assert "--micro-batch-size must be at least 2" in _refusal(with_("--micro-batch-size", "1"), capsys)
    assert "--text-hidden-size 32 is not divisible by --text-num-attention-heads 3" in _refusal(
        with_("--text-num-attention-heads", "3"), capsys)
    assert f"--vit-load {tmp_path}: {tmp_path}: no latest_checkpointed_iteration.txt" in _refusal(
        with_("--vit-load", str(tmp_path)), capsys)


def test_labels_that_are_not_the_datas_are_refused(tiny_corpus, tmp_path):
    from megatron_prior.data.caption_dataset import CaptionDataset
    from megatron_prior.data.records import BadRecord
    from megatron_prior.eval.vision_quality import read_scene_labels
    from megatron_prior.tokenizer import load_tokenizer

    data = CaptionDataset.of_prefix(tiny_corpus["data"], load_tokenizer(tiny_corpus["tokenizer"]), 32)
    gen = Path(tiny_corpus["dir"]) / "gen"
    with pytest.raises(BadRecord, match=r"heldout.jsonl:1: the caption does not tokenize to document 0 of "):
        read_scene_labels(gen / "heldout.jsonl", data)
    lines = (gen / "train.jsonl").read_text().splitlines()
    short = tmp_path / "short.jsonl"
    short.write_text("\n".join(lines[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"short.jsonl: 399 records for the 400 documents of "):
        read_scene_labels(short, data)
    swapped = tmp_path / "swapped.jsonl"
    swapped.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")
    with pytest.raises(BadRecord, match=r"swapped.jsonl:1: the caption does not tokenize to document 0"):
        read_scene_labels(swapped, data)
    no_objects = tmp_path / "no_objects.jsonl"
    no_objects.write_text("\n".join([json.dumps({**json.loads(lines[0]), "objects": "red"}), *lines[1:]]) + "\n")
    with pytest.raises(BadRecord, match=r"no_objects.jsonl:1: 'objects' must be a list"):
        read_scene_labels(no_objects, data)
