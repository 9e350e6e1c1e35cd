"""Real input formats (JSONL, LLaVA JSON, COCO JSON, webdataset shards) through
tools/preprocess_with_weights.py into the encoded image store, and the pixels it decodes to."""

import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
import webdataset
from PIL import Image

from megatron_prior.data import FormatError, WeightedDatasetWriter, WeightedIndexedDataset, open_image_store
from megatron_prior.data.images import (
    PAD_COLOUR,
    EncodedImageStore,
    StoredImages,
    decode_image,
    load_image,
    stored_images,
)
from megatron_prior.data.sources import detect_format, expand_inputs
from megatron_prior.tokenizer import load_tokenizer

pytestmark = pytest.mark.timeout(300)
WORDS = ["red", "green", "blue", "cube", "sphere", "cone", "small", "large", "on", "a", "table", "photo", "of"]
HUMAN = "<image>\nRender a clear and concise summary of the photo."


def _image(kind: str, rng: np.random.Generator) -> tuple[str, bytes]:
    """(extension, bytes) of a small generated image: odd aspect ratios, several modes, one
    rotated by its EXIF orientation."""
    def pixels(h, w, c):
        return rng.integers(0, 256, (h, w, c) if c > 1 else (h, w), dtype=np.uint8)

    buf = io.BytesIO()
    if kind == "png_rgb":
        Image.fromarray(pixels(8, 13, 3)).save(buf, "PNG")
    elif kind == "jpeg_tall":
        Image.fromarray(pixels(15, 7, 3)).save(buf, "JPEG", quality=90)
    elif kind == "png_gray":
        Image.fromarray(pixels(9, 11, 1), "L").save(buf, "PNG")
    elif kind == "png_rgba":
        Image.fromarray(pixels(6, 10, 4), "RGBA").save(buf, "PNG")
    elif kind == "jpeg_exif":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: the camera was turned, show rotated 90 degrees clockwise
        Image.fromarray(pixels(6, 12, 3)).save(buf, "JPEG", quality=90, exif=exif)
    elif kind == "webp":
        Image.fromarray(pixels(10, 10, 3)).save(buf, "WEBP", lossless=True)
    ext = {"png": "png", "jpeg": "jpg", "webp": "webp"}[kind.split("_")[0]]
    return ext, buf.getvalue()


KINDS = ["png_rgb", "jpeg_tall", "png_gray", "png_rgba", "jpeg_exif", "webp", "png_rgb", "jpeg_tall"]


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    """The same eight samples as a JSONL, a LLaVA JSON, a COCO JSON (all with an image folder)
    and two webdataset shards; and a tokenizer trained on the captions."""
    from tools.train_tokenizer import main as train

    root = tmp_path_factory.mktemp("sources")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    items = []
    for i, kind in enumerate(KINDS):
        ext, data = _image(kind, rng)
        name = f"{i:06d}.{ext}"
        (root / "images" / name).write_bytes(data)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))
        items.append({"key": f"{i:06d}", "name": name, "ext": ext, "data": data, "caption": caption})
    jsonl = root / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"caption": it["caption"], "image": f"images/{it['name']}"}) + "\n"
                             for it in items))
    llava = root / "llava.json"
    llava.write_text(json.dumps([{"id": it["key"], "image": it["name"], "conversations": [
        {"from": "human", "value": HUMAN}, {"from": "gpt", "value": it["caption"]}]} for it in items]))
    coco = root / "coco.json"
    coco.write_text(json.dumps({
        "images": [{"id": 100 + i, "file_name": it["name"], "height": 1, "width": 1} for i, it in enumerate(items)],
        "annotations": [{"id": 7 * i, "image_id": 100 + i, "caption": it["caption"]} for i, it in enumerate(items)]}))
    (root / "wds").mkdir()
    for shard, part in enumerate((items[:5], items[5:])):
        with webdataset.TarWriter(str(root / "wds" / f"shard-{shard:05d}.tar")) as sink:
            for it in part:
                sink.write({"__key__": it["key"], it["ext"]: it["data"], "txt": it["caption"]})
    # The human prompt goes into the tokenizer's training text too: its words then have
    # tokens, and leaving the prompt out is what keeps them out of the token file.
    (root / "tok.jsonl").write_text("".join(json.dumps({"caption": it["caption"] + " " + HUMAN}) + "\n"
                                            for it in items))
    assert train(["--input", str(root / "tok.jsonl"), "--json-keys", "caption", "--vocab-size", "90",
                  "--output-prefix", str(root / "tok")]) == 0
    return {"root": root, "items": items, "jsonl": jsonl, "llava": llava, "coco": coco,
            "wds": str(root / "wds" / "shard-{00000..00001}.tar"), "tok": str(root / "tok.model")}


