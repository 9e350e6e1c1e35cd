"""Image-caption ingestion, side by side with its anchors.

1. Ingest: images/s through tools/preprocess_with_weights.py (in-process, a LLaVA JSON and an
   image folder of generated JPEGs, unigram reference so that scoring costs next to nothing)
   with the encoded store (the files' bytes, checked by one full decode) vs the raw store
   (decoded, fitted and written as pixels: the anchor, the path before the encoded store), and
   each store's size against the input images' bytes.
2. Batches: samples/s of CaptionDataset over each store (the encoded one decodes and fits in
   __getitem__, which runs in the DataLoader workers), at the demo's image size (32 px PNG)
   and at LLaVA's (336 px JPEG): which store a small demo should use.
3. Scoring: reference tokens/s scored (and the whole tool) vs a bare forward pass of the same
   GPT over the same tokens (bench_packing.py's preprocessing part, printed here too).

Timings are interleaved and the fastest of --repeats counts (the machine may be shared).

    .venv/bin/python benchmarks/bench_ingest.py                 # the defaults
    .venv/bin/python benchmarks/bench_ingest.py --quick         # seconds: proves it runs, times nothing useful
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
import sys
import tempfile
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

warnings.filterwarnings("ignore", message=".*(Transformer Engine|Apex) .*not installed.*")

from benchmarks.bench_packing import _captions, _Clock, bench_preprocessing  # noqa: E402
from benchmarks.bench_packing import parse_args as packing_args  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images per ingest measurement")
    parser.add_argument("--source-size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"),
                        help="generated JPEG size for the ingest part (default: 480 640, a typical web photo)")
    parser.add_argument("--image-size", type=int, default=336, help="--image-size the stores are made for")
    parser.add_argument("--workers", type=int, default=1, help="--workers of the tool")
    parser.add_argument("--batch-samples", type=int, default=500, help="samples read per batch measurement")
    parser.add_argument("--captions", type=int, default=2900, help="captions for the scoring part")
    parser.add_argument("--window", type=int, default=128, help="reference GPT's sequence length (scoring part)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved measurements; the fastest counts")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, not a measurement")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.source_size, args.image_size, args.batch_samples = 24, (60, 80), 32, 24
        args.captions, args.window, args.repeats = 200, 32, 1
    return args


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smooth gradients plus noise: JPEG sizes like a photo's, not like noise or a flat colour."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    base = np.stack([np.sin(x / rng.uniform(20, 80) + c) * np.cos(y / rng.uniform(20, 80) - c) for c in range(3)], -1)
    return np.clip(127 + 100 * base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def write_llava(folder: Path, n: int, size: tuple[int, int], fmt: str, captions: list[str]) -> int:
    """A LLaVA JSON + image folder of ``n`` generated images; returns the images' total bytes."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (folder / "images").mkdir(parents=True)
    records, total = [], 0
    for i in range(n):
        buf = io.BytesIO()
        Image.fromarray(_photo(rng, *size)).save(buf, fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        name = f"{i:07d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        (folder / "images" / name).write_bytes(buf.getvalue())
        total += len(buf.getvalue())
        records.append({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image briefly."},
            {"from": "gpt", "value": captions[i % len(captions)]}]})
    (folder / "llava.json").write_text(json.dumps(records))
    return total


def _tool_args(folder: Path, image_size: int, store: str, workers: int) -> argparse.Namespace:
    from tools.preprocess_with_weights import build_parser, validate_args

    parser = build_parser()
    return validate_args(parser, parser.parse_args([
        "--input", str(folder / "llava.json"), "--image-root", str(folder / "images"), "--json-keys", "caption",
        "--tokenizer-model", str(folder.parent / "tok.model"), "--append-eod", "--image-size", str(image_size),
        "--image-store", store, "--output-prefix", str(folder / store), "--reference-type", "unigram",
        "--workers", str(workers), "--log-interval", str(10 ** 9)]))


def bench_ingest(args, root: Path, captions: list[str]) -> dict:
    from megatron_prior.preprocess import run

    folder = root / "ingest"
    source_bytes = write_llava(folder, args.images, tuple(args.source_size), "JPEG", captions)
    clocks: dict[str, list] = {"encoded": [], "raw": []}
    for _ in range(args.repeats):
        for store in ("raw", "encoded"):
            tool_args = _tool_args(folder, args.image_size, store, args.workers)
            with _Clock() as clock:
                assert run(tool_args) == 0
            clocks[store].append(clock)
    best = {k: min(v, key=lambda c: c.wall) for k, v in clocks.items()}
    sizes = {k: os.path.getsize(folder / f"{k}_caption_document.images") for k in clocks}
    return {"images": args.images, "source": f"JPEG {args.source_size[0]}x{args.source_size[1]}",
            "image_size": args.image_size, "workers": args.workers, "source_bytes": source_bytes,
            "images_per_s": {k: args.images / c.wall for k, c in best.items()},
            "images_per_cpu_s": {k: args.images / max(c.cpu, 1e-9) for k, c in best.items()},
            "store_bytes": sizes, "store_vs_source": {k: v / source_bytes for k, v in sizes.items()}}


