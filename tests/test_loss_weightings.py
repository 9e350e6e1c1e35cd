"""The token weightings besides PRIOR: --loss mi, rho1 and cal.

Each weighting equals a float64 reference computed by hand on a tiny batch (MI's floor, CAL's
clamp, both normalised per caption; Rho-1's selection and mean); MI with an image-blind scorer and
Rho-1 at ratio 1 are NTP exactly; tools/score_with_images.py writes sidecars equal to a direct
forward pass of the checkpoint, bound to the tokens (a foreign or unbound sidecar is refused by
name); and the trainer runs each loss end to end.
"""

import math
import os
import shutil

import numpy as np
import pytest
import torch

from megatron_prior.data import packing
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.loss.loss_func import make_loss_func
from megatron_prior.testing import run_on_ranks

EOD, PAD = 0, 1
# Three captions ending in EOD (a PAD in the second: not a loss token); no EOD masking, as the
# caption datasets train.
TOKENS = np.array([5, 6, 7, EOD, 8, PAD, 9, 10, 11, EOD, 12, EOD], dtype=np.uint16)
OFFSETS = np.array([0, 4, 10, 12], dtype=np.int64)
REF = np.array([-0.1, -2.0, -0.5, -3.0, -1.0, -0.2, -4.0, -0.01, -2.5, -0.3, -1.5, -0.7], dtype=np.float32)
IMG = np.array([-0.05, -0.5, -0.6, -1.0, -1.2, -0.1, -0.5, -0.02, -0.4, -0.3, -1.6, -0.1], dtype=np.float32)
DELTA = np.array([0.3, 2.5, 7.0, -1.0, 1.0, 3.0, 5.0, 4.9, 0.0, 6.0, 1.5, 2.0], dtype=np.float32)


def _by_hand(w: np.ndarray) -> np.ndarray:
    """Per-caption normalisation in float64: m_i = n_c w_i / sum_c w over the loss tokens."""
    keep = TOKENS != PAD
    m = np.zeros(len(TOKENS))
    for lo, hi in zip(OFFSETS[:-1], OFFSETS[1:]):
        k = keep[lo:hi]
        m[lo:hi][k] = k.sum() * w[lo:hi][k] / w[lo:hi][k].sum()
    return m


def _packed(weighting, scores, minus, path):
    """The multipliers of every token, by the numpy reference or the C++ packer (one sample)."""
    scales_fn = packing.document_scales_numpy if path == "numpy" else packing.document_scales
    pack_fn = packing.pack_batch_numpy if path == "numpy" else packing.pack_batch
    kwargs = {} if path == "numpy" else {"num_threads": 2}
    # Weight j belongs to label j, token j + 1: a one-token document in front makes every caption
    # token a label of the one sample, which runs from it to the last caption's last token.
    tokens = np.concatenate([[EOD], TOKENS]).astype(np.uint16)
    offsets = np.concatenate([[0], OFFSETS + 1])
    front = lambda a: None if a is None else np.concatenate([[0], a]).astype(np.float32)  # noqa: E731
    scales = scales_fn(tokens, front(scores), offsets, weighting, EOD, False, PAD, minus=front(minus), **kwargs)
    sample_index = np.array([[0, 0], [3, OFFSETS[-1] - OFFSETS[-2] - 1]], dtype=np.int64)
    _, w = pack_fn(tokens, front(scores), offsets, scales, np.arange(4, dtype=np.int32), sample_index,
                   np.array([0]), len(TOKENS), weighting, EOD, False, PAD, minus=front(minus), **kwargs)
    return w[0].astype(np.float64)


PATHS = ["numpy"] + (["cpp"] if packing.HAVE_EXTENSION else [])


@pytest.mark.parametrize("path", PATHS)
def test_mi_weights_are_floored_pmi_normalised_per_caption(path):
    floor = 0.2
    w = np.maximum(IMG.astype(np.float64) - REF.astype(np.float64), floor)
    got = _packed(packing.Weighting("mi", floor=floor), IMG, REF, path)
    np.testing.assert_allclose(got, _by_hand(w), rtol=2.0 ** -23, atol=0)  # float32 rounding of m only
    assert (w == floor).sum() >= 3, "the floor must be exercised"


