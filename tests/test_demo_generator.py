"""The demo data generator: deterministic, records as the contract says, captions that say
what the images show, kind spans that tile the captions, and probe items whose negatives
name objects the image lacks."""

import hashlib
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_prior.data.kinds import KIND_NAMES, kinds_from_spans
from megatron_prior.demo import generator
from megatron_prior.demo.vocab import COLORS, COUNT_WORDS, SHAPES

SMALL = ["--num-train", "80", "--num-heldout", "30", "--no-progress"]


def _run(out: Path, *extra: str) -> dict:
    return generator.main(["--output-dir", str(out), *SMALL, *extra])


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("gen")
    _run(out, "--seed", "7", "--unrelated-rate", "0.5")
    return out


def test_same_seed_gives_byte_identical_files(tmp_path):
    _run(tmp_path / "a", "--seed", "3", "--noise-rate", "0.3")
    _run(tmp_path / "b", "--seed", "3", "--noise-rate", "0.3")
    a, b = _digests(tmp_path / "a"), _digests(tmp_path / "b")
    assert len(a) == 80 + 30 + 4 + 2  # images + train/heldout/probe jsonl + summary + a shard per split
    assert a == b
    _run(tmp_path / "c", "--seed", "4", "--noise-rate", "0.3")
    c = _digests(tmp_path / "c")
    assert a["train.jsonl"] != c["train.jsonl"] and a["images/train-000000.png"] != c["images/train-000000.png"]
    assert not list((tmp_path / "a").rglob("*.tmp"))


def test_records_follow_the_contract(data):
    for split, n in (("train", 80), ("heldout", 30)):
        records = _read(data / f"{split}.jsonl")
        assert [r["id"] for r in records] == [f"{split}-{i:06d}" for i in range(n)]
        for r in records:
            assert list(r) == ["id", "caption", "image", "kinds", "objects", "noise"]
            img = Image.open(data / r["image"])
            assert img.size == (32, 32) and img.mode == "RGB"
            # Spans tile the caption: contiguous, covering every character, known kinds.
            assert r["kinds"][0][0] == 0 and r["kinds"][-1][1] == len(r["caption"])
            assert all(a[1] == b[0] for a, b in zip(r["kinds"], r["kinds"][1:]))
            assert all(s < e and k in ("grounded", "template", "unrelated") for s, e, k in r["kinds"])


def test_captions_say_what_the_scene_holds(data):
    for r in _read(data / "train.jsonl"):
        words = lambda kind: [r["caption"][s:e].strip() for s, e, k in r["kinds"] if k == kind]  # noqa: E731
        grounded = words("grounded")
        objs = r["objects"]
        assert 1 <= len(objs) <= 3
        expected = [COUNT_WORDS[len(objs)]]
        for o in objs:
            expected += [o["size"], o["color"], o["shape"], *o["position"].split()]
        assert Counter(grounded) == Counter(expected), r["caption"]
        # Template words never carry image content; unrelated words never name a colour or shape.
        content = set(COLORS) | set(SHAPES) | {"small", "large"}
        assert not content & set(words("template")) and not content & set(words("unrelated"))
        cells = [(o["row"], o["col"]) for o in objs]
        assert cells == sorted(set(cells))  # distinct cells, reading order