def run_tool(*args, check=True):
    from tools.preprocess_with_weights import main

    status = main([str(a) for a in args])
    if check:
        assert status == 0
    return status


def preprocess(samples, fmt, out, *extra, check=True):
    args = ["--input", samples[fmt], "--json-keys", "caption", "--tokenizer-model", samples["tok"], "--append-eod",
            "--output-prefix", out, "--reference-type", "unigram", "--image-size", "12", *extra]
    if fmt == "jsonl":
        args += ["--image-key", "image"]
    elif fmt != "wds":
        args += ["--image-root", samples["root"] / "images"]
    return run_tool(*args, check=check)


BOUND_SUFFIXES = (".bin", ".idx", ".logprobs.bin", ".logprobs.idx", ".images")


def test_every_format_gives_the_same_dataset_and_batches(samples, tmp_path):
    from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    assert [detect_format(expand_inputs([str(samples[f])])) for f in ("jsonl", "llava", "coco", "wds")] == \
        ["jsonl", "llava", "coco", "wds"]
    prefixes = {}
    for fmt in ("jsonl", "llava", "coco", "wds"):
        preprocess(samples, fmt, tmp_path / fmt, "--workers", "2" if fmt == "llava" else "1")
        prefixes[fmt] = str(tmp_path / f"{fmt}_caption_document")
    for suffix in BOUND_SUFFIXES:
        contents = {fmt: open(p + suffix, "rb").read() for fmt, p in prefixes.items()}
        assert len(set(contents.values())) == 1, suffix

    tok = load_tokenizer(samples["tok"])
    ds = WeightedIndexedDataset(prefixes["llava"], tokenizer_fingerprint=tok.fingerprint)
    items = samples["items"]
    assert len(ds) == len(items)
    prompt = set(tok.tokenize(HUMAN))
    for i, it in enumerate(items):
        tokens, _ = ds[i]
        np.testing.assert_array_equal(tokens, tok.tokenize(it["caption"]) + [tok.eod])
        assert not (prompt - set(tok.tokenize(it["caption"]))) & set(tokens.tolist())  # no prompt token leaks in
    store = ds.open_images()
    assert isinstance(store, EncodedImageStore) and store.shape == (len(items), 12, 12, 3) and store.aspect == "pad"
    source_bytes = sum(len(it["data"]) for it in items)
    assert os.path.getsize(prefixes["llava"] + ".images") <= 1.05 * source_bytes
    for i, it in enumerate(items):
        assert store.encoded(i) == it["data"]  # the file's bytes, as given

    batches = {}
    for fmt, prefix in prefixes.items():
        config = CaptionDatasetConfig(random_seed=1, sequence_length=16, blend=([prefix], None), split="1,0,0",
                                      tokenizer=tok, path_to_cache=str(tmp_path / f"cache_{fmt}"))
        train, _, _ = BlendedMegatronDatasetBuilder(CaptionDataset, [6, 0, 0], lambda: True, config).build()
        loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=1)  # decoded in a worker
        batches[fmt] = list(loader)
    for fmt in ("jsonl", "coco", "wds"):
        for a, b in zip(batches["llava"], batches[fmt]):
            assert a.keys() == b.keys()
            for key in a:
                assert torch.equal(a[key], b[key]), (fmt, key)
    # The decoded pixels are the documented fit of each source image, through one worker or not.
    docs = train.sample_documents[:6]
    images = torch.cat([b["images"] for b in batches["wds"]]).numpy()
    for row, doc in enumerate(docs.tolist()):
        expected = decode_image(items[doc]["data"], 12, 12, "pad").astype(np.float32).transpose(2, 0, 1) / 255
        np.testing.assert_array_equal(images[row], expected)


