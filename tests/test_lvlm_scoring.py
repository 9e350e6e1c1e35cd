"""LVLM evaluation: the per-token CE it reads is the model's own cross-entropy at the right
combined positions (float64 reference from the logits), the probe's caption path and the
held-out dataset path agree caption by caption, batching and padding change nothing, kind
counts are exact, and the command-line tool writes eval.json from a saved checkpoint, and with
--all-checkpoints each saved checkpoint's numbers in training order."""

import json
import os

import numpy as np
import pytest
import torch

from megatron_prior.testing import run_on_ranks

pytestmark = pytest.mark.slow  # one spawned rank that builds, scores, saves and reloads four models

TEXT_LENGTH = 24  # shorter than many captions: both paths must cut them the same way
NUM_DOCS = 12


def _config(arch: str, tok):
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.training.loop import padded_vocab_size

    return ModelConfig(arch=arch, num_layers=2, hidden_size=32, num_attention_heads=4,
                       vocab_size=padded_vocab_size(tok.vocab_size, 1), max_position_embeddings=None,
                       seq_length=TEXT_LENGTH, tokenizer_fingerprint=tok.fingerprint, image_size=16, patch_size=8,
                       image_token_id=tok.image_token_id, vit_hidden_size=32, vit_num_attention_heads=4,
                       image_start_id=tok.image_start_id, image_row_id=tok.image_row_id,
                       image_end_id=tok.image_end_id)


def _reference_ce(model, images, batch, offset) -> torch.Tensor:
    """CE of label j from the logits at combined position offset + j, in float64."""
    # Without labels every vision-language model returns logits, whatever its architecture.
    logits = model(images, batch["tokens"], batch["position_ids"], None)
    s = batch["labels"].shape[1]
    logits = logits[:, offset:offset + s].double()
    return torch.logsumexp(logits, -1) - logits.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)


