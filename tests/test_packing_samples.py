"""Sample packing (--pack-samples): rows of whole samples, the same per-sample losses as unpacked.

Data side: the next-fit fill (C++ and numpy), the rows' epochs, caption rows and GPT rows that
hold whole samples with their own PRIOR normalisers. Model side: a packed batch gives every
sample the per-token losses and weights it gets alone in a row (GPT, U-LVLM, H-LVLM), RoPE and
the packed attention inputs, the refusals; training: resume is exact, DP ranks see the rows one
process sees, the padding share is logged.
"""

import argparse
import json
import os
import pickle
import re

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_prior.data import packing
from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
from megatron_prior.data.gpt_dataset import (
    PackedGPTDataset,
    PackedGPTDatasetConfig,
    WeightedGPTDataset,
    WeightedGPTDatasetConfig,
)
from megatron_prior.testing import run_on_ranks

# The tiny corpus's images are 16 x 16; patches of 4 make 4 x 4.
ULVLM_IMAGE = 1 + 4 * 5
# float32 rounding: in a packed row a sample's attention sums run over a longer row (its terms
# the same, the others exactly 0 after the mask), which a vectorised reduction may group in
# another order; a few roundings of CE-sized values per layer, well below what a leaking
# mask changes (1e-2 here).
CE_ULPS = 16


def _tokenizer(corpus):
    from megatron_prior.tokenizer import load_tokenizer

    return load_tokenizer(corpus["tokenizer"])


def _captions(corpus, seq, pack, rows, image=ULVLM_IMAGE, seed=5):
    config = CaptionDatasetConfig(random_seed=seed, sequence_length=seq, blend=([corpus["data"]], None),
                                  split="100,0,0", tokenizer=_tokenizer(corpus), image_sequence_length=image,
                                  pack_samples=pack, prior_alpha=0.5)
    return BlendedMegatronDatasetBuilder(CaptionDataset, [rows, 0, 0], lambda: True, config).build()[0]


def _documents(corpus, seq, pack, rows, cls=WeightedGPTDataset, eod_mask_loss=True, seed=5):
    config_cls = WeightedGPTDatasetConfig if cls is WeightedGPTDataset else PackedGPTDatasetConfig
    config = config_cls(random_seed=seed, sequence_length=seq, blend=([corpus["data"]], None), split="100,0,0",
                        tokenizer=_tokenizer(corpus), reset_position_ids=False, reset_attention_mask=False,
                        eod_mask_loss=eod_mask_loss, create_attention_mask=False, pack_samples=pack)
    return BlendedMegatronDatasetBuilder(cls, [rows, 0, 0], lambda: True, config).build()[0]


# --- the fill --------------------------------------------------------------------------------

@pytest.mark.skipif(not packing.HAVE_EXTENSION, reason="C++ packer not built")
def test_pack_rows_is_next_fit_in_order_in_both_paths():
    assert packing.pack_rows([3, 4, 2, 5, 6], 7).tolist() == [0, 2, 4, 5]
    assert packing.pack_rows([7, 0, 7], 7).tolist() == [0, 2, 3]  # a free item joins the full row
    assert packing.pack_rows([], 7).tolist() == packing.pack_rows_numpy([], 7).tolist() == [0]
    rng = np.random.default_rng(0)
    for budget in (1, 17, 600):
        costs = rng.integers(0, budget + 1, 5000)
        starts = packing.pack_rows(costs, budget)
        np.testing.assert_array_equal(starts, packing.pack_rows_numpy(costs, budget))
        sums = np.add.reduceat(costs, starts[:-1]) if len(costs) else np.zeros(0)
        assert sums.max() <= budget
        # Next-fit: each row's successor did not fit it.
        assert np.all(sums[:-1] + costs[starts[1:-1]] > budget)
    for fn in (packing.pack_rows, packing.pack_rows_numpy):
        with pytest.raises(ValueError, match=r"^item 1 costs 9, outside \[0, 7\]$"):
            fn(np.array([1, 9]), 7)
        with pytest.raises(ValueError, match=r"^budget must be positive, got 0$"):
            fn(np.array([1]), 0)