def test_raw_store_still_works(samples, tmp_path):
    preprocess(samples, "llava", tmp_path / "raw", "--image-store", "raw", "--image-aspect", "crop")
    preprocess(samples, "llava", tmp_path / "enc", "--image-aspect", "crop")
    raw = WeightedIndexedDataset(str(tmp_path / "raw_caption_document")).open_images()
    enc = WeightedIndexedDataset(str(tmp_path / "enc_caption_document")).open_images()
    assert raw.kind == "raw" and enc.kind == "encoded" and enc.aspect == "crop"
    for i, it in enumerate(samples["items"]):
        np.testing.assert_array_equal(raw[i], enc[i])
        np.testing.assert_array_equal(raw[i], load_image(str(samples["root"] / "images" / it["name"]), 12, 12, "crop"))
    assert os.path.getsize(tmp_path / "raw_caption_document.images") == 64 + len(samples["items"]) * 12 * 12 * 3
    # What the metadata records of a store (the trainer's default --image-size and --image-aspect,
    # evaluation's probe rule for a checkpoint without one); stores from before the rule was
    # recorded were stretched.
    assert [stored_images(str(tmp_path / f"{store}_caption_document")) for store in ("raw", "enc")] == [
        StoredImages(str(tmp_path / f"{store}_caption_document.images"), kind, 12, 12, "crop")
        for store, kind in (("raw", "raw"), ("enc", "encoded"))]
    with WeightedDatasetWriter(str(tmp_path / "old"), np.uint16, image_size=(2, 2)) as writer:
        writer.add_document(np.array([5, 6]), np.full(2, -1.0, np.float32), image=np.zeros((2, 2, 3), np.uint8))
        writer.finalize("sha256:x", {"type": "unigram"})
    assert stored_images(str(tmp_path / "old")) == StoredImages(str(tmp_path / "old.images"), "raw", 2, 2, "stretch")


