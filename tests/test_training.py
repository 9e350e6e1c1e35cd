"""Training with `python -m megatron_prior.train`: parallel layouts reproduce the single-process
losses, PRIOR with unit weights is NTP, resume is exact, checkpoints reshard, bad flags stop early."""

import json
import os
import shutil

import numpy as np
import pytest

from megatron_prior.testing import run_on_ranks

pytestmark = pytest.mark.slow

# The optimizer, dropout and EOD settings these tests were written with (the trainer's
# defaults before it took Megatron-LM's): dropout 0 keeps parallel layouts comparable.
LEGACY_DEFAULTS = ["--adam-beta2", "0.95", "--hidden-dropout", "0", "--attention-dropout", "0", "--eod-mask-loss"]

MODEL_FLAGS = {
    "gpt": ["--model", "gpt", "--seq-length", "32"],
    "hlvlm": ["--model", "hlvlm", "--seq-length", "24", "--patch-size", "4", "--vit-hidden-size", "32",
              "--vit-num-attention-heads", "4", "--vit-num-layers", "1"],
    "ulvlm": ["--model", "ulvlm", "--seq-length", "24", "--patch-size", "4"],
}


def _argv(corpus: dict, arch: str, out: str, *extra: str, iters: int = 6) -> list:
    return [*MODEL_FLAGS[arch], "--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--micro-batch-size", "2", "--global-batch-size", "8", "--train-iters", str(iters), "--lr", "3e-3",
            "--lr-warmup-iters", "1", "--data-path", corpus["data"], "--tokenizer-model", corpus["tokenizer"],
            "--split", "90,10,0", "--eval-iters", "0", "--log-interval", "1", "--log-dir", out,
            "--data-cache-path", os.path.join(out, "cache"), *LEGACY_DEFAULTS, *extra]


def _train(argv: list) -> dict:
    from megatron_prior.train import main

    return main(argv)


def _losses(out: str, key: str = "weighted_ce") -> list:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)[key] for line in f]


def _summary(out: str) -> dict:
    with open(os.path.join(out, "summary.json")) as f:
        return json.load(f)


def _assert_same_losses(got: list, ref: list) -> None:
    assert len(got) == len(ref), (got, ref)
    rel = np.abs(np.array(got) - np.array(ref)) / np.abs(np.array(ref))
    assert rel[0] <= 1e-5, f"first iteration differs by {rel[0]:.2e}: {got} vs {ref}"
    assert np.all(rel[1:] <= 1e-4), f"losses differ by up to {rel.max():.2e}: {got} vs {ref}"


@pytest.fixture(scope="module", params=["gpt", "hlvlm", "ulvlm"])
def reference_run(request, tiny_corpus, tmp_path_factory):
    arch = request.param
    out = str(tmp_path_factory.mktemp(f"ref-{arch}"))
    run_on_ranks(_train, 1, _argv(tiny_corpus, arch, out, "--loss", "prior"))
    return arch, _losses(out), _summary(out)["loss_tokens"]


@pytest.mark.parametrize("layout", [
    ["--tensor-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2"],
    ["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"],
    ["--num-workers", "2"],  # DP=2, batches read by DataLoader worker processes
], ids=["TP2", "PP2", "PP2-VPP2", "DP2-workers"])
def test_parallel_layout_matches_single_process(reference_run, tiny_corpus, tmp_path, layout):
    arch, ref, ref_tokens = reference_run
    if "--num-layers-per-virtual-pipeline-stage" in layout and arch != "gpt":
        pytest.skip("virtual pipeline stages are built for GPT only")
    out = str(tmp_path / "run")
    run_on_ranks(_train, 2, _argv(tiny_corpus, arch, out, "--loss", "prior", *layout))
    _assert_same_losses(_losses(out), ref)
    # Counted on the last pipeline stage, summed over data parallel: the same tokens.
    assert _summary(out)["loss_tokens"] == ref_tokens