def bench_batches(args, root: Path, captions: list[str]) -> list[dict]:
    """CaptionDataset samples/s over an encoded and a raw store of the same images."""
    from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder

    from megatron_prior.data.caption_dataset import CaptionDataset, CaptionDatasetConfig
    from megatron_prior.preprocess import run
    from megatron_prior.tokenizer import load_tokenizer

    tok = load_tokenizer(str(root / "tok.model"))
    out = []
    cases = [("demo: 32 px PNG", (32, 32), "PNG", 32), (f"LLaVA: {args.source_size[0]}x{args.source_size[1]} "
                                                        f"JPEG -> {args.image_size}", tuple(args.source_size), "JPEG",
                                                        args.image_size)]
    for n, (label, size, fmt, image_size) in enumerate(cases):
        folder = root / f"batches{n}"
        write_llava(folder, args.batch_samples, size, fmt, captions)
        datasets = {}
        for store in ("raw", "encoded"):
            assert run(_tool_args(folder, image_size, store, args.workers)) == 0
            config = CaptionDatasetConfig(random_seed=1, sequence_length=64, split="1,0,0", tokenizer=tok,
                                          blend=([str(folder / f"{store}_caption_document")], None),
                                          path_to_cache=str(folder / f"cache_{store}"))
            datasets[store], _, _ = BlendedMegatronDatasetBuilder(
                CaptionDataset, [args.batch_samples, 0, 0], lambda: True, config).build()
        clocks: dict[str, list] = {k: [] for k in datasets}
        for _ in range(args.repeats):
            for store, ds in datasets.items():
                with _Clock() as clock:
                    for i in range(len(ds)):
                        ds[i]
                clocks[store].append(clock)
        best = {k: min(v, key=lambda c: c.wall) for k, v in clocks.items()}
        out.append({"case": label, "samples": args.batch_samples,
                    "samples_per_s": {k: args.batch_samples / c.wall for k, c in best.items()}})
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    from tools.train_tokenizer import main as train_tokenizer

    out = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
           "command": "python benchmarks/bench_ingest.py " + " ".join(argv if argv is not None else sys.argv[1:])}
    with tempfile.TemporaryDirectory(prefix="bench_ingest_") as tmp:
        root = Path(tmp)
        _captions(root / "captions.jsonl", 200)
        captions = [json.loads(line)["caption"] for line in open(root / "captions.jsonl")]
        assert train_tokenizer(["--input", str(root / "captions.jsonl"), "--json-keys", "caption",
                                "--vocab-size", "500", "--output-prefix", str(root / "tok")]) == 0

        r = out["ingest"] = bench_ingest(args, root, captions)
        print(f"== ingest: {r['images']} {r['source']} images ({r['source_bytes'] / 1e6:.1f} MB) -> --image-size "
              f"{r['image_size']}, --workers {r['workers']}, unigram reference; fastest of {args.repeats}")
        print(f"   {'store':<34} {'images/s':>9} {'vs raw':>6} {'per CPU-s':>10} {'vs raw':>6} {'MB':>8} "
              f"{'vs input':>8}")
        wall, cpu = r["images_per_s"], r["images_per_cpu_s"]
        for key, label in (("raw", "raw (decoded pixels; the anchor)"), ("encoded", "encoded (the files' bytes)")):
            print(f"   {label:<34} {wall[key]:>9.1f} {wall[key] / wall['raw']:>5.2f}x {cpu[key]:>10.1f} "
                  f"{cpu[key] / cpu['raw']:>5.2f}x {r['store_bytes'][key] / 1e6:>8.2f} "
                  f"{r['store_vs_source'][key]:>7.3f}x")

        out["batches"] = bench_batches(args, root, captions)
        print(f"== batches: CaptionDataset samples/s over each store (one process; fastest of {args.repeats})")
        print(f"   {'case':<40} {'raw':>9} {'encoded':>9} {'encoded/raw':>12}")
        for r in out["batches"]:
            s = r["samples_per_s"]
            print(f"   {r['case']:<40} {s['raw']:>9.1f} {s['encoded']:>9.1f} {s['encoded'] / s['raw']:>11.2f}x")

    if not args.skip_scoring:
        scoring = packing_args(["--skip-packing", "--captions", str(args.captions), "--window", str(args.window),
                                "--repeats", str(args.repeats)])
        r = out["scoring"] = bench_preprocessing(scoring)
        print(f"== scoring: {r['tokens']} tokens, reference {r['model']}, window {r['window']}; fastest of "
              f"{args.repeats}")
        print(f"   {'':<44} {'tokens/s':>10} {'time vs forward':>16}")
        for label, key in (("bare forward pass (the anchor)", "forward"), ("scorer (log-probs)", "score"),
                           ("whole tool", "tool")):
            print(f"   {label:<44} {r['tokens'] / r[key + '_s']:>10.0f} {r[key + '_s'] / r['forward_s']:>15.2f}x")
        met = "met" if r["tool_vs_forward"] <= 1.3 else "NOT met"
        print(f"   target <= 1.3x (whole tool vs bare forward): {met}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