def test_shuffled_rows_draw_the_epochs_unpacked_rows_draw():
    items = np.arange(100, 130)
    order, starts = packing.shuffled_rows(items, 70, seed=3)
    rng = np.random.RandomState(3)
    np.testing.assert_array_equal(order, np.concatenate([rng.permutation(items) for _ in range(3)])[:70])
    np.testing.assert_array_equal(starts, np.arange(71))
    costs = np.random.default_rng(1).integers(1, 6, 30)
    order, starts = packing.shuffled_rows(items, 25, seed=3, costs=costs, budget=9)
    assert len(starts) == 26
    per_item = dict(zip(items.tolist(), costs.tolist()))
    sums = [sum(per_item[i] for i in order[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    assert max(sums) <= 9
    epoch_ends = set(range(0, len(order) + 1, 30))
    for a, b in zip(starts[:-1], starts[1:]):  # no row straddles two epochs
        assert not any(a < e < b for e in epoch_ends)
    # Rows do not depend on how many are wanted: a longer run starts with the same rows.
    longer, longer_starts = packing.shuffled_rows(items, 40, seed=3, costs=costs, budget=9)
    np.testing.assert_array_equal(longer_starts[:26], starts)
    np.testing.assert_array_equal(longer[:len(order)], order)
    with pytest.raises(ValueError, match="^no samples to fill 3 rows from$"):
        packing.shuffled_rows(items[:0], 3, seed=3)


# --- caption rows ----------------------------------------------------------------------------

def test_packed_caption_rows_are_the_unpacked_rows_back_to_back(tiny_corpus):
    seq = 80
    unpacked, packed = _captions(tiny_corpus, seq, False, 120), _captions(tiny_corpus, seq, True, 30)
    image_id = _tokenizer(tiny_corpus).image_token_id
    np.testing.assert_array_equal(packed.sample_documents, unpacked.sample_documents[:len(packed.sample_documents)])
    lengths = np.asarray(packed.dataset.sequence_lengths)
    several = 0
    for r in range(len(packed)):
        row = packed[r]
        first, last = packed.row_starts[r], packed.row_starts[r + 1]
        several += last - first > 1
        caption_lengths = np.minimum(lengths[packed.sample_documents[first:last]], seq)
        # The budget: one unpacked row's combined positions plus its label-only end.
        assert (caption_lengths + ULVLM_IMAGE).sum() <= seq + ULVLM_IMAGE
        at = 0
        for k in range(first, last):
            alone = unpacked[k]
            n = 1 + int(caption_lengths[k - first])  # <image> and the whole (cut) caption
            end = min(at + n, seq)
            assert row["tokens"][at] == image_id
            for key in ("tokens", "labels", "loss_mask", "loss_weights", "token_kinds"):
                # Exact: the same float64 multipliers (the caption's own normaliser), rounded once.
                torch.testing.assert_close(row[key][at:end - 1], alone[key][:end - at - 1], rtol=0, atol=0)
            assert row["loss_mask"][at:end - 1].sum() == caption_lengths[k - first] - (at + n > seq)
            torch.testing.assert_close(row["position_ids"][at:end], torch.arange(end - at))
            torch.testing.assert_close(row["images"][k - first], alone["images"], rtol=0, atol=0)
            at += n
        if at < seq:
            assert row["loss_mask"][at - 1:].sum() == 0 and not row["tokens"][at:].any()
        assert row["images"].shape[0] == last - first
        combined = ULVLM_IMAGE - 1 + seq
        assert int(row["padding_positions"]) == combined - min(combined, (caption_lengths + ULVLM_IMAGE).sum())
    assert several > len(packed) // 2


def test_unpacked_caption_rows_count_their_padding(tiny_corpus):
    ds = _captions(tiny_corpus, 24, False, 50)
    lengths = np.asarray(ds.dataset.sequence_lengths)[ds.sample_documents]
    padding = [int(ds[i]["padding_positions"]) for i in range(len(ds))]
    # Inputs: the image's positions, then the caption but its last token (only a label).
    assert padding == [max(0, 24 - 1 - min(n, 24)) for n in lengths]


# --- GPT rows --------------------------------------------------------------------------------

@pytest.mark.parametrize("eod_mask_loss", [True, False])
def test_packed_gpt_rows_hold_whole_documents_with_their_normalisers(tiny_corpus, eod_mask_loss):
    seq, alpha = 64, 1.0
    ds = _documents(tiny_corpus, seq, True, 20, eod_mask_loss=eod_mask_loss)
    plain = _documents(tiny_corpus, seq, True, 20, cls=PackedGPTDataset, eod_mask_loss=eod_mask_loss)
    low = ds.dataset
    tokens_all = np.asarray(low.token_array, dtype=np.int64)
    offsets, eod, pad = low.sequence_offsets, ds.config.tokenizer.eod, ds._pad_token_id
    several = 0
    for r in range(len(ds)):
        row, plain_row = ds[r], plain[r]
        for key in ("tokens", "labels", "loss_mask", "position_ids", "padding_positions"):
            torch.testing.assert_close(plain_row[key], row[key], rtol=0, atol=0)
        docs = ds.row_documents[ds.row_starts[r]:ds.row_starts[r + 1]]
        several += len(docs) > 1
        text = np.concatenate([tokens_all[offsets[d]:offsets[d + 1]] for d in docs])[:seq + 1]
        assert len(docs) == 1 or len(text) <= seq + 1  # only a lone document is ever cut
        expect_tokens = np.where(np.arange(seq) < len(text), np.pad(text, (0, seq + 1 - len(text)))[:seq], 0)
        np.testing.assert_array_equal(row["tokens"].numpy(), np.where(expect_tokens == pad, 0, expect_tokens))
        assert int(row["padding_positions"]) == seq - min(seq, len(text))
        weights, positions, at = np.zeros(seq + 1), np.arange(seq + 1), 0
        for d in docs:
            doc = tokens_all[offsets[d]:offsets[d + 1]]
            w = (1 - np.exp(np.asarray(low.logprob_array[offsets[d]:offsets[d + 1]], dtype=np.float64))) ** alpha
            keep = np.array([not (eod_mask_loss and (i == 0 or doc[i - 1] == eod)) for i in range(len(doc))])
            scale = keep.sum() / w[keep].sum()  # the whole document's normaliser
            n = min(len(doc), seq + 1 - at)
            weights[at:at + n] = np.where(keep, scale * w, 0.0)[:n]
            positions[at:] = np.arange(seq + 1 - at)
            at += n
        positions[at:] = np.arange(seq + 1 - at)
        np.testing.assert_allclose(row["loss_weights"].numpy(), weights[1:], rtol=1e-6, atol=0)
        np.testing.assert_array_equal(row["position_ids"].numpy(), positions[:seq])
    assert several > len(ds) // 2
    # DataLoader workers get the rows, not a copy of the memory-mapped corpus.
    for dataset in (ds, plain):
        copy = pickle.loads(pickle.dumps(dataset))
        assert len(pickle.dumps(dataset)) < 200_000 and copy._flat is None
        torch.testing.assert_close(copy[3], dataset[3], rtol=0, atol=0)


def test_a_document_longer_than_a_packed_row_is_cut_with_a_warning(tiny_corpus, caplog):
    with caplog.at_level("WARNING", logger="megatron_prior.data.gpt_dataset"):
        ds = _documents(tiny_corpus, 8, True, 10)
    lengths = np.asarray(ds.dataset.sequence_lengths)
    longer = int((lengths > 9).sum())
    assert longer and re.search(rf": {longer} of {len(lengths)} documents of the train split are longer than a packed "
                                r"row \(--seq-length \+ 1 = 9 tokens\): each is cut at its row's end$",
                                caplog.text, re.M)
    assert all(ds.row_starts[r + 1] - ds.row_starts[r] == 1 for r in range(len(ds))
               if lengths[ds.row_documents[ds.row_starts[r]]] > 9)


# --- the model side --------------------------------------------------------------------------

def test_one_image_a_row_is_the_prefix_layout_and_packed_images_take_their_places():
    from megatron_prior.models.layout import expand_to_combined, place_images

    x = torch.arange(1, 13).reshape(2, 6)
    torch.testing.assert_close(expand_to_combined(x, 4, fill=-1),
                               torch.cat([torch.full((2, 3), -1), x], dim=1))  # the <image> at 0
    text, images = torch.randn(2, 6, 5), torch.randn(2, 4, 5)
    first = torch.zeros(2, 6, dtype=torch.bool)
    first[:, 0] = True
    torch.testing.assert_close(place_images(text, images, first), torch.cat([images, text[:, 1:]], dim=1),
                               rtol=0, atol=0)
    # A packed row [<image> a <image> b c pad]: each image in its <image>'s place, the row cut
    # at one image's worth, 3 + 6 positions (here inside b's: only padding is cut in real rows).
    mask = torch.tensor([[True, False, True, False, False, False]])
    three = torch.randn(2, 4, 5)
    out = place_images(text[:1], three, mask)
    torch.testing.assert_close(out[0], torch.cat([three[0], text[0, 1:2], three[1]]), rtol=0, atol=0)
    torch.testing.assert_close(expand_to_combined(x[:1], 4, fill=0, image_mask=mask),
                               torch.tensor([[0, 0, 0, 1, 2, 0, 0, 0, 3]]))
    with pytest.raises(ValueError, match=r"^1 images for 2 <image> tokens$"):
        place_images(text[:1], three[:1], mask)


MODEL = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=256)


def _model_config(arch, tokenizer, seq, position_embedding_type="rope"):
    from megatron_prior.models.config import ModelConfig

    image = {} if arch == "gpt" else dict(
        image_size=16, patch_size=4, image_token_id=tokenizer.image_token_id, image_start_id=tokenizer.image_start_id,
        image_row_id=tokenizer.image_row_id, image_end_id=tokenizer.image_end_id, vit_hidden_size=32,
        vit_num_attention_heads=4)
    return ModelConfig(arch=arch, seq_length=seq, max_position_embeddings=None,
                       position_embedding_type=position_embedding_type, **MODEL, **image)


def _samples_of(batch, model_config, output):
    """Per sample of a batch (in row order): its loss positions' CE and PRIOR weights, and its
    ntp and prior loss sums by the training loss functions, on the sample's positions only."""
    from megatron_prior.loss.loss_func import make_loss_func
    from megatron_prior.models.packed import combined_positions
    from megatron_prior.training.steps import loss_view

    view = loss_view(batch, model_config)
    image_mask = batch["tokens"] == model_config.image_token_id if model_config.image_sequence_length else None
    sample = (combined_positions(batch["position_ids"], image_mask, model_config.image_sequence_length) == 0).cumsum(1)
    loss_funcs = {name: make_loss_func(name) for name in ("ntp", "prior")}
    out = []
    for r in range(len(sample)):
        for k in range(1, int(sample[r].max()) + 1):
            sel = (sample[r] == k) & (view["loss_mask"][r] > 0)
            if sel.any():
                alone = {"loss_mask": view["loss_mask"][r:r + 1] * sel, "loss_weights": view["loss_weights"][r:r + 1]}
                sums = {name: float(f(alone, output[r:r + 1].detach())[0]) for name, f in loss_funcs.items()}
                out.append((output[r][sel].detach().numpy(), view["loss_weights"][r][sel].numpy(), sums))
    return out


def _alone(batch, spans):
    """GPT rows holding one sample each, moved to the row's start: the unpacked layout."""
    from megatron_prior.training.data import stack

    rows = []
    for r, a, b in spans:
        row = {key: torch.zeros_like(v[r]) for key, v in batch.items() if v.dim() == 2}
        for key in row:
            row[key][:b - a] = batch[key][r, a:b]
        row["position_ids"] = torch.arange(batch["tokens"].shape[1])
        rows.append(row)
    return stack(rows)


def _per_sample_losses(corpus, arch, position_embedding_type):
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.init import initialize_weights
    from megatron_prior.training.data import stack
    from megatron_prior.training.steps import make_forward_step

    parallel.initialize(seed=1)
    seq = 96
    cfg = _model_config(arch, _tokenizer(corpus), seq, position_embedding_type)
    model = build_model(cfg)
    initialize_weights(model, seed=9, std=0.02, num_layers=cfg.num_layers)
    if arch == "gpt":
        packed_ds = _documents(corpus, seq, True, 8)
    else:
        packed_ds = _captions(corpus, seq, True, 8, image=cfg.image_sequence_length)
    batch = stack([packed_ds[i] for i in range(4)])
    output, _ = make_forward_step(cfg, "prior", pack_samples=True)(iter([batch]), model)
    packed = _samples_of(batch, cfg, output)
    if arch == "gpt":
        # A document alone in a row is the packed row's stretch of it, moved to the front.
        spans = []
        sample = (batch["position_ids"] == 0).cumsum(1)
        for r in range(4):
            for k in range(1, int(sample[r].max()) + 1):
                idx = torch.nonzero(sample[r] == k).flatten()
                if batch["loss_mask"][r, idx].any():
                    spans.append((r, int(idx[0]), int(idx[-1]) + 1))
        single = _alone(batch, spans)
    else:
        unpacked_ds = _captions(corpus, seq, False, len(packed), image=cfg.image_sequence_length)
        single = stack([unpacked_ds[i] for i in range(len(packed))])
    single_output, _ = make_forward_step(cfg, "prior")(iter([single]), model)
    return packed, _samples_of(single, cfg, single_output), len(batch["tokens"])


@pytest.mark.parametrize("arch,position_embedding_type", [
    ("gpt", "rope"), ("gpt", "learned_absolute"), ("ulvlm", "rope"), ("hlvlm", "rope")])
def test_per_sample_losses_of_a_packed_batch_are_the_unpacked_ones(tiny_corpus, arch, position_embedding_type):
    (packed, alone, rows), = run_on_ranks(_per_sample_losses, 1, tiny_corpus, arch, position_embedding_type)
    assert len(packed) == len(alone) > rows  # several samples a row
    eps = np.finfo(np.float32).eps
    for (ce, weights, sums), (ce_alone, weights_alone, sums_alone) in zip(packed, alone):
        assert ce.shape == ce_alone.shape
        tolerance = CE_ULPS * eps * np.abs(ce_alone).max()
        np.testing.assert_allclose(ce, ce_alone, rtol=0, atol=tolerance)
        np.testing.assert_array_equal(weights, weights_alone)  # the caption's own normaliser, unchanged
        # Each term off by at most the CE tolerance times its weight, and the sums' own rounding.
        for name, bound in (("ntp", len(ce)), ("prior", weights.sum())):
            assert abs(sums[name] - sums_alone[name]) <= tolerance * bound + eps * len(ce) * abs(sums_alone[name]), name


def _rope_table():
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.packed import _rope_positions

    parallel.initialize(seed=1)
    model = build_model(_model_config("gpt", None, 12))
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1], list(range(12))])
    table = model.rotary_pos_emb(12)
    with _rope_positions([model], positions):
        per_sample = model.rotary_pos_emb(12)
    after = model.rotary_pos_emb(12)
    return table, per_sample, after, positions


