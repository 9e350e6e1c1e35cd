"""Image store readers (``images.open_image_store``: the raw and the encoded store): the
``.images`` file, and the layout the dataset's metadata binds (second part, JSON ``{"count",
"height", "width"}`` and optionally ``"store"``, ``"aspect"``; anything else means no binding).
An accepted store must serve every image it claims as ``[H, W, 3]`` (an encoded image whose
bytes do not decode raises FormatError naming the record), also after pickling (a DataLoader
worker reopens it)."""

from __future__ import annotations

import json
import os
import pickle
from typing import Callable, Optional

import numpy as np

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import Corpus
from megatron_prior.data.formats import IMAGE_ASPECTS, FormatError, images_path, metadata_path
from megatron_prior.data.images import open_image_store

ERRORS = (FormatError,)
_SHAPE_KEYS = ("count", "height", "width")
_LAYOUT = {"store": ("raw", "encoded"), "aspect": IMAGE_ASPECTS}


def seeds(corpus: Corpus) -> list[bytes]:
    store = open(images_path(corpus.data), "rb").read()
    with open(metadata_path(corpus.data)) as f:
        bound = {k: v for k, v in json.load(f)["files"]["images"].items() if k in _SHAPE_KEYS + tuple(_LAYOUT)}
    return [pack(0, [store, json.dumps(bound).encode()]), pack(0, [store, None])]


def _binding(part: Optional[bytes]) -> Optional[dict]:
    """The layout as the metadata check (``formats._check_files``) lets it through, or None."""
    try:
        bound = json.loads(part) if part is not None else None
    except (ValueError, RecursionError):
        return None
    if isinstance(bound, dict) and all(type(bound.get(k)) is int and bound[k] >= 0 for k in _SHAPE_KEYS) \
            and all(bound.get(k, allowed[0]) in allowed for k, allowed in _LAYOUT.items()):
        return bound
    return None


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    path = os.path.join(workdir, "t.images")

    def one(data: bytes) -> None:
        _, (store_bytes, shape) = unpack(data, 2)
        write_files([path], [store_bytes])
        store = open_image_store(path, expected=_binding(shape))
        n, h, w, c = store.shape
        if store.kind == "raw":
            assert os.path.getsize(path) == 64 + n * h * w * c
        if n:
            assert store[0].shape == store[n - 1].shape == (h, w, c)
            int(np.asarray(store[n - 1]).sum())
        again = pickle.loads(pickle.dumps(store))
        assert again.shape == store.shape

    return one
