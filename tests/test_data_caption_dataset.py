"""CaptionDataset (LVLM samples) and the image store it reads."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

from megatron_prior.data import FormatError, ImageStore
from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
from megatron_prior.data.images import ImageStoreWriter, images_path
from megatron_prior.data.writer import WeightedDatasetWriter

EOD, PAD, IMAGE, VOCAB, H, W = 2, 1, 3, 100, 6, 5


class Tok:
    vocab_size, eod, pad, image_token_id = VOCAB, EOD, PAD, IMAGE
    fingerprint = "sha256:captions"
    unique_identifiers = OrderedDict(cls="Tok", fingerprint=fingerprint)


def write_captions(prefix, n=40, seed=0, with_images=True, end_in_eod=True):
    rng = np.random.default_rng(seed)
    images = []
    with WeightedDatasetWriter(str(prefix), np.uint16, with_kinds=True,
                               image_size=(H, W) if with_images else None) as w:
        for _ in range(n):
            k = int(rng.integers(2, 20))
            doc = rng.integers(4, VOCAB, k)
            if end_in_eod:
                doc[-1] = EOD
            lp = -rng.exponential(1.0, k).astype(np.float32)
            if with_images:
                images.append(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))
            w.add_document(doc, lp, rng.integers(0, 4, k).astype(np.uint8), images[-1] if with_images else None)
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
    with pytest.raises(FormatError, match=r"N\.images: missing file \(.*N\.logprobs\.json binds no images"):
        build(no_images, tmp_path)
    no_eod, _ = write_captions(tmp_path / "E", end_in_eod=False)
    with pytest.raises(ValueError, match="a caption dataset needs documents that end in EOD"):
        build(no_eod, tmp_path)
    other, _ = write_captions(tmp_path / "O", n=7)
    prefix, _ = write_captions(tmp_path / "C", n=9)
    import shutil

    shutil.copy(other + ".images", prefix + ".images")
    with pytest.raises(FormatError, match=r"C\.images: header disagrees with the dataset's metadata: count 7 "
                                          r"\(bound: 9\)$"):
        build(prefix, tmp_path)


def test_token_ids_outside_the_vocabulary(tmp_path):
    """An id between the tokenizer's vocabulary and the model's padded one would train silently."""
    class Small(Tok):
        vocab_size = 50

    prefix, _ = write_captions(tmp_path / "C")  # ids up to VOCAB = 100
    config = CaptionDatasetConfig(random_seed=3, sequence_length=12, blend=([prefix], None), split="1,0,0",
                                  tokenizer=Small(), path_to_cache=str(tmp_path / "cache"))
    with pytest.raises(FormatError, match=r"C\.bin: token id \d+ at token \d+ \(sequence \d+\) outside the "
                                          r"tokenizer's vocabulary \[0, 50\)$"):
        BlendedMegatronDatasetBuilder(CaptionDataset, [None] * 3, lambda: True, config).build()


@pytest.mark.parametrize("alpha", [float("nan"), -0.5, float("inf")])
def test_prior_alpha_must_be_finite_and_not_negative(tmp_path, alpha):
    prefix, _ = write_captions(tmp_path / "C", n=4)
    with pytest.raises(ValueError, match=rf"alpha must be a finite number >= 0, got {alpha!r}$"):
        build(prefix, tmp_path, prior_alpha=alpha)


def _set_header(path, n, h, w, c=3):
    data = bytearray(open(path, "rb").read())
    data[16:48] = np.asarray([n, h, w, c], dtype="<u8").tobytes()
    open(path, "wb").write(bytes(data))


def test_image_store_refusals(tmp_path):
    prefix, images = write_captions(tmp_path / "C", n=4)
    path = images_path(prefix)
    store = ImageStore(path, expected={"count": 4, "height": H, "width": W})
    np.testing.assert_array_equal(store[2], images[2])
    data = open(path, "rb").read()
    open(path, "wb").write(data[:-1])
    with pytest.raises(FormatError, match="truncated or unfinished"):
        ImageStore(path)
    open(path, "wb").write(b"NOTASTORE" + data[9:])
    with pytest.raises(FormatError, match="not an image store"):
        ImageStore(path)
    # An unfinished writer (count still 0 in the header) is refused.
    writer = ImageStoreWriter(str(tmp_path / "x.images.tmp"), H, W)
    writer.add(images[0])
    writer._file.flush()
    with pytest.raises(FormatError, match=r"x\.images\.tmp: \d+ bytes, expected 64 for 0 images of 6x5x3 "
                                          r"\(truncated or unfinished\)$"):
        ImageStore(writer.path)
    with pytest.raises(ValueError, match="expected"):
        writer.add(np.zeros((H + 1, W, 3), np.uint8))
    writer.abort()


def test_image_header_with_a_huge_empty_layout(tmp_path):
    """n = 0 with H x W beyond what numpy can address: named, not numpy's 'array is too big'."""
    writer = ImageStoreWriter(str(tmp_path / "e.images"), H, W)
    writer.close()
    _set_header(writer.path, 0, 2**40, 2**40)
    with pytest.raises(FormatError, match=r"e\.images: unsupported image layout H=1099511627776 W=1099511627776 C=3"):
        ImageStore(writer.path)


def test_image_header_that_lies_about_the_shape(tmp_path):
    """A header saying 10x3 for a 6x5 store (as 16x4 for 8x8): the same byte count, other images."""
    prefix, _ = write_captions(tmp_path / "C", n=4)
    _set_header(images_path(prefix), 4, 10, 3)
    assert ImageStore(images_path(prefix)).shape == (4, 10, 3, 3)  # alone, the header is all there is
    with pytest.raises(FormatError, match=r"C\.images: header disagrees with the dataset's metadata: "
                                          rf"height 10 \(bound: {H}\), width 3 \(bound: {W}\)$"):
        build(prefix, tmp_path)