def test_rope_sees_each_samples_own_positions():
    (table, per_sample, after, positions), = run_on_ranks(_rope_table, 1)
    assert table.shape[1:3] == (1, 1) and per_sample.shape == (12, 2, 1, table.shape[-1])
    for b in range(2):
        for i in range(12):  # the very table entry of the sample's own position
            torch.testing.assert_close(per_sample[i, b, 0], table[positions[b, i], 0, 0], rtol=0, atol=0)
    torch.testing.assert_close(after, table, rtol=0, atol=0)  # the hook is gone after the forward


def _thd_and_hooked_rope(cu_seqlens, positions, longest):
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
    from megatron.core.transformer import TransformerConfig

    from megatron_prior import parallel

    parallel.initialize(seed=1)  # the CPU shim: megatron-core's RoPE table lives on "cuda"
    # GPTModel's table in the packed format: as long as the longest sequence (max_seqlen).
    table = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)(longest)
    x = torch.randn(positions.shape[1], 1, 2, 8)
    config = TransformerConfig(num_layers=1, hidden_size=16, num_attention_heads=2, apply_rope_fusion=False)
    thd = apply_rotary_pos_emb(x[:, 0], table, config=config, cu_seqlens=cu_seqlens)
    hooked = apply_rotary_pos_emb(x, table[positions.t()].flatten(2, 3), config=config)
    return thd, hooked[:, 0]


