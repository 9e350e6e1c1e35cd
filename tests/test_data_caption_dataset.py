"""CaptionDataset (LVLM samples) and the image store it reads."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_prior.data import FormatError, ImageStore
from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
from megatron_prior.data.formats import AtomicFiles, WeightedDatasetWriter
from megatron_prior.data.images import ImageStoreWriter, images_path

EOD, PAD, IMAGE, VOCAB, H, W = 2, 1, 3, 100, 6, 5


class Tok:
    vocab_size, eod, pad, image_token_id = VOCAB, EOD, PAD, IMAGE
    fingerprint = "sha256:captions"
    unique_identifiers = OrderedDict(cls="Tok", fingerprint=fingerprint)


def write_captions(prefix, n=40, seed=0, with_images=True, end_in_eod=True):
    rng = np.random.default_rng(seed)
    files = AtomicFiles()
    images = []
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=True) as w:
        if with_images:
            store = ImageStoreWriter(images_path(str(prefix)), H, W, files)
            w.attach(files)
        for _ in range(n):
            k = int(rng.integers(2, 20))
            doc = rng.integers(4, VOCAB, k)
            if end_in_eod:
                doc[-1] = EOD
            lp = -rng.exponential(1.0, k).astype(np.float32)
            w.add_document(doc, lp, rng.integers(0, 4, k).astype(np.uint8))
            if with_images:
                images.append(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
                store.add(images[-1])
        if with_images:
            store.close()
        w.finalize(Tok.fingerprint, {"type": "unigram"})
    return str(prefix), images


def build(prefix, tmp_path, seq=12, split="1,0,0", sizes=(None, None, None), **extra):
    config = CaptionDatasetConfig(random_seed=3, sequence_length=seq, blend=([prefix], None), split=split,
                                  tokenizer=Tok(), path_to_cache=str(tmp_path / "cache"), **extra)
    return BlendedMegatronDatasetBuilder(CaptionDataset, list(sizes), lambda: True, config).build()


def test_sample_layout_weights_and_images(tmp_path):
    prefix, images = write_captions(tmp_path / "C")
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
    ds = build(prefix, tmp_path, image_mean=mean, image_std=std, prior_alpha=0.5)[0]
    assert len(ds) == 40 and sorted(ds.sample_documents.tolist()) == list(range(40))
    low = ds.dataset
    truncated = 0
    for idx in range(len(ds)):
        sample = ds[idx]
        doc = int(ds.sample_documents[idx])
        caption, lp = low[doc]
        n = min(len(caption), 12)
        truncated += len(caption) > 12
        assert sample["tokens"][0] == IMAGE
        np.testing.assert_array_equal(sample["tokens"][1:n + 1].numpy(), caption[:n][: 11])
        np.testing.assert_array_equal(sample["labels"][:n].numpy(), caption[:n])
        assert not sample["labels"][n:].any() and not sample["tokens"][n + 1:].any()  # pad embeds as 0
        np.testing.assert_array_equal(sample["loss_mask"].numpy(), (np.arange(12) < n).astype(np.float32))
        w = (1 - np.exp(lp.astype(np.float64))) ** 0.5
        expected = np.zeros(12)
        expected[:n] = len(caption) * w[:n] / w.sum()  # the whole caption's normaliser
        np.testing.assert_allclose(sample["loss_weights"].numpy(), expected, rtol=1e-6, atol=1e-7)
        if len(caption) <= 12:
            assert abs(sample["loss_weights"].sum().item() - len(caption)) < 1e-4
        image = (images[doc].astype(np.float64).transpose(2, 0, 1) / 255 - np.reshape(mean, (3, 1, 1))) \
            / np.reshape(std, (3, 1, 1))
        assert sample["images"].dtype == torch.float32 and sample["images"].shape == (3, H, W)
        np.testing.assert_allclose(sample["images"].numpy(), image, rtol=1e-5, atol=1e-5)
        kinds = np.zeros(12, dtype=np.int64)
        kinds[:n] = low.kinds[doc][:n]
        np.testing.assert_array_equal(sample["token_kinds"].numpy(), kinds)
        torch.testing.assert_close(sample["position_ids"], torch.arange(12))
    assert truncated > 0
    padding = ds[None]
    assert not padding["loss_mask"].any() and not padding["loss_weights"].any()


def test_splits_and_more_samples_than_captions(tmp_path):
    prefix, _ = write_captions(tmp_path / "C", n=50)
    train, valid, test = build(prefix, tmp_path, split="6,2,2", sizes=(130, 10, 10))
    assert len(train) == 130 and len(valid) == 10
    train_docs, valid_docs = set(train.sample_documents.tolist()), set(valid.sample_documents.tolist())
    assert not train_docs & valid_docs and len(train_docs) == 30
    counts = np.bincount(train.sample_documents, minlength=50)[sorted(train_docs)]
    assert counts.min() >= 4 and counts.max() <= 5  # whole epochs, shuffled


def test_refusals(tmp_path):
    no_images, _ = write_captions(tmp_path / "N", with_images=False)
    with pytest.raises(FormatError, match=r"N\.images: missing file"):
        build(no_images, tmp_path)
    no_eod, _ = write_captions(tmp_path / "E", end_in_eod=False)
    with pytest.raises(ValueError, match="a caption dataset needs documents that end in EOD"):
        build(no_eod, tmp_path)
    other, _ = write_captions(tmp_path / "O", n=7)
    prefix, _ = write_captions(tmp_path / "C", n=9)
    import shutil

    shutil.copy(other + ".images", prefix + ".images")
    with pytest.raises(FormatError, match="7 images for 9 documents"):
        build(prefix, tmp_path)


def test_image_store_refusals(tmp_path):
    prefix, images = write_captions(tmp_path / "C", n=4)
    path = images_path(prefix)
    store = ImageStore(path, expected_count=4)
    np.testing.assert_array_equal(store[2], images[2])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1])
    with pytest.raises(FormatError, match="truncated or unfinished"):
        ImageStore(path)
    open(path, "wb").write(b"NOTASTORE" + data[9:])
    with pytest.raises(FormatError, match="not an image store"):
        ImageStore(path)
    # An unfinished writer (count still 0 in the header) is refused.
    files = AtomicFiles()
    writer = ImageStoreWriter(str(tmp_path / "x.images"), H, W, files)
    writer.add(images[0])
    writer._file.flush()
    tmp_name = files._pairs[0][0]
    with pytest.raises(FormatError, match="truncated or unfinished"):
        ImageStore(tmp_name)
    with pytest.raises(ValueError, match="expected"):
        writer.add(np.zeros((H + 1, W, 3), np.uint8))
    writer.abort()
    files.abort()