@pytest.mark.parametrize("path", PATHS)
def test_cal_weights_are_the_clamped_logit_gap_normalised_per_caption(path):
    w = np.clip(DELTA.astype(np.float64), 1.0, 5.0)
    got = _packed(packing.Weighting("cal"), DELTA, None, path)
    np.testing.assert_allclose(got, _by_hand(w), rtol=2.0 ** -23, atol=0)
    assert (DELTA < 1).sum() >= 2 and (DELTA > 5).sum() >= 2, "both clamp bounds must be exercised"


@pytest.mark.parametrize("path", PATHS)
def test_mi_with_an_image_blind_scorer_is_ntp_exactly(path):
    """pmi <= floor everywhere: every weight is the floor, every multiplier exactly 1, so the loss
    is NTP's bit for bit."""
    rng = np.random.default_rng(0)
    blind = (REF + rng.uniform(-2.0, 0.1, len(REF))).astype(np.float32)  # pmi in [-2, 0.1]
    m = _packed(packing.Weighting("mi", floor=0.1), blind, REF, path)
    loss_mask = (TOKENS != PAD).astype(np.float64)
    assert np.array_equal(m, loss_mask)
    ce = torch.from_numpy(rng.uniform(0, 6, (1, len(TOKENS))).astype(np.float32))
    batch = {"loss_mask": torch.from_numpy(loss_mask).float()[None], "loss_weights": torch.from_numpy(m).float()[None]}
    mi, ntp = make_loss_func("mi")(batch, ce), make_loss_func("ntp")(batch, ce)
    assert torch.equal(mi[0], ntp[0]) and torch.equal(mi[1], ntp[1])


def test_weighting_settings_are_refused_out_of_range():
    with pytest.raises(ValueError, match=r"the MI floor must be a finite number > 0, got 0.0"):
        packing.Weighting("mi", floor=0.0)
    with pytest.raises(ValueError, match="unknown weighting 'pmi'"):
        packing.Weighting("pmi")
    with pytest.raises(ValueError, match=r"weighting 'mi' needs second scores"):
        packing.document_scales_numpy(TOKENS, IMG, OFFSETS, packing.Weighting("mi"), EOD, False, PAD)
    for ratio in (0.0, 1.5, math.nan):
        with pytest.raises(ValueError, match=r"the Rho-1 ratio must lie in \(0, 1\]"):
            make_loss_func("rho1", rho1_ratio=ratio)


def _rho1_batch(seed=0, b=3, s=9):
    g = torch.Generator().manual_seed(seed)
    mask = (torch.rand(b, s, generator=g) > 0.3).float()
    batch = {"loss_mask": mask, "ref_logprobs": -torch.rand(b, s, generator=g) * 4 * mask,
             "token_kinds": torch.randint(0, len(KIND_NAMES), (b, s), generator=g)}
    return batch, torch.rand(b, s, generator=g) * 5


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.77])
def test_rho1_keeps_the_top_excess_loss_tokens_and_averages_over_them(ratio):
    batch, ce = _rho1_batch()
    ce.requires_grad_()
    loss_sum, count, logs = make_loss_func("rho1", kind_names=KIND_NAMES, rho1_ratio=ratio)(batch, ce)
    # By hand in float64: excess = L_model - L_ref = ce + log p_ref over the loss tokens.
    mask = batch["loss_mask"].numpy().reshape(-1).astype(bool)
    c, ref = ce.detach().double().numpy().reshape(-1), batch["ref_logprobs"].double().numpy().reshape(-1)
    loss_positions = np.flatnonzero(mask)
    k = math.ceil(ratio * len(loss_positions))
    kept = loss_positions[np.argsort(-(c + ref)[loss_positions], kind="stable")[:k]]
    assert int(count) == k and count.dtype == torch.int32
    np.testing.assert_allclose(float(loss_sum.detach()), c[kept].sum(), rtol=1e-6)
    np.testing.assert_allclose(logs["weighted_ce"].tolist(), [c[kept].sum(), k], rtol=1e-6)
    # The plain CE still logs every loss token.
    np.testing.assert_allclose(logs["ce"].tolist(), [c[mask].sum(), mask.sum()], rtol=1e-6)
    loss_sum.backward()
    expected = np.zeros(len(c))
    expected[kept] = 1.0
    assert np.array_equal(ce.grad.numpy().reshape(-1), expected)