def test_thd_parameters_and_mask_mark_the_same_samples():
    from megatron_prior.models.packed import block_causal_mask, combined_positions, thd_params

    # Text row [<image> c c <image> c pad pad pad] with images of 3 positions: 2 samples, the
    # padding continuing the second; the combined row keeps one image's worth, 2 + 8 positions.
    image_mask = torch.tensor([[True, False, False, True, False, False, False, False]])
    positions = combined_positions(torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]]), image_mask, 3)
    assert positions.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4]]
    params = thd_params(positions)
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 5, 10]
    assert params.cu_seqlens_kv.dtype == torch.int32 and params.max_seqlen_q == params.max_seqlen_kv == 5
    mask = block_causal_mask(positions)[0, 0]
    allowed = torch.zeros(10, 10, dtype=torch.bool)
    for a, b in [(0, 5), (5, 10)]:
        allowed[a:b, a:b] = torch.ones(b - a, b - a, dtype=torch.bool).tril()
    torch.testing.assert_close(mask, ~allowed)
    # megatron-core's RoPE in the packed format starts each sequence at 0, as the hook does.
    (thd, hooked), = run_on_ranks(_thd_and_hooked_rope, 1, params.cu_seqlens_q, positions, params.max_seqlen_q)
    torch.testing.assert_close(thd, hooked, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"takes one row per micro-batch, got 2: --pack-samples with Transformer "
                                         r"Engine needs --micro-batch-size 1$"):
        thd_params(positions.expand(2, -1))