def _unit_weights_corpus(corpus: dict, dst: str) -> str:
    """A copy of the corpus whose reference log-probs are all -inf... i.e. p = 0, weight 1."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_prior.data.formats import ScoreMetadata, metadata_path
    from megatron_prior.files import sha256_file

    prefix = os.path.join(dst, "unit")
    for ext in (".bin", ".idx", ".images", ".kinds.bin", ".kinds.idx", ".logprobs.idx", ".logprobs.json"):
        shutil.copy(corpus["data"] + ext, prefix + ext)
    scores = IndexedDataset(corpus["data"] + ".logprobs")
    n = sum(len(scores[i]) for i in range(len(scores)))
    # log p = -30: weight (1 - e^-30) ** alpha == 1 in float32, and every caption normalises to 1.
    np.full(n, -30.0, dtype=np.float32).tofile(prefix + ".logprobs.bin")
    # The metadata binds every file by content: bind the new scores.
    meta = ScoreMetadata.load(metadata_path(prefix))
    meta.files["logprobs.bin"] = {"size": os.path.getsize(prefix + ".logprobs.bin"),
                                  "sha256": sha256_file(prefix + ".logprobs.bin")}
    meta.save(metadata_path(prefix))
    return prefix


def test_prior_with_unit_weights_equals_ntp(tiny_corpus, tmp_path):
    data = _unit_weights_corpus(tiny_corpus, str(tmp_path))
    corpus = {**tiny_corpus, "data": data}
    prior, ntp = str(tmp_path / "prior"), str(tmp_path / "ntp")
    run_on_ranks(_train, 1, _argv(corpus, "ulvlm", prior, "--loss", "prior"))
    run_on_ranks(_train, 1, _argv(corpus, "ulvlm", ntp, "--loss", "ntp"))
    _assert_same_losses(_losses(prior), _losses(ntp))


def test_resume_is_exact_and_reshards(tiny_corpus, tmp_path):
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", full, "--loss", "prior", "--tensor-model-parallel-size", "2"))
    # Stop after 3 iterations (a checkpoint is written), then resume at TP=2 and at TP=1.
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, "--loss", "prior", "--tensor-model-parallel-size", "2",
                                  "--save", part, "--save-interval", "3", "--exit-interval", "3"))
    resumed_tp1 = str(tmp_path / "tp1")
    shutil.copytree(part, resumed_tp1)
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, "--loss", "prior", "--tensor-model-parallel-size", "2",
                                  "--save", part, "--load", part))
    _assert_same_losses(_losses(part), _losses(full))
    # The loss-token count travels with the checkpoint: the resumed run counts the whole run.
    assert _summary(part)["loss_tokens"] == _summary(full)["loss_tokens"] > 0
    run_on_ranks(_train, 1, _argv(tiny_corpus, "gpt", resumed_tp1, "--loss", "prior", "--load", resumed_tp1))
    # TP=2 -> TP=1: same weights and optimizer state, so the same losses up to reduction order.
    _assert_same_losses(_losses(resumed_tp1), _losses(full))


def test_resume_is_bitwise_at_megatrons_dropout(tiny_corpus, tmp_path):
    """Dropout 0.1 draws from the CPU generator and the TP tracker's: both are restored, and
    nothing else (the DataLoader's seed draw included) moves them, so the losses are identical."""
    dropout = ["--loss", "prior", "--tensor-model-parallel-size", "2", "--hidden-dropout", "0.1",
               "--attention-dropout", "0.1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", full, *dropout, iters=4))
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, *dropout, "--save", part, "--save-interval", "2",
                                  "--exit-interval", "2", iters=4))
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, *dropout, "--save", part, "--load", part, iters=4))
    assert _losses(part) == _losses(full)


def test_resume_is_exact_with_virtual_pipeline_stages(tiny_corpus, tmp_path):
    """Two model chunks per rank: the checkpoint holds model0/model1 and both resume exactly."""
    vpp = ["--loss", "prior", "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", full, *vpp))
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, *vpp, "--save", part, "--save-interval", "3",
                                  "--exit-interval", "3"))
    run_on_ranks(_train, 2, _argv(tiny_corpus, "gpt", part, *vpp, "--save", part, "--load", part))
    _assert_same_losses(_losses(part), _losses(full))
    # Rank 0, on the first stage where no loss is computed, wrote the count into the checkpoint.
    assert _summary(part)["loss_tokens"] == _summary(full)["loss_tokens"] > 0