def test_pixels_show_the_objects(data):
    """Each object's cell holds its colour (the core of the rendered shape is nearest the
    named colour, edges being blended with the background) and empty cells hold only
    background."""
    for r in _read(data / "heldout.jsonl")[:10]:
        px = np.asarray(Image.open(data / r["image"]), dtype=np.float64)
        occupied = {(o["row"], o["col"]): o for o in r["objects"]}
        for row in range(3):
            for col in range(3):
                cell = px[row * 32 // 3 + 2:(row + 1) * 32 // 3 - 2, col * 32 // 3 + 2:(col + 1) * 32 // 3 - 2]
                bright = cell[cell.max(axis=-1) > 90]
                if (row, col) not in occupied:
                    assert bright.size == 0, (r["id"], row, col)
                else:
                    core = bright[bright.sum(axis=1) >= np.quantile(bright.sum(axis=1), 0.75)]
                    colour = np.median(core, axis=0)
                    nearest = min(COLORS, key=lambda c: np.abs(np.asarray(COLORS[c]) - colour).sum())
                    assert nearest == occupied[(row, col)]["color"], (r["id"], row, col, colour)


def test_spans_give_every_token_a_kind(data):
    """Whether a tokenizer puts a word's leading space in the word's first token (as
    SentencePiece's "▁red" does) or not, no caption token ends up "other"."""
    for r in _read(data / "train.jsonl")[:20]:
        text = r["caption"]
        with_space = [m.start() for m in re.finditer(r" ?[^ ]+", text)]
        without = [m.start() for m in re.finditer(r"[^ ]+", text)]
        for starts in (with_space, without):
            kinds = kinds_from_spans(starts, r["kinds"], len(text))
            assert KIND_NAMES[0] == "other" and (kinds != 0).all()


def test_noise_replaces_one_word_in_training_only(tmp_path):
    _run(tmp_path, "--noise-rate", "1.0")
    for r in _read(tmp_path / "train.jsonl"):
        (noise,) = r["noise"]
        obj = r["objects"][noise["object"]]
        assert noise["true"] == obj[noise["attribute"]] != noise["wrong"]
        s, e = noise["span"]
        assert r["caption"][s:e] == noise["wrong"]
        assert r["kinds"][-1][1] == len(r["caption"])
        assert any(k == "grounded" and r["caption"][a:b].strip() == noise["wrong"] for a, b, k in r["kinds"])
    assert all(not r["noise"] for r in _read(tmp_path / "heldout.jsonl"))
    summary = json.loads((tmp_path / "kinds_summary.json").read_text())
    assert summary["splits"]["train"]["captions_with_noise"] == 80


def test_probe_negatives_name_absent_objects(data):
    heldout = {r["id"]: r for r in _read(data / "heldout.jsonl")}
    train = _read(data / "train.jsonl")
    freq = Counter((o["color"], o["shape"]) for r in train for o in r["objects"])
    summary = json.loads((data / "kinds_summary.json").read_text())
    pairs = [(c, s) for c in summary["colors"] for s in summary["shapes"]]
    items = _read(data / "probe.jsonl")
    assert Counter(i["split"] for i in items) == {"random": 30, "popular": 30, "adversarial": 30}
    for item in items:
        rec = heldout[item["heldout_id"]]
        present = {(o["color"], o["shape"]) for o in rec["objects"]}
        assert item["image"] == rec["image"] and item["positive"] == rec["caption"]
        assert tuple(item["present"]) == (rec["objects"][item["object"]]["color"], rec["objects"][item["object"]]["shape"])
        absent = tuple(item["absent"])
        assert absent not in present
        # The negative is the caption with the object's changed words swapped, nothing else.
        changed = [(a, b) for a, b in zip(item["present"], absent) if a != b]
        assert len(item["negative"].split()) == len(item["positive"].split())
        diff = [(p, n) for p, n in zip(item["positive"].split(), item["negative"].split()) if p != n]
        assert [tuple(x.strip(".,:") for x in d) for d in diff] == changed
        if item["split"] == "popular":
            best = max(freq[p] for p in pairs if p not in present)
            assert freq[absent] == best
        if item["split"] == "adversarial":
            assert len(changed) == 1


def test_summary_counts_match_the_records(data):
    summary = json.loads((data / "kinds_summary.json").read_text())
    for split in ("train", "heldout"):
        records = _read(data / f"{split}.jsonl")
        counts = Counter(k for r in records for _, _, k in r["kinds"])
        assert summary["splits"][split]["words"] == {k: counts[k] for k in ("grounded", "template", "unrelated")}
    assert summary["config"]["num_train"] == 80 and summary["config"]["unrelated_rate"] == 0.5
    baseline = summary["probe"]["pair_frequency_baseline"]
    assert set(baseline) == {"random", "popular", "adversarial", "all"}
    # A text-prior scorer is fooled by popular objects: below chance there, above on random.
    assert baseline["popular"] < 0.5 < baseline["random"]


@pytest.mark.parametrize("flags,message", [
    (["--noise-rate", "1.5"], "--noise-rate"),
    (["--unrelated-rate", "-0.1"], "--unrelated-rate"),
    (["--num-colors", "1"], "--num-colors"),
    (["--num-shapes", "99"], "--num-shapes"),
    (["--max-objects", "10"], "--max-objects"),
    (["--image-size", "8"], "--image-size"),
    (["--num-train", "0"], "--num-train"),
])
def test_bad_flags_are_refused_by_name(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=re.escape(message)):
        _run(tmp_path, *flags)


def test_shards_hold_the_jsonl_records_and_image_files(tmp_path):
    """The webdataset shards the pipeline preprocesses: the JSONL's records and the image files'
    bytes, in order, split into shards of --samples-per-shard."""
    import webdataset

    _run(tmp_path, "--seed", "5", "--samples-per-shard", "30")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["heldout-00000.tar"] + \
        [f"train-0000{i}.tar" for i in range(3)]
    for split in ("train", "heldout"):
        records = _read(tmp_path / f"{split}.jsonl")
        shards = sorted(str(p) for p in tmp_path.glob(f"{split}-*.tar"))
        samples = list(webdataset.tarfile_samples([{"url": s} for s in shards]))
        assert [s["__key__"] for s in samples] == [r["id"] for r in records]
        for sample, record in zip(samples, records):
            assert json.loads(sample["json"]) == record
            assert sample["png"] == (tmp_path / record["image"]).read_bytes()
    _run(tmp_path, "--seed", "5", "--samples-per-shard", "1000")
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["heldout-00000.tar", "train-00000.tar"]