def _namespace(**flags):
    base = dict(pack_samples=True, fp8_format=None, micro_batch_size=4, model="ulvlm", max_position_embeddings=None)
    return argparse.Namespace(**{**base, **flags})


@pytest.mark.parametrize("flags,message", [
    (dict(transformer_impl="transformer_engine"), r"--pack-samples with Transformer Engine needs --micro-batch-size 1, "
                                                  r"got 4: its packed format takes one row per micro-batch"),
    (dict(fp8_format="hybrid", micro_batch_size=2),
     r"--pack-samples with Transformer Engine needs --micro-batch-size 1, got 2"),
    (dict(context_parallel_size=2), r"--pack-samples does not take --context-parallel-size > 1"),
    (dict(model="hlvlm", max_position_embeddings=512), r"--pack-samples with --model hlvlm takes no "
                                                       r"--max-position-embeddings: the model cuts each row at it"),
])
def test_combinations_packing_refuses(flags, message):
    from megatron_prior.models.packed import check_args

    assert re.match(message, check_args(_namespace(**flags)))
    assert check_args(_namespace(**flags, pack_samples=False)) is None
    assert check_args(_namespace(transformer_impl="transformer_engine", micro_batch_size=1)) is None


def test_trainer_refuses_packed_hlvlm_with_max_position_embeddings(tiny_corpus, capsys):
    from megatron_prior.training.arguments import parse_args

    with pytest.raises(SystemExit):
        parse_args(["--model", "hlvlm", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
                    "--train-iters", "1", "--lr", "1e-3", "--data-path", tiny_corpus["data"], "--tokenizer-model",
                    tiny_corpus["tokenizer"], "--pack-samples", "--max-position-embeddings", "512"], world_size=1)
    assert "error: --pack-samples with --model hlvlm takes no --max-position-embeddings" in capsys.readouterr().err


