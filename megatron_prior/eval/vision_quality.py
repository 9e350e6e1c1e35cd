"""How much of the image a vision encoder's features carry: caption retrieval and a linear probe.

- **Retrieval** (models with a text tower): over the whole held-out set, each image's caption
  among all held-out captions (image -> text) and each caption's image among all images
  (text -> image), by cosine similarity of the two embeddings; top-1 and top-5. A tie with the
  right answer counts against it, so identical embeddings score chance, not a hit. Chance is
  k / N.
- **Linear probe** of the frozen features: per image, which colours and which shapes are
  present (multi-label, from the scene records of the demo generator, key ``objects``), one
  logistic regression per label (L2-regularised, fitted by L-BFGS in float64 on the training
  images' standardised features), accuracy on the held-out images. Two readings of the patch
  features the H-LVLM reads: ``probe`` on their mean (what the contrastive loss trains), and
  ``probe_patches`` on all of them side by side (what a linear reader of every image token, as
  the H-LVLM's projector is at its first layer, can get). Chance is the majority-class rule: each
  label's more frequent training value, scored on the held-out images. ``exact``: every label of
  the group right for an image.

The scene records are read beside a preprocessed prefix, record ``i`` for document ``i``; each
record's caption must tokenize to its document (its tokens, then EOD), so labels from another
file, or from a file whose records preprocessing skipped or reordered, are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from tqdm import tqdm

from megatron_prior import parallel
from megatron_prior.data.caption_dataset import CaptionDataset
from megatron_prior.data.records import BadRecord, iter_lines, parse_line, text_field

LABEL_GROUPS = ("color", "shape")
RETRIEVAL_KS = (1, 5)


def read_scene_labels(path: str | os.PathLike, dataset: CaptionDataset,
                      caption_key: str = "caption") -> list[list[dict]]:
    """Each document's objects (``{"shape", "color", ...}`` dicts) from the generator's JSONL,
    record ``i`` checked to be document ``i`` of ``dataset``'s prefix."""
    path = str(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file (the generator's train.jsonl / heldout.jsonl)")
    documents, tokenizer = dataset.dataset, dataset.config.tokenizer
    prefix = documents.path_prefix
    labels: list[list[dict]] = []
    for line, raw in iter_lines(path):
        record = parse_line(path, line, raw)
        caption = text_field(record, caption_key)
        objects = record.data.get("objects")
        if not isinstance(objects, list) or not all(
                isinstance(o, dict) and all(isinstance(o.get(k), str) for k in LABEL_GROUPS) for o in objects):
            raise BadRecord(path, line, "'objects' must be a list of objects with string 'color' and 'shape'")
        doc = len(labels)
        if doc >= len(documents):
            raise ValueError(f"{path}: more records than the {len(documents)} documents of {prefix}")
        tokens = list(tokenizer.tokenize(caption)) + [tokenizer.eod]
        if documents[doc][0].tolist() != tokens:
            raise BadRecord(path, line, f"the caption does not tokenize to document {doc} of {prefix}: these labels "
                                        "are not that dataset's (another split, or records skipped or reordered "
                                        "when it was preprocessed)")
        labels.append(objects)
    if len(labels) != len(documents):
        raise ValueError(f"{path}: {len(labels)} records for the {len(documents)} documents of {prefix}")
    return labels


def presence(objects: Sequence[Sequence[dict]], group: str, names: Sequence[str]) -> np.ndarray:
    """``[n, len(names)]`` 0/1: whether image ``i`` holds an object whose ``group`` is ``names[j]``."""
    out = np.zeros((len(objects), len(names)), dtype=np.float64)
    column = {name: j for j, name in enumerate(names)}
    for i, scene in enumerate(objects):
        for obj in scene:
            if obj[group] in column:
                out[i, column[obj[group]]] = 1.0
    return out


def retrieval(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor,
              ks: Sequence[int] = RETRIEVAL_KS) -> dict[str, float]:
    """``i2t_top{k}``/``t2i_top{k}``: the share of pairs whose match is among the ``k`` most
    similar candidates (cosine similarity), a tie with the match counting against it."""
    if image_embeddings.shape != text_embeddings.shape:
        raise ValueError(f"{list(image_embeddings.shape)} image and {list(text_embeddings.shape)} text embeddings")
    image = torch.nn.functional.normalize(image_embeddings.double(), dim=-1)
    text = torch.nn.functional.normalize(text_embeddings.double(), dim=-1)
    sims = image @ text.t()
    out = {}
    for name, s in (("i2t", sims), ("t2i", sims.t())):
        # Candidates other than the match that score at least as high as it.
        rivals = (s >= s.diagonal()[:, None]).sum(dim=1) - 1
        for k in ks:
            out[f"{name}_top{k}"] = float((rivals < k).double().mean())
    return out


def fit_linear_probe(x: np.ndarray, y: np.ndarray, l2: float = 1e-3, steps: int = 300
                     ) -> Callable[[np.ndarray], np.ndarray]:
    """One logistic regression per column of ``y`` (0/1) on features ``x``, standardised with
    ``x``'s statistics; returns the classifier (features -> 0/1 predictions)."""
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-8
    features = torch.from_numpy((x - mean) / std)
    targets = torch.from_numpy(y.astype(np.float64))
    weight = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(y.shape[1], dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1, max_iter=steps, tolerance_grad=1e-9,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (torch.nn.functional.binary_cross_entropy_with_logits(features @ weight + bias, targets)
                + l2 / 2 * (weight ** 2).sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda z: ((torch.from_numpy((z - mean) / std) @ w + b) > 0).double().numpy()


def probe_scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Mean per-label accuracy, and the share of images with every label right."""
    right = predicted == truth
    return {"accuracy": float(right.mean()), "exact": float(right.all(axis=1).mean())}


def linear_probe(train_x: np.ndarray, train_objects: Sequence[Sequence[dict]], test_x: np.ndarray,
                 test_objects: Sequence[Sequence[dict]], l2: float = 1e-3, steps: int = 300) -> dict:
    """Per label group: the probe's held-out accuracy and exact-set share, the majority rule's
    (chance), and the labels; see the module's docstring."""
    out = {}
    for group in LABEL_GROUPS:
        names = sorted({o[group] for scene in train_objects for o in scene})
        y_train, y_test = presence(train_objects, group, names), presence(test_objects, group, names)
        classify = fit_linear_probe(train_x, y_train, l2, steps)
        majority = np.broadcast_to((y_train.mean(axis=0) > 0.5).astype(np.float64), y_test.shape)
        out[group] = {**probe_scores(classify(test_x), y_test),
                      "chance": probe_scores(majority, y_test), "labels": names}
    return out


@dataclass
class Encoded:
    """One pass over a caption dataset, rows put back in document order."""

    features: np.ndarray                      # [n, vit_hidden] float64: the mean patch features
    patches: np.ndarray                       # [n, patches x vit_hidden] float64: all of them
    image_embeddings: Optional[torch.Tensor]  # [n, embed_dim] (None without a text tower)
    text_embeddings: Optional[torch.Tensor]


@torch.no_grad()
def encode(model: torch.nn.Module, dataset: CaptionDataset, batch_size: int, with_text: bool,
           desc: str = "encode", progress: bool = True) -> Encoded:
    """``model`` (a ``models.contrastive.ContrastiveModel``) over every row of ``dataset`` (one
    epoch, one caption a row): patch features, their mean and, ``with_text``, both embeddings."""
    was_training = model.training
    model.eval()
    n = len(dataset)
    order = np.array([dataset.row_documents(i)[0] for i in range(n)])
    if sorted(order.tolist()) != list(range(len(dataset.dataset))):
        raise ValueError(f"{dataset.dataset.path_prefix}: the dataset's rows are not one epoch of its documents")
    patches, images, texts = [], [], []
    device = parallel.device()
    for start in tqdm(range(0, n, batch_size), desc=desc, unit="batch", disable=not progress):
        rows = [dataset[i] for i in range(start, min(start + batch_size, n))]
        pixels = torch.stack([r["images"] for r in rows]).to(device)
        grid = model.patch_features(pixels)
        pooled = grid.mean(dim=1)
        patches.append(grid.flatten(1).double().cpu())
        if with_text:
            tokens = torch.stack([r["labels"] for r in rows]).to(device)
            lengths = torch.stack([r["loss_mask"] for r in rows]).sum(dim=1).long().to(device)
            images.append(model.image_embeddings(pooled).double().cpu())
            texts.append(model.text_embeddings(tokens, lengths).double().cpu())
    model.train(was_training)
    if not all(torch.isfinite(torch.cat(part)).all() for part in (patches, images, texts) if part):
        raise FloatingPointError(f"{dataset.dataset.path_prefix}: the model's features are not finite")
    inverse = torch.from_numpy(np.argsort(order))
    patches = torch.cat(patches)[inverse]
    return Encoded(patches.reshape(n, -1, model.cfg.vit_hidden_size).mean(dim=1).numpy(), patches.numpy(),
                   torch.cat(images)[inverse] if with_text else None,
                   torch.cat(texts)[inverse] if with_text else None)


def vision_quality(model: torch.nn.Module, train: CaptionDataset, train_labels: Sequence[Sequence[dict]],
                   heldout: CaptionDataset, heldout_labels: Sequence[Sequence[dict]], with_text: bool,
                   batch_size: int = 256, l2: float = 1e-3, steps: int = 300, progress: bool = True) -> dict:
    """The report: retrieval over the held-out set (``with_text``) and the linear probe (fit on
    ``train``, scored on ``heldout``), with chance beside each."""
    fit = encode(model, train, batch_size, False, "probe features (train)", progress)
    test = encode(model, heldout, batch_size, with_text, "held-out", progress)
    n = len(heldout_labels)
    report: dict = {"heldout_images": n, "probe_train_images": len(train_labels),
                    "probe": linear_probe(fit.features, train_labels, test.features, heldout_labels, l2, steps),
                    "probe_patches": linear_probe(fit.patches, train_labels, test.patches, heldout_labels, l2, steps),
                    "probe_features": "probe: the mean of the ViT's patch features (those the H-LVLM reads, class "
                                      "token dropped), frozen; probe_patches: all patch features side by side"}
    if with_text:
        report["retrieval"] = {**retrieval(test.image_embeddings, test.text_embeddings),
                               **{f"chance_top{k}": min(1.0, k / n) for k in RETRIEVAL_KS},
                               "candidates": n, "over": "the whole held-out set"}
    else:
        report["retrieval"] = None
    report["summary"] = summary(report)
    return report


def summary(report: dict) -> str:
    """One line of the report's headline numbers."""
    parts = []
    if report.get("retrieval"):
        r = report["retrieval"]
        parts.append(f"retrieval top-1 over {r['candidates']}: image->text {r['i2t_top1']:.3f}, text->image "
                     f"{r['t2i_top1']:.3f} (chance {r['chance_top1']:.4f})")
    for key, what in (("probe", "mean features"), ("probe_patches", "patch features")):
        for group in LABEL_GROUPS:
            p = report[key][group]
            parts.append(f"{group} probe on {what} {p['accuracy']:.3f} (chance {p['chance']['accuracy']:.3f}), "
                         f"exact {p['exact']:.3f} (chance {p['chance']['exact']:.3f})")
    return "; ".join(parts)