def test_rho1_at_ratio_one_is_ntp_exactly():
    batch, ce = _rho1_batch(seed=1)
    grads = []
    results = []
    for name in ("rho1", "ntp"):
        x = ce.clone().requires_grad_()
        out = make_loss_func(name, kind_names=KIND_NAMES, rho1_ratio=1.0)(batch, x)
        out[0].backward()
        results.append(out)
        grads.append(x.grad)
    (r_sum, r_count, r_logs), (n_sum, n_count, n_logs) = results
    assert torch.equal(r_sum, n_sum) and torch.equal(r_count, n_count) and torch.equal(grads[0], grads[1])
    assert r_logs.keys() == n_logs.keys() and all(torch.equal(r_logs[k], n_logs[k]) for k in r_logs)


# --- the scorer, the sidecars and training, on the tiny corpus ------------------------------

REFERENCE_DOCS = 7  # compared one caption at a time with the tool's batches of 3


def _copy_dataset(src: str, dst_dir: str, name: str) -> str:
    from megatron_prior.data.formats import all_files

    os.makedirs(dst_dir, exist_ok=True)
    prefix = os.path.join(dst_dir, name)
    for src_path, dst_path in zip(all_files(src), all_files(prefix)):
        if os.path.exists(src_path):
            shutil.copy(src_path, dst_path)
    return prefix


def _score_work(corpus: dict, data: str, ckpt: str) -> dict:
    """Save a tiny U-LVLM, score ``data`` with the tool, and recompute the first captions' scores
    directly from the reloaded checkpoint in float64, one caption at a time."""
    import dataclasses
    import importlib.util

    from megatron_prior import parallel
    from megatron_prior.eval.lvlm_scoring import LVLMScorer
    from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.config import ModelConfig
    from megatron_prior.models.init import initialize_weights
    from megatron_prior.models.pretrained import load_inference_model
    from megatron_prior.tokenizer import load_tokenizer
    from megatron_prior.training.checkpointing import save_checkpoint
    from megatron_prior.training.loop import padded_vocab_size

    tok = load_tokenizer(corpus["tokenizer"])
    ds = WeightedIndexedDataset(data)
    seq = int(np.max(ds.sequence_lengths))
    cfg = ModelConfig(arch="ulvlm", num_layers=2, hidden_size=32, num_attention_heads=4,
                      vocab_size=padded_vocab_size(tok.vocab_size, 1), max_position_embeddings=None,
                      seq_length=seq, tokenizer_fingerprint=tok.fingerprint, image_size=16, patch_size=8,
                      image_token_id=tok.image_token_id, image_start_id=tok.image_start_id,
                      image_row_id=tok.image_row_id, image_end_id=tok.image_end_id)
    parallel.initialize(seed=3)
    try:
        model = build_model(cfg)
        # A wide init spreads the logits, so a misaligned position or a wrong logit would show.
        initialize_weights(model, seed=11, std=0.3, num_layers=cfg.num_layers)
        save_checkpoint(ckpt, 4, [model], cfg)
    finally:
        parallel.destroy()
    tools = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
    spec = importlib.util.spec_from_file_location("score_with_images", os.path.join(tools, "score_with_images.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    meta = tool.main(["--data-path", data, "--load", ckpt, "--tokenizer-model", corpus["tokenizer"],
                      "--micro-batch-size", "3", "--no-progress"])
    parallel.initialize()
    try:
        model, cfg = load_inference_model(ckpt)
        store = ds.open_images()
        ref = {"imglogprobs": [], "imgdelta": []}
        with torch.no_grad():
            for d in range(REFERENCE_DOCS):
                caption = torch.from_numpy(np.asarray(ds.tokens[d], dtype=np.int64))
                tokens = torch.cat([torch.tensor([tok.image_token_id]), caption[:-1]])[None]
                positions = torch.arange(tokens.shape[1])[None]
                image = torch.from_numpy(np.asarray(store[d], dtype=np.float32).transpose(2, 0, 1) / 255.0)[None]
                with_image = model(image, tokens, positions, None)[0, cfg.image_offset:].double()
                text_only = model.language_model(input_ids=tokens, position_ids=positions,
                                                 attention_mask=None)[0].double()
                rows = torch.arange(len(caption))
                target = with_image[rows, caption]
                ref["imglogprobs"].append((target - torch.logsumexp(with_image, -1)).numpy())
                ref["imgdelta"].append((target - text_only[rows, caption]).numpy())
        # The H-LVLM through the same scorer: its log-probs are minus training's cross-entropy.
        hcfg = dataclasses.replace(cfg, arch="hlvlm", vit_hidden_size=32, vit_num_attention_heads=4)
        hlvlm = build_model(hcfg)
        initialize_weights(hlvlm, seed=5, std=0.3, num_layers=hcfg.num_layers)
        hlvlm.eval()
        scorer = LVLMScorer(hlvlm, hcfg, tok, batch_size=4)
        batch = scorer.text_batch([ds.tokens[d] for d in range(4)])
        images = torch.stack([scorer.pixels_tensor(store[d]) for d in range(4)])
        mask = batch["loss_mask"].bool()
        scores = scorer.token_scores(images, batch)
        hlvlm_error = float((scores["imglogprobs"] + scorer.per_token_ce(images, batch))[mask].abs().max())
        hlvlm_gap = float(scores["imgdelta"][mask].abs().max())
    finally:
        parallel.destroy()
    return {"ref": ref, "image_scorer": meta.image_scorer, "seq": seq, "hlvlm_error": hlvlm_error,
            "hlvlm_gap": hlvlm_gap}


