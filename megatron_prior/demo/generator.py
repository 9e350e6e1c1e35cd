"""Render the demo's image-caption benchmark offline, deterministically from a seed.

    python -m megatron_prior.demo.generator --output-dir demo_output/data --num-train 4000 \
        --num-heldout 400 --seed 1234

writes (image paths in the JSONL are relative to the JSONL's directory):

- ``train.jsonl``, ``heldout.jsonl``: one record per image, ``{"id", "caption", "image",
  "kinds": [[char_start, char_end, "grounded"|"template"|"unrelated"], ...], "objects":
  [{"shape", "color", "size", "row", "col", "position"}, ...], "noise": [...]}``; the kind
  spans tile the caption (see ``captions.py``); ``noise`` lists the words deliberately made
  wrong (training only, ``--noise-rate``; they keep the kind "grounded");
- ``images/{id}.png``: RGB, ``--image-size`` square;
- ``train-00000.tar``, ... and ``heldout-00000.tar``, ...: the same records as webdataset shards
  of ``--samples-per-shard`` samples (the Megatron/energon convention), each sample the image
  (``{id}.png``, the bytes of ``images/{id}.png``) and its record (``{id}.json``, as in the
  JSONL). The pipeline preprocesses these, as a user's shards would be; the JSONL and the
  image folder serve the tokenizer, the probe and the analyses;
- ``probe.jsonl``: three POPE-style items per held-out image (see ``probe_items.py``);
- ``kinds_summary.json``: the configuration, word counts by kind, and the probe's
  text-prior baseline; written last, so its presence marks a complete data set.

Held-out records come from the training distribution; every image is a new render (shapes
move, resize and change shade a little), but a held-out scene (objects, sizes and cells) may
repeat a training scene, which is common for one-object scenes. ``kinds_summary.json`` says
how often (``heldout_scenes_seen_in_train``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import webdataset
from tqdm import tqdm

from megatron_prior.demo.captions import GROUNDED, TEMPLATE, UNRELATED, add_noise, build_caption
from megatron_prior.demo.probe_items import ObjectStats, pair_frequency_scorer, probe_items_for
from megatron_prior.demo.scenes import SceneObject, SceneSpec, render_scene, sample_scene
from megatron_prior.files import atomic_write_bytes, atomic_write_json, atomic_write_jsonl, temp_path
from megatron_prior.eval.probe import load_probe_items, probe_accuracy

FORMAT_VERSION = 1


@dataclass(frozen=True)
class GeneratorConfig:
    output_dir: str
    num_train: int = 4000
    num_heldout: int = 400
    seed: int = 1234
    image_size: int = 32
    num_colors: int = 6
    num_shapes: int = 5
    min_objects: int = 1
    max_objects: int = 3
    object_skew: float = 0.5
    unrelated_rate: float = 0.3
    noise_rate: float = 0.0
    samples_per_shard: int = 1000

    def validate(self) -> None:
        if self.samples_per_shard < 1:
            raise ValueError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.num_train < 1 or self.num_heldout < 1:
            raise ValueError(f"--num-train and --num-heldout must be >= 1, got {self.num_train} and {self.num_heldout}")
        for flag, rate in (("--unrelated-rate", self.unrelated_rate), ("--noise-rate", self.noise_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{flag} must be in [0, 1], got {rate}")

    def scene_spec(self) -> SceneSpec:
        return SceneSpec.build(self.num_colors, self.num_shapes, self.object_skew, self.min_objects, self.max_objects)


def _rng(seed: int, *parts) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random: stable across Python versions
    # and platforms, and each record gets its own stream (independent of the others' count).
    return random.Random(":".join(str(p) for p in (seed, *parts)))


def _scene_key(scene: list[SceneObject]) -> tuple:
    return tuple(sorted((o.row, o.col, o.color, o.shape, o.size) for o in scene))


@dataclass
class _Example:
    record: dict
    scene: list[SceneObject]
    object_spans: list[dict]
    png: bytes


def _make_example(cfg: GeneratorConfig, spec: SceneSpec, split: str, index: int, out: Path) -> _Example:
    rng = _rng(cfg.seed, split, index)
    scene = sample_scene(rng, spec)
    cap = build_caption(rng, scene, cfg.unrelated_rate)
    image = render_scene(rng, scene, cfg.image_size)
    noise = [add_noise(rng, cap, scene, spec)] if split == "train" and rng.random() < cfg.noise_rate else []
    rid = f"{split}-{index:06d}"
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(out / "images" / f"{rid}.png", buf.getvalue())
    record = {"id": rid, "caption": cap.text, "image": f"images/{rid}.png", "kinds": cap.spans,
              "objects": [o.to_json() for o in scene], "noise": noise}
    return _Example(record, scene, cap.object_spans, buf.getvalue())


def _write_shards(out: Path, split: str, examples: list[_Example], per_shard: int) -> None:
    """``{split}-NNNNN.tar`` webdataset shards of the examples (fixed mtime: the same seed gives
    the same bytes); shards of an earlier, larger run are removed first (a glob would read them)."""
    for stale in out.glob(f"{split}-*.tar"):
        stale.unlink()
    for n, start in enumerate(range(0, len(examples), per_shard)):
        final = out / f"{split}-{n:05d}.tar"
        tmp = temp_path(str(final))
        try:
            with open(tmp, "wb") as f, webdataset.TarWriter(f, mtime=0) as sink:
                for ex in examples[start:start + per_shard]:
                    # Serialised as the JSONL lines are (files.atomic_write_jsonl).
                    record = json.dumps(ex.record, ensure_ascii=False, allow_nan=False)
                    sink.write({"__key__": ex.record["id"], "png": ex.png, "json": record.encode("utf-8")})
            os.replace(tmp, final)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def _split_summary(examples: list[_Example]) -> dict:
    words, chars = Counter(), Counter()
    for ex in examples:
        for start, end, kind in ex.record["kinds"]:
            words[kind] += 1
            chars[kind] += end - start
    total = sum(words.values())
    return {
        "records": len(examples),
        "words": {k: words[k] for k in (GROUNDED, TEMPLATE, UNRELATED)},
        "chars": {k: chars[k] for k in (GROUNDED, TEMPLATE, UNRELATED)},
        "word_fraction": {k: words[k] / total for k in (GROUNDED, TEMPLATE, UNRELATED)},
        "captions_with_unrelated": sum(any(s[2] == UNRELATED for s in ex.record["kinds"]) for ex in examples),
        "captions_with_noise": sum(bool(ex.record["noise"]) for ex in examples),
        "objects_per_image": {str(n): c for n, c in sorted(Counter(len(ex.scene) for ex in examples).items())},
    }


def _fraction_seen(heldout: list[_Example], train: list[_Example]) -> dict[str, float]:
    """Per number of objects, the fraction of held-out scenes that also occur in training."""
    seen = {_scene_key(ex.scene) for ex in train}
    by_n: dict[int, list[bool]] = {}
    for ex in heldout:
        by_n.setdefault(len(ex.scene), []).append(_scene_key(ex.scene) in seen)
    result = {f"{n}_objects": sum(v) / len(v) for n, v in sorted(by_n.items())}
    result["all"] = sum(sum(v) for v in by_n.values()) / len(heldout)
    return result


def generate(cfg: GeneratorConfig, progress: bool = True) -> dict:
    """Write the data set under ``cfg.output_dir``; returns what ``kinds_summary.json`` holds."""
    cfg.validate()
    spec = cfg.scene_spec()
    out = Path(cfg.output_dir)
    bar = tqdm(total=cfg.num_train + cfg.num_heldout, desc="rendering", unit="img", disable=not progress)

    train, stats = [], ObjectStats()
    for i in range(cfg.num_train):
        train.append(_make_example(cfg, spec, "train", i, out))
        stats.add_scene(train[-1].scene)
        bar.update()
    heldout = []
    for i in range(cfg.num_heldout):
        heldout.append(_make_example(cfg, spec, "heldout", i, out))
        bar.update()
    bar.close()

    probe = [item for i, ex in enumerate(heldout)
             for item in probe_items_for(ex.record, ex.scene, ex.object_spans, _rng(cfg.seed, "probe", i), spec, stats)]
    atomic_write_jsonl(out / "train.jsonl", [ex.record for ex in train])
    atomic_write_jsonl(out / "heldout.jsonl", [ex.record for ex in heldout])
    _write_shards(out, "train", train, cfg.samples_per_shard)
    _write_shards(out, "heldout", heldout, cfg.samples_per_shard)
    atomic_write_jsonl(out / "probe.jsonl", probe)

    baseline = probe_accuracy(pair_frequency_scorer(spec, stats), load_probe_items(out / "probe.jsonl"))
    summary = {
        "format_version": FORMAT_VERSION,
        "config": {k: v for k, v in asdict(cfg).items() if k != "output_dir"},
        "colors": list(spec.colors),
        "shapes": list(spec.shapes),
        "splits": {"train": _split_summary(train), "heldout": _split_summary(heldout)},
        "probe": {"items": dict(Counter(item["split"] for item in probe)),
                  "pair_frequency_baseline": baseline},
        "heldout_scenes_seen_in_train": _fraction_seen(heldout, train),
        "train_object_frequency": {f"{c} {s}": stats.frequency[(c, s)] for c, s in spec.pairs},
    }
    atomic_write_json(out / "kinds_summary.json", summary)
    return summary


def build_parser() -> argparse.ArgumentParser:
    d = GeneratorConfig(output_dir="")
    p = argparse.ArgumentParser(
        prog="python -m megatron_prior.demo.generator",
        description="Render a synthetic image-caption benchmark whose captions mix grounded words "
                    "(what the image shows), template words (predictable from the text) and unrelated "
                    "metadata (a place, a photographer, a date, a price that no image shows), with each "
                    "word's kind as character spans, plus POPE-style probe items for the held-out images. "
                    "The same flags and seed give byte-identical files.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output-dir", required=True, help="folder for train.jsonl, heldout.jsonl, probe.jsonl, "
                   "kinds_summary.json, images/ and the webdataset shards train-*.tar, heldout-*.tar")
    p.add_argument("--num-train", type=int, default=d.num_train, help="training image-caption pairs")
    p.add_argument("--num-heldout", type=int, default=d.num_heldout,
                   help="held-out pairs; each gives 3 probe items")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of everything random")
    p.add_argument("--image-size", type=int, default=d.image_size, help="image width and height in pixels")
    p.add_argument("--num-colors", type=int, default=d.num_colors, help="colours in use (a prefix of the known ones)")
    p.add_argument("--num-shapes", type=int, default=d.num_shapes, help="shapes in use (a prefix of the known ones)")
    p.add_argument("--min-objects", type=int, default=d.min_objects, help="fewest objects in a scene")
    p.add_argument("--max-objects", type=int, default=d.max_objects, help="most objects in a scene (at most 9)")
    p.add_argument("--object-skew", type=float, default=d.object_skew,
                   help="Zipf exponent of colour and shape frequencies (0: uniform); a skew gives the "
                        "probe's 'popular' split a language prior to resist")
    p.add_argument("--unrelated-rate", type=float, default=d.unrelated_rate,
                   help="fraction of captions that end with an unrelated metadata tag")
    p.add_argument("--noise-rate", type=float, default=d.noise_rate,
                   help="fraction of training captions with one colour or shape word replaced by a wrong one")
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard,
                   help="samples per webdataset shard (train-00000.tar, ...)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    cfg = GeneratorConfig(**{k: v for k, v in vars(args).items() if k != "no_progress"})
    try:
        summary = generate(cfg, progress=not args.no_progress)
    except ValueError as e:
        raise SystemExit(f"megatron_prior.demo.generator: {e}") from None
    tr, ho = summary["splits"]["train"], summary["splits"]["heldout"]
    frac = tr["word_fraction"]
    print(f"wrote {tr['records']} train + {ho['records']} held-out pairs and "
          f"{sum(summary['probe']['items'].values())} probe items to {cfg.output_dir}; train words: "
          f"grounded {frac['grounded']:.1%}, template {frac['template']:.1%}, unrelated {frac['unrelated']:.1%}; "
          f"text-prior probe baseline {summary['probe']['pair_frequency_baseline']}")
    return summary


if __name__ == "__main__":
    main()