def _work(corpus: dict, ckpt_root: str) -> dict:
    from megatron_prior import parallel
    from megatron_prior.data.images import load_image
    from megatron_prior.eval import run as eval_run
    from megatron_prior.eval.lvlm_scoring import LVLMScorer
    from megatron_prior.eval.probe import load_probe_items, probe_accuracy
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.init import initialize_weights
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.checkpointing import save_checkpoint

    root = corpus["dir"]
    tok = load_tokenizer(corpus["tokenizer"])
    records = [json.loads(line) for line in open(os.path.join(root, "gen/train.jsonl"))][:NUM_DOCS]
    paths = [os.path.join(root, "gen", r["image"]) for r in records]
    captions = [r["caption"] for r in records]
    items = load_probe_items(os.path.join(root, "gen/probe.jsonl"))[:30]
    out = {}
    parallel.initialize(seed=3)
    try:
        for arch in ("ulvlm", "hlvlm"):
            cfg = _config(arch, tok)
            if arch == "ulvlm":
                # An earlier checkpoint of other weights, for --all-checkpoints; a save interrupted
                # later (iter_*.tmp) is not a checkpoint.
                early = build_model(cfg)
                initialize_weights(early, seed=12, std=0.3, num_layers=cfg.num_layers)
                early.eval()
                sums = LVLMScorer(early, cfg, tok, batch_size=5).heldout_kind_sums(corpus["data"])
                out["early_kind_means"] = (sums[:, 0] / sums[:, 1]).tolist()
                save_checkpoint(os.path.join(ckpt_root, arch), 3, [early], cfg)
                os.makedirs(os.path.join(ckpt_root, arch, "iter_0000009.tmp"))
            model = build_model(cfg)
            # A wide init spreads the logits, so a misaligned position would show.
            initialize_weights(model, seed=11, std=0.3, num_layers=cfg.num_layers)
            model.eval()
            scorer = LVLMScorer(model, cfg, tok, batch_size=5)
            r = out[arch] = {"ln_pre": (float(model.vision_model.ln_pre.weight.min()),
                                        float(model.vision_model.ln_pre.weight.max())) if arch == "hlvlm" else None}

            ids = [tok.tokenize(c) + [tok.eod] for c in captions[:5]]
            batch = scorer.text_batch(ids)
            images = torch.stack([scorer.image_tensor(p) for p in paths[:5]])
            ce = scorer.per_token_ce(images, batch)
            with torch.no_grad():
                ref = _reference_ce(model, images, batch, scorer.image_offset)
            mask = batch["loss_mask"].bool()
            r["max_ce_error"] = float((ce.double() - ref)[mask].abs().max())
            r["mask_lengths"] = batch["loss_mask"].sum(1).tolist()
            r["caption_lengths"] = [len(i) for i in ids]
            r["image_matches_loader"] = bool(np.allclose(
                scorer.image_tensor(paths[0]).numpy(), load_image(paths[0], 16, 16).transpose(2, 0, 1) / 255.0))

            # The held-out path (the preprocessed corpus, training's layout), caption by caption.
            dataset = scorer._caption_dataset(corpus["data"])
            samples = np.flatnonzero(np.asarray(dataset.sample_documents) < NUM_DOCS)  # the split is shuffled
            docs = [dataset[int(i)] for i in samples]
            order = [int(dataset.sample_documents[i]) for i in samples]
            dbatch = {k: torch.stack([d[k] for d in docs]) for k in docs[0]}
            dce = scorer.per_token_ce(dbatch.pop("images"), dbatch)
            r["dataset_sums"] = dict(zip(order, (dce * dbatch["loss_mask"]).sum(1).double().tolist()))
            r["caption_logprobs_b5"] = scorer.caption_logprobs(paths, captions)
            scorer.batch_size = 7
            r["caption_logprobs_b7"] = scorer.caption_logprobs(paths, captions)
            one = LVLMScorer(model, cfg, tok, batch_size=1)
            r["caption_logprobs_b1"] = one.caption_logprobs(paths[:3], captions[:3])

            sums = scorer.heldout_kind_sums(corpus["data"])
            r["kind_counts"] = sums[:, 1].tolist()
            r["kind_means"] = (sums[:, 0] / sums[:, 1]).tolist()
            r["probe_batched"] = scorer.probe(items)
            r["probe_simple"] = probe_accuracy(lambda image, caption: one.caption_logprobs([image], [caption])[0],
                                               items)
            save_checkpoint(os.path.join(ckpt_root, arch), 5, [model], cfg)
    finally:
        parallel.destroy()
    for arch in ("ulvlm", "hlvlm"):
        load = os.path.join(ckpt_root, arch)
        out[arch]["cli"] = eval_run.main(["--load", load, "--tokenizer-model", corpus["tokenizer"],
                                          "--data-path", corpus["data"], "--probe", os.path.join(root, "gen/probe.jsonl"),
                                          "--output", os.path.join(load, "eval.json"), "--no-progress"])
        out[arch]["cli_file"] = json.loads(open(os.path.join(load, "eval.json")).read())
    # Both runs in one process: each file as its own process wrote it.
    loads = [os.path.join(ckpt_root, arch) for arch in ("ulvlm", "hlvlm")]
    eval_run.main(["--load", *loads, "--tokenizer-model", corpus["tokenizer"], "--data-path", corpus["data"],
                   "--probe", os.path.join(root, "gen/probe.jsonl"),
                   "--output", *(os.path.join(d, "eval_together.json") for d in loads), "--no-progress"])
    out["together"] = [json.loads(open(os.path.join(d, "eval_together.json")).read()) for d in loads]
    load = os.path.join(ckpt_root, "ulvlm")
    out["all"] = eval_run.main(["--load", load, "--tokenizer-model", corpus["tokenizer"], "--data-path", corpus["data"],
                                "--output", os.path.join(load, "eval_all.json"), "--all-checkpoints", "--no-progress"])
    return out


@pytest.fixture(scope="module")
def scored(tiny_corpus, tmp_path_factory):
    (result,) = run_on_ranks(_work, 1, tiny_corpus, str(tmp_path_factory.mktemp("ckpt")), timeout=400)
    return result


@pytest.mark.parametrize("arch", ["ulvlm", "hlvlm"])
def test_per_token_ce_is_the_cross_entropy_of_the_aligned_logits(scored, arch):
    r = scored[arch]
    assert r["max_ce_error"] < 1e-4
    assert r["mask_lengths"] == [min(n, TEXT_LENGTH) for n in r["caption_lengths"]]
    assert max(r["caption_lengths"]) > TEXT_LENGTH, "the test must exercise truncation"
    assert r["image_matches_loader"]


@pytest.mark.parametrize("arch", ["ulvlm", "hlvlm"])
def test_probe_path_equals_dataset_path_and_ignores_batching(scored, arch):
    r = scored[arch]
    dataset = [r["dataset_sums"][i] for i in range(NUM_DOCS)]
    np.testing.assert_allclose(r["caption_logprobs_b5"], [-x for x in dataset], rtol=0, atol=1e-4)
    np.testing.assert_allclose(r["caption_logprobs_b7"], r["caption_logprobs_b5"], rtol=0, atol=1e-4)
    np.testing.assert_allclose(r["caption_logprobs_b1"], r["caption_logprobs_b5"][:3], rtol=0, atol=1e-4)


