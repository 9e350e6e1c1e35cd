"""Captions for a scene, with the kind of every word as character spans.

The spans tile the caption: every character belongs to exactly one span, and the space
before a word belongs to that word. Tokenizers differ on whether a word's leading space
starts its first token (SentencePiece's "▁red") or ends the previous one; with tiling spans
the first character of any token lies in the span of the word the token starts, so
``tools/preprocess_with_weights.py``'s "kind of the span holding the token's first
character" rule gives every caption token a grounded, template or unrelated kind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from megatron_prior.demo.scenes import SceneObject, SceneSpec
from megatron_prior.demo.vocab import COUNT_WORDS, FIRST_NAMES, LAST_NAMES, MONTHS, PLACES

GROUNDED, TEMPLATE, UNRELATED = "grounded", "template", "unrelated"
PUNCTUATION = frozenset(".,:")


@dataclass
class Caption:
    """A caption being built word by word; ``object_spans[i][attr]`` locates the word naming
    attribute ``attr`` ("color", "shape") of the scene's object ``i``."""

    text: str = ""
    spans: list[list] = field(default_factory=list)
    object_spans: list[dict[str, tuple[int, int]]] = field(default_factory=list)

    def add(self, words: str, kind: str, obj: int | None = None, attr: str | None = None) -> None:
        """Append space-separated ``words`` of one kind (punctuation attaches to the left)."""
        for word in words.split():
            start = len(self.text)
            self.text += word if (word in PUNCTUATION or not self.text) else " " + word
            self.spans.append([start, len(self.text), kind])
            if obj is not None:
                self.object_spans[obj][attr] = (len(self.text) - len(word), len(self.text))


def _count_phrase(n: int) -> str:
    if n >= len(COUNT_WORDS):
        raise ValueError(f"no count word for {n} objects")
    return COUNT_WORDS[n]


def _opening(cap: Caption, rng: random.Random, n: int) -> None:
    plural = n != 1
    form = rng.randrange(3)
    if form == 0:
        cap.add("a photo of", TEMPLATE)
        cap.add(_count_phrase(n), GROUNDED)
        cap.add("shapes :" if plural else "shape :", TEMPLATE)
    elif form == 1:
        cap.add("there are" if plural else "there is", TEMPLATE)
        cap.add(_count_phrase(n), GROUNDED)
        cap.add("objects in the picture ." if plural else "object in the picture .", TEMPLATE)
    else:
        cap.add("an image showing", TEMPLATE)
        cap.add(_count_phrase(n), GROUNDED)
        cap.add("shapes :" if plural else "shape :", TEMPLATE)


def _object_clause(cap: Caption, rng: random.Random, i: int, obj: SceneObject) -> None:
    if rng.random() < 0.5:
        cap.add("a", TEMPLATE)
        cap.add(obj.size, GROUNDED)
        cap.add(obj.color, GROUNDED, i, "color")
        cap.add(obj.shape, GROUNDED, i, "shape")
        cap.add("at the", TEMPLATE)
        cap.add(obj.position, GROUNDED)
    else:
        cap.add("the", TEMPLATE)
        cap.add(obj.position, GROUNDED)
        cap.add("has a", TEMPLATE)
        cap.add(obj.size, GROUNDED)
        cap.add(obj.color, GROUNDED, i, "color")
        cap.add(obj.shape, GROUNDED, i, "shape")


def _metadata(cap: Caption, rng: random.Random) -> None:
    """A tag no image shows: 1-4 of place, photographer, date, price, in a fixed order."""
    fields = [f for f in ("place", "by", "date", "price") if rng.random() < 0.5] or [rng.choice(["place", "by", "date", "price"])]
    for k, f in enumerate(fields):
        if k:
            cap.add(",", TEMPLATE)
        if f == "place":
            cap.add("taken in", TEMPLATE)
            cap.add(rng.choice(PLACES), UNRELATED)
        elif f == "by":
            cap.add("photo by", TEMPLATE)
            cap.add(f"{rng.choice(FIRST_NAMES)} {rng.choice(LAST_NAMES)}", UNRELATED)
        elif f == "date":
            cap.add("on", TEMPLATE)
            cap.add(f"{rng.randint(1, 28)} {rng.choice(MONTHS)} {rng.randint(1990, 2024)}", UNRELATED)
        else:
            cap.add("sold for", TEMPLATE)
            cap.add(str(rng.randint(2, 999)), UNRELATED)
            cap.add("dollars", TEMPLATE)
    cap.add(".", TEMPLATE)


def build_caption(rng: random.Random, scene: list[SceneObject], unrelated_rate: float) -> Caption:
    """The caption of ``scene``: an opening with the count, one clause per object in reading
    order, and with probability ``unrelated_rate`` a metadata tag."""
    cap = Caption(object_spans=[{} for _ in scene])
    _opening(cap, rng, len(scene))
    for i, obj in enumerate(scene):
        if i:
            cap.add("and" if i == len(scene) - 1 else ",", TEMPLATE)
        _object_clause(cap, rng, i, obj)
    cap.add(".", TEMPLATE)
    if rng.random() < unrelated_rate:
        _metadata(cap, rng)
    return cap


def replace_words(text: str, edits: dict[tuple[int, int], str]) -> str:
    """``text`` with each character range ``(start, end)`` replaced; ranges must not overlap."""
    out, pos = [], 0
    for (start, end), word in sorted(edits.items()):
        if start < pos:
            raise ValueError(f"overlapping edits at {start} in {text!r}")
        out += [text[pos:start], word]
        pos = end
    return "".join(out) + text[pos:]


def add_noise(rng: random.Random, cap: Caption, scene: list[SceneObject], spec: SceneSpec) -> dict:
    """Replace one colour or shape word with a wrong one (the image disagrees); returns the
    record of what changed. Lengths may change, so spans after the edit are shifted."""
    i = rng.randrange(len(scene))
    attr = rng.choice(["color", "shape"])
    true = getattr(scene[i], attr)
    wrong = rng.choice([v for v in (spec.colors if attr == "color" else spec.shapes) if v != true])
    start, end = cap.object_spans[i][attr]
    shift = len(wrong) - (end - start)
    cap.text = replace_words(cap.text, {(start, end): wrong})
    for span in cap.spans:
        if span[0] >= end:
            span[0] += shift
        if span[1] >= end:
            span[1] += shift
    for spans in cap.object_spans:
        for a, (s, e) in spans.items():
            spans[a] = (s + shift if s >= end else s, e + shift if e >= end else e)
    return {"object": i, "attribute": attr, "true": true, "wrong": wrong, "span": [start, start + len(wrong)]}
