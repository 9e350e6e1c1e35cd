"""POPE-style probe items: a held-out caption against the same caption with one object
(a colour-shape pair) swapped for one the image does not contain.

Three ways to choose the absent object, as POPE does (Li et al., 2023):

- ``random``: any absent pair, uniformly;
- ``popular``: the absent pair most frequent in the training scenes, the one a model that
  leans on the language prior is most tempted to name;
- ``adversarial``: an absent pair that differs from the replaced object in one attribute
  only (same colour or same shape), choosing the one that co-occurs most often with the
  image's objects in the training scenes. Only one word of the caption changes.

The replaced object is drawn once per held-out image, so the three splits differ only in
the negative.
"""

from __future__ import annotations

import math
import random
import re
from collections import Counter
from dataclasses import dataclass, field

from megatron_prior.demo.captions import replace_words
from megatron_prior.demo.scenes import SceneObject, SceneSpec
from megatron_prior.eval.probe import PROBE_SPLITS

Pair = tuple[str, str]


@dataclass
class ObjectStats:
    """How often each colour-shape pair occurs in the training scenes, alone and together."""

    frequency: Counter = field(default_factory=Counter)
    cooccurrence: Counter = field(default_factory=Counter)

    def add_scene(self, scene: list[SceneObject]) -> None:
        pairs = sorted({o.pair for o in scene})
        self.frequency.update(o.pair for o in scene)
        self.cooccurrence.update((a, b) for a in pairs for b in pairs if a != b)


def choose_negative(split: str, rng: random.Random, spec: SceneSpec, stats: ObjectStats,
                    scene: list[SceneObject], replaced: SceneObject) -> Pair:
    present = {o.pair for o in scene}
    order = {p: k for k, p in enumerate(spec.pairs)}  # deterministic tie-break
    absent = [p for p in spec.pairs if p not in present]
    if split == "random":
        candidates = absent
        key = None
    elif split == "popular":
        candidates = absent
        key = lambda p: (-stats.frequency[p], order[p])  # noqa: E731
    elif split == "adversarial":
        candidates = [p for p in absent if (p[0] == replaced.color) != (p[1] == replaced.shape)]
        key = lambda p: (-sum(stats.cooccurrence[(q, p)] for q in present),  # noqa: E731
                         -stats.frequency[p], order[p])
    else:
        raise ValueError(f"unknown probe split {split!r}; known: {', '.join(PROBE_SPLITS)}")
    if not candidates:
        raise ValueError(f"no absent object for the {split} split of scene {[o.pair for o in scene]}: "
                         "use more colours or shapes (--num-colors, --num-shapes)")
    return rng.choice(candidates) if key is None else min(candidates, key=key)


def probe_items_for(record: dict, scene: list[SceneObject], object_spans: list[dict], rng: random.Random,
                    spec: SceneSpec, stats: ObjectStats) -> list[dict]:
    """One item per split for a held-out ``record`` whose caption names ``scene``."""
    i = rng.randrange(len(scene))
    replaced = scene[i]
    items = []
    for split in PROBE_SPLITS:
        color, shape = choose_negative(split, rng, spec, stats, scene, replaced)
        edits = {object_spans[i][attr]: new for attr, old, new in
                 (("color", replaced.color, color), ("shape", replaced.shape, shape)) if new != old}
        items.append({"id": f"{record['id']}-{split}", "image": record["image"],
                      "positive": record["caption"], "negative": replace_words(record["caption"], edits),
                      "split": split, "heldout_id": record["id"], "object": i,
                      "present": list(replaced.pair), "absent": [color, shape]})
    return items


def pair_frequency_scorer(spec: SceneSpec, stats: ObjectStats):
    """A scorer that ignores the image and knows only how often each object occurs in
    training: the log-frequency of the colour-shape pairs a caption names. Its probe accuracy
    is the level a text-prior-only model reaches (above 0.5 on ``random`` and below on
    ``popular`` when objects are skewed), the baseline to read the models against."""
    pattern = re.compile(r"\b(%s) (%s)\b" % ("|".join(spec.colors), "|".join(spec.shapes)))

    def score(image: str, caption: str) -> float:
        return sum(math.log(stats.frequency[m] + 1) for m in pattern.findall(caption))

    return score