@pytest.mark.parametrize("arch", ["ulvlm", "hlvlm"])
def test_probe_deduplicated_batches_equal_one_caption_at_a_time(scored, arch):
    assert scored[arch]["probe_batched"] == scored[arch]["probe_simple"]


def test_kind_counts_are_exact(scored, tiny_corpus):
    from megatron_prior.data.weighted_dataset import WeightedIndexedDataset

    ds = WeightedIndexedDataset(tiny_corpus["data"])
    expected = np.zeros(4)
    for i in range(len(ds)):
        start, end = ds.sequence_offsets[i], ds.sequence_offsets[i + 1]
        kinds = np.asarray(ds.kind_array[start:min(end, start + TEXT_LENGTH)])
        expected += np.bincount(kinds, minlength=4)
    assert scored["ulvlm"]["kind_counts"] == expected.tolist() == scored["hlvlm"]["kind_counts"]


def test_hlvlm_vision_layer_norm_starts_at_one(scored):
    # A ViT whose ln_pre weight is initialised like a matrix (~0) passes no image on.
    assert scored["hlvlm"]["ln_pre"] == (1.0, 1.0)


@pytest.mark.parametrize("arch", ["ulvlm", "hlvlm"])
def test_cli_writes_eval_json(scored, arch):
    r = scored[arch]
    ev = r["cli_file"]
    assert ev == json.loads(json.dumps(r["cli"]))
    assert ev["arch"] == arch and ev["iteration"] == 5
    for key in ("heldout_ce_grounded", "heldout_ce_template", "heldout_ce_unrelated", "heldout_ce",
                "probe_accuracy", "probe_accuracy_random", "probe_accuracy_popular", "probe_accuracy_adversarial"):
        assert isinstance(ev[key], float) and np.isfinite(ev[key]), key
    assert [ev[f"heldout_tokens_{k}"] for k in ("other", "grounded", "template", "unrelated")] == r["kind_counts"]
    # The checkpoint round trip gives back the model scored in-process.
    means = [ev[f"heldout_ce_{k}"] for k in ("other", "grounded", "template", "unrelated")]
    np.testing.assert_allclose(means, r["kind_means"], rtol=1e-6)
    assert 0.0 <= ev["probe_accuracy"] <= 1.0


def test_cli_evaluates_every_checkpoint_in_order(scored):
    ev = scored["all"]
    assert [c["iteration"] for c in ev["checkpoints"]] == [3, 5] and ev["iteration"] == 5
    kinds = ("other", "grounded", "template", "unrelated")
    early = [ev["checkpoints"][0]["metrics"][f"heldout_ce_{k}"] for k in kinds]
    np.testing.assert_allclose(early, scored["early_kind_means"], rtol=1e-6)
    final = ev["checkpoints"][1]["metrics"]
    np.testing.assert_allclose([final[f"heldout_ce_{k}"] for k in kinds], scored["ulvlm"]["kind_means"], rtol=1e-6)
    assert all(ev[k] == v for k, v in final.items())
    assert abs(early[1] - final["heldout_ce_grounded"]) > 1e-3  # two different models, not one read twice


def test_cli_refuses_nothing_to_do(tmp_path):
    from megatron_prior.eval import run as eval_run

    with pytest.raises(SystemExit):
        eval_run.main(["--load", str(tmp_path), "--tokenizer-model", "x", "--output", str(tmp_path / "e.json")])


def test_cli_evaluates_several_runs_in_one_process_as_each_alone(scored):
    for arch, together in zip(("ulvlm", "hlvlm"), scored["together"]):
        alone = scored[arch]["cli_file"]
        assert together.keys() == alone.keys()
        assert {k: v for k, v in together.items() if k != "wall_time_s"} == \
            {k: v for k, v in alone.items() if k != "wall_time_s"}, arch


def test_cli_refuses_outputs_that_do_not_pair_with_loads(tmp_path, capsys):
    from megatron_prior.eval import run as eval_run

    with pytest.raises(SystemExit):
        eval_run.main(["--load", str(tmp_path / "a"), str(tmp_path / "b"), "--tokenizer-model", "x",
                       "--probe", "p.jsonl", "--output", str(tmp_path / "e.json")])
    assert "2 --load directories but 1 --output files" in capsys.readouterr().err