@pytest.fixture(scope="module")
def scored(tiny_corpus, tmp_path_factory):
    root = str(tmp_path_factory.mktemp("weightings"))
    data = _copy_dataset(tiny_corpus["data"], os.path.join(root, "scored"), "train")
    ckpt = os.path.join(root, "scorer")
    (result,) = run_on_ranks(_score_work, 1, tiny_corpus, data, ckpt, timeout=400)
    return {**result, "data": data, "ckpt": ckpt, "root": root}


@pytest.mark.slow  # spawned ranks: the scorer's checkpoint, then training
def test_scorer_sidecars_equal_a_direct_forward_pass(scored):
    from megatron_prior.data.formats import IMAGE_SCORE_VALUES
    from megatron_prior.data.weighted_dataset import WeightedIndexedDataset

    ds = WeightedIndexedDataset(scored["data"])  # verified: the new metadata binds the sidecars
    assert ds.metadata.has_image_scores and scored["image_scorer"]["values"] == IMAGE_SCORE_VALUES
    assert scored["image_scorer"]["type"] == "ulvlm" and len(scored["image_scorer"]["checkpoint_sha256"]) == 64
    for name in ("imglogprobs", "imgdelta"):
        for d in range(REFERENCE_DOCS):
            lo, hi = ds.sequence_offsets[d], ds.sequence_offsets[d + 1]
            # float32 logits: the tool's float32 log-softmax against float64 of the same logits.
            np.testing.assert_allclose(ds.score_arrays[name][lo:hi], scored["ref"][name][d], rtol=0, atol=2e-5,
                                       err_msg=f"{name} of caption {d}")
    assert np.abs(np.asarray(ds.score_arrays["imgdelta"])).max() > 0.5, "the two passes must differ"
    # H-LVLM: the scorer's log-probs against the training cross-entropy of the same logits.
    assert scored["hlvlm_error"] <= 1e-5 and scored["hlvlm_gap"] > 0.5