def _fused_kernel_refusal(flag):
    from megatron_prior import parallel
    from megatron_prior.models.builder import build_model
    from megatron_prior.models.packed import packed_inputs

    parallel.initialize(seed=1)
    model = build_model(_model_config("gpt", None, 8))
    setattr(model.config, flag, True)
    batch = {"tokens": torch.zeros(1, 8, dtype=torch.long), "position_ids": torch.arange(8)[None]}
    try:
        with packed_inputs(model, batch, _model_config("gpt", None, 8)):
            pass
    except ValueError as err:
        return str(err)


@pytest.mark.parametrize("flag,why", [("masked_softmax_fusion", "its fused causal softmax ignores the packed"),
                                      ("apply_rope_fusion", "the fused RoPE takes one table for all rows")])
def test_local_attention_refuses_fused_kernels_that_would_ignore_the_packing(flag, why):
    message, = run_on_ranks(_fused_kernel_refusal, 1, flag)
    assert message == (f"--pack-samples with megatron-core's local attention needs {flag} off: {why}"
                       + (" attention mask" if flag == "masked_softmax_fusion" else ", not per-sample positions"))


# --- training --------------------------------------------------------------------------------

def _argv(corpus, out, *extra, iters=4):
    return ["--model", "ulvlm", "--seq-length", "96", "--patch-size", "4", "--num-layers", "2", "--hidden-size", "32",
            "--num-attention-heads", "4", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters",
            str(iters), "--lr", "3e-3", "--lr-warmup-iters", "1", "--data-path", corpus["data"], "--tokenizer-model",
            corpus["tokenizer"], "--split", "100,0,0", "--eval-iters", "0", "--log-interval", "1", "--log-dir", out,
            "--data-cache-path", os.path.join(out, "cache"), "--loss", "prior", "--hidden-dropout", "0",
            "--attention-dropout", "0", "--pack-samples", *extra]