def test_an_encoded_store_is_read_at_any_size_a_raw_one_only_as_written(samples, tmp_path):
    """Training's --image-size/--image-aspect: an encoded store decodes its bytes to them (in a
    spawned DataLoader worker too, which gets the store pickled); a raw store refuses others,
    naming its file."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig

    preprocess(samples, "llava", tmp_path / "enc")
    preprocess(samples, "llava", tmp_path / "raw", "--image-store", "raw")
    enc, raw = (str(tmp_path / f"{store}_caption_document") for store in ("enc", "raw"))
    config = CaptionDatasetConfig(random_seed=1, sequence_length=16, blend=([enc], None), split="1,0,0",
                                  tokenizer=load_tokenizer(samples["tok"]), path_to_cache=str(tmp_path / "cache"),
                                  image_size=20, image_aspect="crop")
    train, _, _ = BlendedMegatronDatasetBuilder(CaptionDataset, [8, 0, 0], lambda: True, config).build()
    assert train.images.shape == (len(samples["items"]), 20, 20, 3) and train.images.aspect == "crop"
    unpickled = pickle.loads(pickle.dumps(train.images))
    for row in range(len(train)):
        doc = int(train.sample_documents[row])
        expected = decode_image(samples["items"][doc]["data"], 20, 20, "crop")
        pixels = expected.astype(np.float32).transpose(2, 0, 1) / 255
        np.testing.assert_array_equal(train[row]["images"].numpy(), pixels)
        np.testing.assert_array_equal(unpickled[doc], expected)
    assert WeightedIndexedDataset(enc).open_images().fitted_to().shape[1:] == (12, 12, 3)  # default: the header's
    store = WeightedIndexedDataset(raw).open_images()
    assert store.fitted_to(12, 12, "pad") is store and store.fitted_to() is store
    for size, aspect in ((20, "pad"), (12, "crop")):
        with pytest.raises(ValueError, match=f"^{re.escape(raw)}.images is a raw image store: its pixels were "
                                             rf"fitted to 12x12 \(pad\) when it was preprocessed, so it cannot be "
                                             rf"read at {size}x{size} \({aspect}\)"):
            store.fitted_to(size, size, aspect)
    config.blend = ([raw], None)
    with pytest.raises(ValueError, match="is a raw image store"):
        BlendedMegatronDatasetBuilder(CaptionDataset, [8, 0, 0], lambda: True, config).build()


def test_coco_captions_per_image(samples, tmp_path):
    """Five captions of one photo: five records, the image stored once."""
    root = samples["root"]
    items = samples["items"][:3]
    coco = root / "coco5.json"
    coco.write_text(json.dumps({
        "images": [{"id": i, "file_name": it["name"]} for i, it in enumerate(items)],
        "annotations": [{"id": 10 * n + i, "image_id": i, "caption": f"{it['caption']} {WORDS[n]}"}
                        for n in range(5) for i, it in enumerate(items)]}))
    samples = {**samples, "coco5": coco}
    preprocess(samples, "coco5", tmp_path / "all")
    preprocess(samples, "coco5", tmp_path / "first", "--coco-captions-per-image", "first")
    tok = load_tokenizer(samples["tok"])
    every = WeightedIndexedDataset(str(tmp_path / "all_caption_document"))
    first = WeightedIndexedDataset(str(tmp_path / "first_caption_document"))
    assert len(every) == 15 and len(first) == 3
    for i, it in enumerate(items):
        np.testing.assert_array_equal(first[i][0], tok.tokenize(f"{it['caption']} {WORDS[0]}") + [tok.eod])
        np.testing.assert_array_equal(every[3 + i][0], tok.tokenize(f"{it['caption']} {WORDS[1]}") + [tok.eod])
        assert every.open_images().encoded(3 + i) == it["data"]
    # The header, each image's bytes once, and a 16-byte (offset, length) entry per record.
    size = os.path.getsize(tmp_path / "all_caption_document.images")
    assert size == 64 + sum(len(it["data"]) for it in items) + 16 * 15


# --- pixels: each aspect rule computed with numpy where no resampling is involved -----------

def _png(array, mode=None, exif=None):
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, "PNG", **({"exif": exif} if exif else {}))
    return buf.getvalue()


def test_pad_crop_stretch_pixels():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (6, 10, 3), dtype=np.uint8)
    expected = np.empty((10, 10, 3), np.uint8)
    expected[:] = PAD_COLOUR
    expected[2:8] = wide  # centred: (10 - 6) // 2 rows above
    np.testing.assert_array_equal(decode_image(_png(wide), 10, 10, "pad"), expected)
    tall = rng.integers(0, 256, (10, 7, 3), dtype=np.uint8)
    expected[:] = PAD_COLOUR
    expected[:, 1:8] = tall  # (10 - 7) // 2 columns to the left
    np.testing.assert_array_equal(decode_image(_png(tall), 10, 10, "pad"), expected)

    long = rng.integers(0, 256, (10, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(long), 10, 10, "crop"), long[:, 3:13])  # the centre 10 columns
    np.testing.assert_array_equal(decode_image(_png(tall.transpose(1, 0, 2)), 10, 10, "pad"),
                                  expected.transpose(1, 0, 2))

    # Stretch widens rows of one colour each: every output row is that colour.
    rows = np.repeat(rng.integers(0, 256, (10, 1, 3), dtype=np.uint8), 4, axis=1)
    np.testing.assert_array_equal(decode_image(_png(rows), 10, 10, "stretch"), np.repeat(rows[:, :1], 10, axis=1))
    assert not np.array_equal(decode_image(_png(rows), 10, 10, "pad"), decode_image(_png(rows), 10, 10, "stretch"))


def test_modes_and_exif_orientation():
    rng = np.random.default_rng(2)
    gray = rng.integers(0, 256, (8, 8), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(gray, "L"), 8, 8), np.stack([gray] * 3, axis=-1))
    rgba = rng.integers(0, 256, (8, 8, 4), dtype=np.uint8)
    np.testing.assert_array_equal(decode_image(_png(rgba, "RGBA"), 8, 8), rgba[..., :3])  # alpha dropped
    pixels = rng.integers(0, 256, (8, 5, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    rotated = decode_image(_png(pixels, exif=exif), 5, 8, "stretch")
    np.testing.assert_array_equal(rotated, np.rot90(pixels, k=-1))


# --- bad inputs -------------------------------------------------------------------------------

def _truncated_jpeg(samples):
    data = samples["items"][1]["data"]
    assert data[:2] == b"\xff\xd8"
    return data[: len(data) // 2]


def test_truncated_jpeg_at_batch_time_names_file_and_record(samples, tmp_path):
    """A store written with damaged bytes (preprocessing would refuse them) fails where a batch
    is made, naming the store and the record, inside a DataLoader worker too."""
    from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    tok = load_tokenizer(samples["tok"])
    prefix = str(tmp_path / "bad")
    with WeightedDatasetWriter(prefix, np.uint16, image_size=(8, 8), image_store="encoded") as writer:
        for i in range(3):
            image = _truncated_jpeg(samples) if i == 2 else samples["items"][i]["data"]
            writer.add_document(np.array([5, 6, tok.eod]), np.full(3, -1.0, np.float32), image=image)
        writer.finalize(tok.fingerprint, {"type": "unigram"})
    store = open_image_store(prefix + ".images")
    store[1]
    with pytest.raises(FormatError, match=rf"{prefix}\.images: image of record 2 .* cannot be decoded: damaged image "
                                          r"file \(OSError: Truncated File Read\)"):
        store[2]
    config = CaptionDatasetConfig(random_seed=1, sequence_length=8, blend=([prefix], None), split="1,0,0",
                                  tokenizer=tok, path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(CaptionDataset, [3, 0, 0], lambda: True, config).build()
    loader = torch.utils.data.DataLoader(train, batch_size=3, num_workers=1)
    # The DataLoader re-raises a worker's error as RuntimeError with the worker's traceback,
    # which ends in the store's message, with no PIL frame in it.
    with pytest.raises(RuntimeError, match=r"bad\.images: image of record 2 .*cannot be decoded") as caught:
        next(iter(loader))
    assert "PIL" not in str(caught.value).split("FormatError")[0]


def test_bad_records_of_every_format(samples, tmp_path, capsys):
    root = samples["root"]
    items = samples["items"]
    (root / "images" / "cut.jpg").write_bytes(_truncated_jpeg(samples))
    llava = root / "bad_llava.json"
    llava.write_text(json.dumps([
        {"id": "a", "image": items[0]["name"], "conversations": [{"from": "human", "value": HUMAN},
                                                                 {"from": "gpt", "value": items[0]["caption"]}]},
        {"id": "b", "image": items[1]["name"], "conversations": [{"from": "human", "value": HUMAN}]},
        {"id": "c", "image": "cut.jpg", "conversations": [{"from": "gpt", "value": "a red cube"}]},
        {"id": "d", "image": "missing.png", "conversations": [{"from": "gpt", "value": "a red cube"}]},
        "not a record",
    ]))
    samples = {**samples, "bad_llava": llava}
    assert preprocess(samples, "bad_llava", tmp_path / "l", "--input-format", "llava", check=False) == 1
    assert f"{llava}:record 1 (id 'b'): no 'gpt' turn in 'conversations'" in capsys.readouterr().err
    preprocess(samples, "bad_llava", tmp_path / "l", "--skip-bad-records")
    err = capsys.readouterr().err
    assert "read 5 records: wrote 1 documents" in err and "skipped 4 bad records (2 image, 2 record;" in err, err
    log = (tmp_path / "l_bad_records.log").read_text().splitlines()
    assert log[0] == f"{llava}:record 1 (id 'b'): no 'gpt' turn in 'conversations' (the caption)"
    assert log[1] == f"{llava}:record 2 (id 'c'): image cut.jpg: damaged image file (OSError: Truncated File Read)"
    assert log[2] == f"{llava}:record 3 (id 'd'): image missing.png: No such file or directory"
    assert log[3] == f"{llava}:record 4: a record must be a JSON object, not str"

    coco = root / "bad_coco.json"
    coco.write_text(json.dumps({"images": [{"id": 1, "file_name": items[0]["name"]}],
                                "annotations": [{"id": 5, "image_id": 1, "caption": "a red cube"},
                                                {"id": 6, "image_id": 2, "caption": "a red cube"},
                                                {"id": 7, "image_id": 1, "caption": 3}]}))
    samples = {**samples, "bad_coco": coco}
    preprocess(samples, "bad_coco", tmp_path / "c", "--skip-bad-records")
    assert (tmp_path / "c_bad_records.log").read_text().splitlines() == [
        f"{coco}:annotation 1 (id 6): image_id 2 is in no 'images' entry with a 'file_name'",
        f"{coco}:annotation 2 (id 7): 'caption' is int, not a string"]

    shard = tmp_path / "bad.tar"
    with webdataset.TarWriter(str(shard)) as sink:
        sink.write({"__key__": "x0", "png": items[0]["data"], "txt": items[0]["caption"]})
        sink.write({"__key__": "x1", "txt": "no image here"})
        sink.write({"__key__": "x2", "png": items[0]["data"], "jpg": items[1]["data"], "txt": "two images"})
        sink.write({"__key__": "x3", "jpg": items[1]["data"]})
        sink.write({"__key__": "x4", "png": items[0]["data"], "txt": "a red cube"})
        sink.write({"__key__": "x5", "png": items[0]["data"], "txt": "a blue cube"})
    with tarfile.open(shard) as tar:
        cut_at = tar.getmember("x5.png").offset_data + 10  # inside the last sample's image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(shard.read_bytes()[:cut_at])
    samples = {**samples, "wds_bad": str(cut)}
    preprocess(samples, "wds_bad", tmp_path / "w", "--skip-bad-records")
    assert (tmp_path / "w_bad_records.log").read_text().splitlines() == [
        f"{cut}:sample 'x1': no image member (jpg, jpeg, png, webp)",
        f"{cut}:sample 'x2': 2 image members (jpg, png): one is expected",
        f"{cut}:sample 'x3': no caption member (txt or json)",
        # webdataset hands out a sample when the next one starts: x4 goes with the damaged end.
        f"{cut}:after sample 'x3': damaged tar shard (unexpected end of data); the rest of it is not read"]
    assert len(WeightedIndexedDataset(str(tmp_path / "w_caption_document"))) == 1


def test_refused_arguments(samples, tmp_path, capsys):
    with pytest.raises(SystemExit):
        preprocess(samples, "llava", tmp_path / "x", "--kinds-key", "kinds")
    assert "--kinds-key reads JSON records (jsonl, or wds json members), not --input-format llava" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_tool("--input", str(samples["root"] / "wds" / "shard-{00000..00003}.tar"), "--tokenizer-model",
                 samples["tok"], "--output-prefix", tmp_path / "x", "--reference-type", "unigram")
    assert "shard-00002.tar: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run_tool("--input", samples["wds"], "--tokenizer-model", samples["tok"], "--output-prefix", tmp_path / "x",
                 "--reference-type", "unigram")
    assert "--input-format wds needs --image-size" in capsys.readouterr().err