@pytest.mark.slow  # spawned ranks: the scorer's checkpoint, then training
def test_foreign_and_unbound_image_sidecars_are_refused(scored, tiny_corpus, tmp_path):
    from megatron_prior.data.formats import FormatError
    from megatron_prior.data.weighted_dataset import WeightedIndexedDataset

    # Another dataset's image scores in place of this one's own: refused by content.
    other = _blind_dataset(tiny_corpus, str(tmp_path / "other"))
    shutil.copy(scored["data"] + ".imglogprobs.bin", other + ".imglogprobs.bin")
    with pytest.raises(FormatError, match=r"content differs from what .*logprobs.json binds") as err:
        WeightedIndexedDataset(other)
    assert err.value.path == other + ".imglogprobs.bin"
    # Image scores beside a dataset whose metadata binds none: refused as leftovers.
    plain = _copy_dataset(tiny_corpus["data"], str(tmp_path / "plain"), "train")
    for ext in (".imglogprobs.bin", ".imglogprobs.idx"):
        shutil.copy(scored["data"] + ext, plain + ext)
    with pytest.raises(FormatError, match="not bound by") as err:
        WeightedIndexedDataset(plain)
    assert err.value.path in (plain + ".imglogprobs.bin", plain + ".imglogprobs.idx")


def _blind_dataset(corpus: dict, folder: str) -> str:
    """A copy of the corpus whose image scores are the reference's own log-probs (pmi 0 <= floor
    everywhere) and a zero logit gap: an image-blind scorer, through the sidecar writer."""
    from megatron_prior.data.weighted_dataset import WeightedIndexedDataset
    from megatron_prior.data.writer import ImageScoreWriter

    prefix = _copy_dataset(corpus["data"], folder, "train")
    ds = WeightedIndexedDataset(prefix)
    with ImageScoreWriter(prefix, ds.metadata, ds.sequence_lengths, ds.document_indices) as writer:
        for d in range(len(ds)):
            lp = np.asarray(ds.logprobs[d])
            writer.add_document({"imglogprobs": lp, "imgdelta": np.zeros_like(lp)})
        writer.finalize({"type": "test", "note": "image-blind: the reference's own log-probs"})
    return prefix


def _train_runs(runs: list) -> list:
    """Several tiny trainings in one process (each initialises and tears down its own parallel state)."""
    from megatron_prior.train import main

    return [main(argv) for argv in runs]


@pytest.mark.slow  # spawned ranks: the scorer's checkpoint, then training
def test_training_with_each_new_loss(scored, tiny_corpus, tmp_path):
    """mi, rho1 and cal train end to end and write summary.json; MI on the image-blind scorer's
    data trains as NTP, loss for loss."""
    import json

    from tests.test_training import _argv

    blind = _blind_dataset(tiny_corpus, str(tmp_path / "blind"))
    scored_corpus = {**tiny_corpus, "data": scored["data"]}
    blind_corpus = {**tiny_corpus, "data": blind}
    runs = {"mi": (scored_corpus, ["--loss", "mi", "--mi-floor", "0.05"]),
            "rho1": (scored_corpus, ["--loss", "rho1", "--rho1-ratio", "0.5"]),
            "cal": (scored_corpus, ["--loss", "cal"]),
            "mi_blind": (blind_corpus, ["--loss", "mi"]),
            "ntp_blind": (blind_corpus, ["--loss", "ntp"])}
    argvs = [_argv(corpus, "ulvlm", str(tmp_path / name), *flags, iters=3) for name, (corpus, flags) in runs.items()]
    (summaries,) = run_on_ranks(_train_runs, 1, argvs, timeout=400)
    for name, summary in zip(runs, summaries):
        with open(tmp_path / name / "summary.json") as f:
            written = json.load(f)
        assert written["loss"] == name.split("_")[0] and written["iterations"] == 3
        for key in ("train_weighted_ce", "train_ce", "loss_tokens", "prior_alpha", "mi_floor", "rho1_ratio"):
            assert key in written, f"{name}: summary.json lacks {key}"
        assert math.isfinite(written["train_weighted_ce"]) and math.isfinite(written["train_ce"])

    def losses(name, key):
        with open(tmp_path / name / "metrics.jsonl") as f:
            return [json.loads(line)[key] for line in f]

    assert losses("mi_blind", "weighted_ce") == losses("ntp_blind", "weighted_ce")
    # The other runs optimise another loss than the plain CE they also log.
    for name in ("mi", "rho1", "cal"):
        assert all(w != c for w, c in zip(losses(name, "weighted_ce"), losses(name, "ce"))), name