def _first_batch_and_scorer_images(argv: list, load: str) -> tuple:
    """The first training micro-batch of ``argv``'s run with its rows' documents, and the
    held-out images evaluation reads for the checkpoint in ``load`` (same corpus)."""
    from functools import partial

    from megatron_prior import parallel
    from megatron_prior.eval.lvlm_scoring import load_scorer
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.data import build_training_data
    from megatron_prior.training.loop import model_config_from_args

    args = parse_args(argv)
    parallel.initialize(seed=args.seed)
    data = build_training_data(args, partial(model_config_from_args, args))
    batch = next(data.train_batches(0))
    rows = [int(data.train.sample_documents[data.train.row_starts[i]]) for i in range(len(batch["images"]))]
    scorer = load_scorer(load, args.tokenizer_model)
    heldout = scorer._caption_dataset(args.data_path[0]).images
    return batch["images"].numpy(), rows, heldout.shape, heldout[rows[0]], scorer.config.image_aspect


def test_training_at_another_image_size_reads_batches_of_that_size(tiny_corpus, tmp_path):
    """--image-size 24 --image-aspect crop on the corpus's 16x16 encoded store: the batches hold
    each caption's stored bytes decoded to 24x24 by crop, the model is built for that and records
    it, and evaluation reads held-out images as the model was trained."""
    from megatron_prior.data import WeightedIndexedDataset
    from megatron_prior.data.images import decode_image

    out = str(tmp_path / "run")
    argv = _argv(tiny_corpus, "ulvlm", out, "--image-size", "24", "--image-aspect", "crop", "--save", out, iters=2)
    run_on_ranks(_train, 1, argv)
    config = _summary(out)["model_config"]
    assert (config["image_size"], config["image_aspect"]) == (24, "crop")
    images, rows, heldout_shape, heldout_first, aspect = run_on_ranks(_first_batch_and_scorer_images, 1, argv, out)[0]
    store = WeightedIndexedDataset(tiny_corpus["data"]).open_images()
    assert store.shape[1:3] == (16, 16) and images.shape == (2, 3, 24, 24)
    for image, doc in zip(images, rows):
        expected = decode_image(store.encoded(doc), 24, 24, "crop")
        np.testing.assert_array_equal(image, expected.astype(np.float32).transpose(2, 0, 1) / 255)
    assert heldout_shape == (len(store), 24, 24, 3) and aspect == "crop"
    np.testing.assert_array_equal(heldout_first, decode_image(store.encoded(rows[0]), 24, 24, "crop"))
    # Unset, the model and the batches take the store's size and rule, as before the flags existed.
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.arguments import parse_args
    from megatron_prior.training.loop import model_config_from_args

    default = parse_args(_argv(tiny_corpus, "ulvlm", out, iters=2), world_size=1)
    config = model_config_from_args(default, load_tokenizer(tiny_corpus["tokenizer"]))
    assert (config.image_size, config.image_aspect) == (16, "pad")


@pytest.mark.parametrize("flags,message", [
    (["--num-attention-heads", "6", "--hidden-size", "36", "--tensor-model-parallel-size", "4"],
     "--num-attention-heads 6 is not divisible by --tensor-model-parallel-size 4"),
    (["--global-batch-size", "6", "--micro-batch-size", "4"],
     "--global-batch-size 6 is not divisible by --micro-batch-size 4"),
    (["--data-path", "/nonexistent/prefix"], "--data-path /nonexistent/prefix: missing /nonexistent/prefix.bin"),
    (["--loss", "prior", "--data-path", "@NOSCORES"], "--loss prior needs reference scores"),
    (["--num-workers", "-1"], "--num-workers must be >= 0, got -1"),
])
def test_bad_flags_stop_before_any_work(tiny_corpus, tmp_path, flags, message):
    from megatron_prior.training.arguments import ArgumentError, build_parser, validate_args

    if "@NOSCORES" in flags:
        prefix = str(tmp_path / "noscores")
        for ext in (".bin", ".idx"):
            shutil.copy(tiny_corpus["data"] + ext, prefix + ext)
        flags = [prefix if f == "@NOSCORES" else f for f in flags]
    argv = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--train-iters", "2",
            "--lr", "1e-3", "--data-path", tiny_corpus["data"], "--tokenizer-model", tiny_corpus["tokenizer"], *flags]
    with pytest.raises(ArgumentError) as err:
        validate_args(build_parser().parse_args(argv), world_size=4)
    assert message in str(err.value)
