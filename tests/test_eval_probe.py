"""The POPE-style probe on hand-made models: one that reads the image perfectly scores 1,
one that cannot tell the captions apart scores exactly 0.5, and one that guesses at random
scores about 0.5."""

import json
import random
import re

import pytest

from megatron_prior.data.records import BadRecord
from megatron_prior.demo import generator
from megatron_prior.eval.probe import (PROBE_SPLITS, ProbeItem, accuracy_by_split, load_probe_items, outcomes,
                                       probe_accuracy)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe")
    summary = generator.main(["--output-dir", str(out), "--num-train", "100", "--num-heldout", "200",
                              "--seed", "11", "--no-progress"])
    return out, summary


def _perfect_reader(out, summary):
    """Log-likelihood 0 for a caption whose every named object is in the image, -10 per
    object that is not: a model that reads the image perfectly."""
    scenes = {}
    for line in (out / "heldout.jsonl").read_text().splitlines():
        r = json.loads(line)
        scenes[str(out / r["image"])] = {(o["color"], o["shape"]) for o in r["objects"]}
    pattern = re.compile(r"\b(%s) (%s)\b" % ("|".join(summary["colors"]), "|".join(summary["shapes"])))
    return lambda image, caption: -10.0 * sum(p not in scenes[image] for p in pattern.findall(caption))


def test_perfect_image_reader_scores_one(data):
    out, summary = data
    items = load_probe_items(out / "probe.jsonl")
    assert len(items) == 600 and all(i.image.startswith(str(out)) for i in items)
    assert probe_accuracy(_perfect_reader(out, summary), items) == {s: 1.0 for s in (*PROBE_SPLITS, "all")}


def test_model_that_cannot_tell_captions_apart_scores_half_exactly(data):
    items = load_probe_items(data[0] / "probe.jsonl")
    assert probe_accuracy(lambda image, caption: -3.25, items) == {s: 0.5 for s in (*PROBE_SPLITS, "all")}


def test_random_scores_give_about_half():
    rng = random.Random(0)
    items = [ProbeItem(str(i), "img.png", f"pos {i}", f"neg {i}", PROBE_SPLITS[i % 3]) for i in range(6000)]
    acc = probe_accuracy(lambda image, caption: rng.random(), items)
    # 2,000 items per split: binomial sd ~0.011, so 0.05 is over 4 sd.
    assert all(abs(v - 0.5) < 0.05 for v in acc.values()), acc


def test_outcomes_and_ties_by_hand():
    assert outcomes([1.0, 0.0, -2.0, float("-inf")], [0.0, 1.0, -2.0, float("-inf")]).tolist() == [1.0, 0.0, 0.5, 0.5]
    assert accuracy_by_split([1.0, 0.0, 0.5, 1.0], ["random", "random", "popular", "adversarial"]) == {
        "random": 0.5, "popular": 0.5, "adversarial": 1.0, "all": 0.625}


def test_bad_scores_are_refused():
    items = [ProbeItem("a", "x.png", "p", "n", "random"), ProbeItem("b", "x.png", "p2", "n2", "random")]
    with pytest.raises(ValueError, match="NaN for item b"):
        probe_accuracy(lambda image, caption: float("nan") if caption == "n2" else 0.0, items)


@pytest.mark.parametrize("record,message", [
    ({"id": "x", "image": "i.png", "positive": "a", "negative": "b", "split": "easy"}, "split 'easy'"),
    ({"id": "x", "image": "i.png", "positive": "a", "negative": "a", "split": "random"}, "identical"),
    ({"id": "x", "image": "i.png", "positive": "a", "split": "random"}, "missing key 'negative'"),
])
def test_bad_probe_files_are_refused_with_line(tmp_path, record, message):
    good = {"id": "ok", "image": "/abs/i.png", "positive": "a", "negative": "b", "split": "popular"}
    path = tmp_path / "probe.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(BadRecord, match=re.escape(f"{path}:2: ") + ".*" + re.escape(message)):
        load_probe_items(path)
    path.write_text(json.dumps(good) + "\n")
    assert load_probe_items(path)[0].image == "/abs/i.png"
