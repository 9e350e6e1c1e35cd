"""WeightedGPTDataset: stock GPTDataset samples plus PRIOR weights, through megatron-core's builder."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

from megatron_prior.data import FormatError, WeightedGPTDataset, WeightedGPTDatasetConfig, packing
from megatron_prior.data.writer import WeightedDatasetWriter

EOD, PAD, VOCAB = 2, 1, 200


class Tok:
    vocab_size, eod, pad = VOCAB, EOD, PAD
    fingerprint = "sha256:test"
    unique_identifiers = OrderedDict(cls="Tok", fingerprint=fingerprint)


def write_corpus(prefix, seed, n_docs=80, max_len=50, end_in_eod=True, with_kinds=True):
    rng = np.random.default_rng(seed)
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=with_kinds) as w:
        for _ in range(n_docs):
            n = int(rng.integers(2, max_len))
            doc = rng.integers(3, VOCAB, n)
            doc[rng.random(n) < 0.03] = EOD  # some EODs inside documents too
            if end_in_eod:
                doc[-1] = EOD
            lp = -rng.exponential(1.5, n).astype(np.float32)
            lp[rng.random(n) < 0.05] = 0.0
            w.add_document(doc, lp, rng.integers(0, 4, n).astype(np.uint8) if with_kinds else None)
        w.finalize(Tok.fingerprint, {"type": "unigram"})
    return str(prefix)


def _config(cls, tmp_path, blend, seq=24, eod_mask_loss=True, split="8,1,1", **extra):
    return cls(random_seed=7, sequence_length=seq, blend=blend, split=split, tokenizer=Tok(),
               reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=eod_mask_loss,
               path_to_cache=str(tmp_path / "cache"), **extra)


def _build(cls, config, sizes=(None, None, None)):
    return BlendedMegatronDatasetBuilder(cls, list(sizes), lambda: True, config).build()


def _reference_weights(ds, idx, alpha, eod_mask_loss):
    """Float64 loss weights of sample ``idx`` from the per-label log-probs and documents."""
    low = ds.dataset
    tokens = np.asarray(low.token_array, dtype=np.int64)
    offsets = low.sequence_offsets
    doc_of_token = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).astype(np.int64)
    rows = [ds.shuffle_index[idx]]
    label_doc = packing.pack_values_numpy(doc_of_token, offsets, ds.document_index, ds.sample_index,
                                          rows, ds.config.sequence_length, -1)[0, 1:]
    label_lp = packing.pack_values_numpy(np.asarray(low.logprob_array), offsets, ds.document_index,
                                         ds.sample_index, rows, ds.config.sequence_length, 0)[0, 1:]
    scale = {}
    for d in set(label_doc[label_doc >= 0].tolist()):
        doc, lp = tokens[offsets[d]:offsets[d + 1]], low.logprob_array[offsets[d]:offsets[d + 1]]
        keep = [not (eod_mask_loss and (i == 0 or doc[i - 1] == EOD)) for i in range(len(doc))]
        w = [(1 - np.exp(np.float64(x))) ** alpha for x, k in zip(lp, keep) if k]
        scale[d] = len(w) / sum(w) if sum(w) > 0 else None
    out = np.zeros(len(label_doc))
    for j, (d, lp) in enumerate(zip(label_doc, label_lp)):
        if d >= 0:
            out[j] = 1.0 if scale[d] is None else scale[d] * (1 - np.exp(np.float64(lp))) ** alpha
    return out


@pytest.mark.parametrize("eod_mask_loss,alpha", [(True, 1.0), (False, 0.5)])
def test_samples_equal_stock_gpt_dataset_plus_weights(tmp_path, eod_mask_loss, alpha):
    prefix = write_corpus(tmp_path / "A", seed=0)
    weighted = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([prefix], None),
                                                   eod_mask_loss=eod_mask_loss, prior_alpha=alpha))
    stock = _build(GPTDataset, _config(GPTDatasetConfig, tmp_path, ([prefix], None), eod_mask_loss=eod_mask_loss))
    for split in range(3):
        w_ds, s_ds = weighted[split], stock[split]
        assert len(w_ds) == len(s_ds) > 0
        for idx in range(len(w_ds)):
            got, ref = w_ds[idx], s_ds[idx]
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=0, atol=0)
            assert got["loss_weights"].dtype == torch.float32
            assert not got["loss_weights"][got["loss_mask"] == 0].any()
            expected = _reference_weights(w_ds, idx, alpha, eod_mask_loss) * got["loss_mask"].double().numpy()
            np.testing.assert_allclose(got["loss_weights"].double().numpy(), expected, rtol=2e-6, atol=1e-6)
    batch = weighted[0].__getitems__([3, 0, 5, None])
    for sample, idx in zip(batch, [3, 0, 5]):
        for key, value in weighted[0][idx].items():
            torch.testing.assert_close(sample[key], value, rtol=0, atol=0)
    assert not batch[3]["loss_weights"].any() and not batch[3]["loss_mask"].any()


def test_whole_captions_keep_their_mass_over_an_epoch(tmp_path):
    """Summed over one epoch, each caption's weights equal its loss-token count."""
    prefix = write_corpus(tmp_path / "A", seed=1, max_len=70)
    ds = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([prefix], None), seq=16,
                                            split="1,0,0"))[0]
    low = ds.dataset
    offsets = low.sequence_offsets
    doc_of_token = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets)).astype(np.int64)
    rows = ds.shuffle_index[np.arange(len(ds))]
    label_doc = packing.pack_values(doc_of_token, offsets, ds.document_index, ds.sample_index, rows,
                                    16, -1)[:, 1:]
    weights = np.stack([ds[i]["loss_weights"].numpy() for i in range(len(ds))])
    tokens = np.asarray(low.token_array)
    first_doc, last_doc = ds.document_index[0], ds.document_index[ds.sample_index[-1][0]]
    checked = 0
    for d in np.unique(label_doc[label_doc >= 0]):
        if d in (first_doc, last_doc):  # cut by the epoch's ends
            continue
        doc = tokens[offsets[d]:offsets[d + 1]]
        n_loss = sum(1 for i in range(1, len(doc)) if doc[i - 1] != EOD)  # eod_mask_loss
        assert abs(weights[label_doc == d].sum() - n_loss) < 1e-4 * max(n_loss, 1)
        checked += 1
    assert checked > 50


