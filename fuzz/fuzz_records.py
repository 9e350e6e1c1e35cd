"""JSONL record parser (``records`` and ``preprocess.RecordProcessor``): a JSONL file whose
records name ``img.png`` beside it (second part: that file's bytes, decoded by PIL), each
line processed as the preprocessing tool processes it (caption, kind spans, image), the
file read as the tokenizer trainer reads it (``iter_texts``, bad lines collected)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Callable

import numpy as np

from fuzz.common import pack, unpack, write_files
from fuzz.seeds import Corpus
from megatron_prior.data.kinds import KIND_NAMES
from megatron_prior.data.records import BadRecord, iter_lines, iter_texts
from megatron_prior.data.sources import SourceRecord
from megatron_prior.preprocess import RecordProcessor

ERRORS = (BadRecord,)
IMAGE = "img.png"
IMAGE_SIZE = (8, 8)


def seeds(corpus: Corpus) -> list[bytes]:
    with open(corpus.jsonl, "rb") as f:
        records = [json.loads(line) for line in f]
    out = []
    for record in records[:3]:
        image = open(os.path.join(os.path.dirname(corpus.jsonl), record["image"]), "rb").read()
        line = json.dumps(dict(record, image=IMAGE)).encode() + b"\n"
        out.append(pack(0, [line, image]))
    return out


def prepare(corpus: Corpus, workdir: str) -> Callable[[bytes], None]:
    paths = (os.path.join(workdir, "records.jsonl"), os.path.join(workdir, IMAGE))
    # The raw store: the image is decoded and fitted here, so PIL's decoders see the fuzzed bytes.
    args = argparse.Namespace(json_keys=["caption"], kinds_key="kinds", image_key="image", image_size=IMAGE_SIZE,
                              append_eod=True, tokenizer_model=corpus.tokenizer, tokenizer_type=None,
                              input_format="jsonl", image_root=None, coco_captions_per_image="all",
                              image_store="raw", image_aspect="pad",
                              special_tokens=None)
    processor = RecordProcessor(args)

    def one(data: bytes) -> None:
        _, parts = unpack(data, 2)
        write_files(paths, [parts[0] or b"", parts[1]])
        bad: list = []
        texts = list(iter_texts([paths[0]], ["caption"], errors=bad))
        assert all(isinstance(t, str) and t.strip() for t in texts) and all(isinstance(b, BadRecord) for b in bad)
        for line, raw in iter_lines(paths[0]):
            out = processor.process(SourceRecord(paths[0], line, json=raw))
            tokens, kinds = out.tokens["caption"], out.kinds["caption"]
            assert len(tokens) == len(kinds) >= 2 and tokens[-1] == processor.tokenizer.eod
            assert np.all(kinds < len(KIND_NAMES)) and out.image.shape == (*IMAGE_SIZE, 3)

    return one