def _train(argv):
    from megatron_prior.train import main

    return main(argv)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_packed_training_resumes_exactly_logs_its_padding_and_splits_over_ranks(tiny_corpus, tmp_path):
    full, part, dp2 = str(tmp_path / "full"), str(tmp_path / "part"), str(tmp_path / "dp2")
    run_on_ranks(_train, 1, _argv(tiny_corpus, full))
    reference = _metrics(full)
    run_on_ranks(_train, 1, _argv(tiny_corpus, part, "--save", part, "--save-interval", "2", "--exit-interval", "2"))
    run_on_ranks(_train, 1, _argv(tiny_corpus, part, "--save", part, "--load", part))
    resumed = _metrics(part)
    assert [m["weighted_ce"] for m in resumed] == [m["weighted_ce"] for m in reference]  # bitwise: the same rows
    # What the run trained on travels with the checkpoint: the resumed run counts the whole run.
    counts = ("loss_tokens", "masked_positions", "image_positions", "padding_positions", "positions")
    assert {k: resumed[-1][k] for k in counts} == {k: reference[-1][k] for k in counts}
    run_on_ranks(_train, 2, _argv(tiny_corpus, dp2))
    split = _metrics(dp2)
    np.testing.assert_allclose([m["weighted_ce"] for m in split], [m["weighted_ce"] for m in reference], rtol=1e-5)
    # The logged padding share is the rows' own count: 4 rows an iteration, in order.
    ds = _captions(tiny_corpus, 96, True, 16, seed=1234)
    combined = ULVLM_IMAGE - 1 + 96
    for it, record in enumerate(reference):
        rows = [int(ds[r]["padding_positions"]) for r in range(4 * it, 4 * it + 4)]
        assert record["padding_share"] == pytest.approx(sum(rows) / (4 * combined), rel=1e-12)
        assert split[it]["padding_share"] == record["padding_share"]