@pytest.fixture
def world_of_one():
    """megatron-core's BlendedDataset asks torch.distributed for the rank when it caches."""
    from megatron_prior import parallel

    parallel.initialize()
    yield
    parallel.destroy()


def test_blend_and_kinds(tmp_path, world_of_one):
    a = write_corpus(tmp_path / "A", seed=2)
    b = write_corpus(tmp_path / "B", seed=3, with_kinds=False)
    c = write_corpus(tmp_path / "C", seed=4)
    blended = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([a, c], [0.3, 0.7])),
                     sizes=(40, 8, 8))
    assert len(blended[0]) >= 40
    seen = set()
    for i in range(len(blended[0])):
        sample = blended[0][i]
        seen.add(int(sample["dataset_id"]))
        assert sample["token_kinds"].shape == sample["labels"].shape
        assert not sample["loss_weights"][sample["loss_mask"] == 0].any()
    assert seen == {0, 1}
    # Kinds follow the labels: the packer's rows of the kind array, shifted by one.
    ds = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([a], None)))[0]
    low = ds.dataset
    rows = [ds.shuffle_index[5]]
    kinds = packing.pack_values_numpy(np.asarray(low.kind_array), low.sequence_offsets, ds.document_index,
                                      ds.sample_index, rows, 24, 0)[0, 1:]
    np.testing.assert_array_equal(ds[5]["token_kinds"].numpy(), kinds)
    no_kinds = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([b], None)))[0]
    assert "token_kinds" not in no_kinds[0]


def test_dataloader_workers(tmp_path):
    prefix = write_corpus(tmp_path / "A", seed=5)
    ds = _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([prefix], None)))[0]
    import pickle

    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    for key, value in ds[7].items():
        torch.testing.assert_close(clone[7][key], value, rtol=0, atol=0)
    # Spawned, as the trainer starts them (megatron_prior.training.data.WORKER_START_METHOD).
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, multiprocessing_context="spawn")
    batch = next(iter(loader))
    assert batch["loss_weights"].shape == (4, 24)
    for i in range(4):
        torch.testing.assert_close(batch["loss_weights"][i], ds[i]["loss_weights"], rtol=0, atol=0)


def test_refusals(tmp_path):
    no_eod = write_corpus(tmp_path / "N", seed=6, end_in_eod=False)
    with pytest.raises(ValueError, match="eod_mask_loss needs documents that end in EOD"):
        _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([no_eod], None)))
    _build(WeightedGPTDataset, _config(WeightedGPTDatasetConfig, tmp_path, ([no_eod], None), eod_mask_loss=False))
    prefix = write_corpus(tmp_path / "A", seed=0)

    class OtherTok(Tok):
        fingerprint = "sha256:other"

    config = _config(WeightedGPTDatasetConfig, tmp_path, ([prefix], None))
    config.tokenizer = OtherTok()
    with pytest.raises(FormatError, match="scored with tokenizer sha256:test"):
        _build(WeightedGPTDataset, config)
    with pytest.raises(ValueError, match="add_extra_token_to_sequence"):
        _config(WeightedGPTDatasetConfig, tmp_path, ([prefix], None), add_extra_token_to_sequence=False)
