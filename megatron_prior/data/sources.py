"""Reading image-caption data as people have it: JSONL, LLaVA-Pretrain JSON, COCO captions JSON
and webdataset tar shards (``--input-format``), record by record, in chunks.

Every format becomes the same ``SourceRecord``s: where the record is (``file:record``, the
record as that format counts: a JSONL line, a JSON list or annotation index, a tar sample
key), its text as JSON to parse or as a caption given whole, and its image as a file to read
or as bytes already read. Records are cheap to make in the main process; ``SourceRecord.fields``
(parsing, checking, resolving the image) runs in the preprocessing workers. A record a reader
cannot use carries its ``error`` and becomes a ``BadRecord`` there, so every format reports,
skips (``--skip-bad-records``) and counts bad records the same way.

- ``jsonl``: one JSON object per line; texts under ``--json-keys``, kind spans under
  ``--kinds-key``, the image path under ``--image-key`` (relative to ``--image-root``, or to the
  JSONL's folder).
- ``llava``: LLaVA-Pretrain's ``blip_laion_cc_sbu_558k.json``, a list of ``{"id", "image",
  "conversations": [{"from": "human", ...}, {"from": "gpt", "value": CAPTION}]}``. The caption is
  the first ``gpt`` turn; the human prompt (``<image>\\n`` and an instruction) is dropped, so it
  is neither scored nor trained on. Images are relative to ``--image-root`` (default: the JSON's
  folder).
- ``coco``: ``captions_*.json`` (``images: [{id, file_name}]``, ``annotations: [{image_id,
  caption}]``): one record per annotation in file order (``--coco-captions-per-image all``), or
  the first annotation of each image in the ``images`` list order (``first``).
- ``wds``: webdataset tar shards (brace patterns and globs expanded, in the order given), read
  with the ``webdataset`` package. A sample is the members sharing a basename: one image
  (``jpg``, ``jpeg``, ``png`` or ``webp``) and the caption, the ``txt`` member (the caption) or
  the ``json`` member (an object read like a JSONL line: ``--json-keys``, ``--kinds-key``). The
  ``txt`` member is used when there is one, unless ``--kinds-key`` asks for the JSON record.

Chunks of up to ``chunk_records`` consecutive records never span two input files, so the
chunks, and what is computed per chunk, do not depend on how many processes share the work.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence, Union

import webdataset
from webdataset.shardlists import expand_urls

from megatron_prior.data.records import BadRecord, Record, iter_lines, parse_line, text_field
from megatron_prior.files import parse_json

FORMATS = ("jsonl", "llava", "coco", "wds")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
CAPTIONS_PER_IMAGE = ("all", "first")


@dataclass
class ReadOptions:
    """What the readers need of the preprocessing flags."""

    json_keys: Sequence[str] = ("text",)
    image_key: Optional[str] = None  # JSONL only; the other formats always carry an image
    kinds_key: Optional[str] = None
    image_root: Optional[str] = None
    coco_captions_per_image: str = "all"


@dataclass
class SourceRecord:
    """One input record as read, before parsing (see the module docstring)."""

    path: str
    record: Union[int, str]  # how BadRecord names it after ``path:``
    json: Optional[bytes] = None  # a JSON object to parse (a JSONL line, a wds json member)
    text: Optional[Union[str, bytes]] = None  # the caption itself (LLaVA, COCO, a wds txt member)
    image_path: Optional[str] = None
    image_name: Optional[str] = None  # the image as the record names it, for messages
    image_bytes: Optional[bytes] = None
    error: Optional[str] = None
    error_category: str = "record"

    def fields(self, options: ReadOptions) -> tuple[Record, Optional[str]]:
        """(the record with its texts under ``options.json_keys``, the image file to read or
        None when the bytes came with the record or there is no image); BadRecord otherwise."""
        if self.error is not None:
            raise BadRecord(self.path, self.record, self.error, self.error_category)
        if self.json is not None:
            record = parse_line(self.path, self.record, self.json)
        else:
            text = self.text
            if isinstance(text, bytes):
                try:
                    text = text.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise BadRecord(self.path, self.record, f"caption is not UTF-8 ({err.reason} at byte "
                                                            f"{err.start})") from None
            record = Record(self.path, self.record, {options.json_keys[0]: text})
        for key in options.json_keys:
            text_field(record, key)  # refuses a missing, empty or non-text caption here
        image_path = self.image_path
        if self.json is not None and options.image_key and self.image_bytes is None:
            self.image_name = text_field(record, options.image_key)
            image_path = resolve_image(self.image_name, options.image_root, self.path)
        return record, image_path


def resolve_image(name: str, image_root: Optional[str], input_path: str) -> str:
    """An image named in a record: absolute as given, else under ``image_root`` (default: the
    folder of the input file naming it)."""
    if os.path.isabs(name):
        return name
    return os.path.join(image_root or os.path.dirname(os.path.abspath(input_path)), name)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """``--input`` as files: brace patterns (``data/{00000..00099}.tar``, webdataset's own
    expansion) and globs expanded, in the order given; ValueError names a pattern that matches
    nothing."""
    paths: list[str] = []
    for pattern in patterns:
        for expanded in expand_urls(pattern):
            if glob.has_magic(expanded) and not os.path.exists(expanded):
                found = sorted(glob.glob(expanded))
                if not found:
                    raise ValueError(f"--input {pattern}: {expanded} matches no file")
                paths.extend(found)
            elif not os.path.exists(expanded):  # a FIFO is fine: JSONL streams in
                raise ValueError(f"--input {pattern}: {expanded}: no such file")
            else:
                paths.append(expanded)
    return paths


def _json_kind(path: str) -> str:
    """llava (a JSON list) or coco (a JSON object), from the first character that is not space."""
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")[:1]
    if head == b"[":
        return "llava"
    if head == b"{":
        return "coco"
    raise ValueError(f"--input {path}: neither a LLaVA list nor a COCO object of JSON; give --input-format")


def detect_format(paths: Sequence[str]) -> str:
    """The format of the input files by their names (and, for .json, the first character)."""
    kinds = set()
    for path in paths:
        name = path.lower()
        if name.endswith(TAR_SUFFIXES):
            kinds.add("wds")
        elif name.endswith(".json"):
            kinds.add(_json_kind(path))
        elif name.endswith((".jsonl", ".ndjson")):
            kinds.add("jsonl")
        else:
            raise ValueError(f"--input {path}: format not known from the name (.jsonl, .json or .tar); "
                             "give --input-format")
    if len(kinds) != 1:
        raise ValueError(f"--input mixes formats ({', '.join(sorted(kinds))}): preprocess them separately")
    return kinds.pop()


def _load_json(path: str):
    with open(path, "rb") as f:
        raw = f.read()
    try:
        return parse_json(raw)
    except ValueError as err:
        raise ValueError(f"--input {path}: {err}") from None


def _read_jsonl(path: str, options: ReadOptions) -> Iterator[SourceRecord]:
    for line, raw in iter_lines(path):
        yield SourceRecord(path, line, json=raw)


def _llava_record(path: str, index: int, entry: object, options: ReadOptions) -> SourceRecord:
    where = f"record {index}" + (f" (id {entry['id']!r})" if isinstance(entry, dict) and "id" in entry else "")
    if not isinstance(entry, dict):
        return SourceRecord(path, where, error=f"a record must be a JSON object, not {type(entry).__name__}")
    image, turns = entry.get("image"), entry.get("conversations")
    if not isinstance(image, str) or not image:
        return SourceRecord(path, where, error="no 'image' (a path) in the record")
    if not isinstance(turns, list):
        return SourceRecord(path, where, error="no 'conversations' list in the record")
    caption = next((t.get("value") for t in turns if isinstance(t, dict) and t.get("from") == "gpt"), None)
    if caption is None:
        return SourceRecord(path, where, error="no 'gpt' turn in 'conversations' (the caption)")
    if not isinstance(caption, str):
        return SourceRecord(path, where, error=f"the first 'gpt' turn's 'value' is {type(caption).__name__}, "
                                               "not a string")
    return SourceRecord(path, where, text=caption, image_name=image,
                        image_path=resolve_image(image, options.image_root, path))


def _read_llava(path: str, options: ReadOptions) -> Iterator[SourceRecord]:
    data = _load_json(path)
    if not isinstance(data, list):
        raise ValueError(f"--input {path}: a LLaVA file is a JSON list of records, not a {type(data).__name__}")
    for index, entry in enumerate(data):
        yield _llava_record(path, index, entry, options)


def _read_coco(path: str, options: ReadOptions) -> Iterator[SourceRecord]:
    data = _load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise ValueError(f"--input {path}: a COCO captions file is a JSON object with 'images' and 'annotations' lists")
    files: dict = {}
    for image in data["images"]:
        if isinstance(image, dict) and isinstance(image.get("file_name"), str):
            files.setdefault(image.get("id"), image["file_name"])
    first: dict = {}
    records = []
    for index, ann in enumerate(data["annotations"]):
        where = f"annotation {index}" + (f" (id {ann['id']!r})" if isinstance(ann, dict) and "id" in ann else "")
        if not isinstance(ann, dict):
            records.append(SourceRecord(path, where, error=f"an annotation must be a JSON object, not "
                                                           f"{type(ann).__name__}"))
            continue
        image_id, caption = ann.get("image_id"), ann.get("caption")
        if image_id not in files:
            records.append(SourceRecord(path, where, error=f"image_id {image_id!r} is in no 'images' entry with a "
                                                           "'file_name'"))
            continue
        record = SourceRecord(path, where, text=caption if isinstance(caption, str) else None,
                              image_name=files[image_id],
                              image_path=resolve_image(files[image_id], options.image_root, path))
        if not isinstance(caption, str):
            record.error = f"'caption' is {type(caption).__name__}, not a string"
        records.append(record)
        first.setdefault(image_id, record)
    if options.coco_captions_per_image == "all":
        yield from records
        return
    bad = [r for r in records if r.image_name is None]
    yield from bad  # annotations that belong to no image, still counted and reported
    for image in data["images"]:
        image_id = image.get("id") if isinstance(image, dict) else None
        if image_id in first:
            yield first.pop(image_id)


def _wds_record(path: str, sample: dict, options: ReadOptions) -> SourceRecord:
    key = sample.get("__key__")
    where = f"sample {key!r}"
    members = [m for m in IMAGE_MEMBERS if m in sample]
    if len(members) != 1:
        return SourceRecord(path, where, error=(f"{len(members)} image members ({', '.join(members)}): one is "
                                                "expected" if members else
                                                f"no image member ({', '.join(IMAGE_MEMBERS)})"),
                            error_category="image")
    image = sample[members[0]]
    name = f"{key}.{members[0]}"
    if "txt" in sample and not options.kinds_key:
        return SourceRecord(path, where, text=sample["txt"], image_bytes=image, image_name=name)
    if "json" in sample:
        return SourceRecord(path, where, json=sample["json"], image_bytes=image, image_name=name)
    return SourceRecord(path, where, error="no json member (the record --kinds-key reads)" if options.kinds_key
                        else "no caption member (txt or json)")


def _read_wds(path: str, options: ReadOptions) -> Iterator[SourceRecord]:
    last = None
    samples = webdataset.tarfile_samples([{"url": path}])
    while True:
        try:
            sample = next(samples)
        except StopIteration:
            return
        except Exception as err:  # noqa: BLE001 - tarfile and webdataset raise many kinds on a damaged shard
            where = f"after sample {last!r}" if last is not None else "at its start"
            # webdataset appends " @ <the open stream>" to the message: the shard is named already.
            detail = str(err.args[0]).split(" @ ")[0] if err.args else type(err).__name__
            yield SourceRecord(path, where, error=f"damaged tar shard ({detail}); the rest of it is not read",
                               error_category="shard")
            return
        last = sample.get("__key__")
        yield _wds_record(path, sample, options)


READERS: dict[str, Callable[[str, ReadOptions], Iterator[SourceRecord]]] = {
    "jsonl": _read_jsonl, "llava": _read_llava, "coco": _read_coco, "wds": _read_wds,
}


@dataclass
class Chunk:
    """Up to ``chunk_records`` consecutive records of one input file."""

    file_index: int
    index: int  # within the file
    records: list[SourceRecord]


def iter_chunks(fmt: str, paths: Sequence[str], options: ReadOptions, chunk_records: int,
                read_file: Callable[[int], bool] = lambda i: True) -> Iterator[Chunk]:
    """The chunks of every input file for which ``read_file(file_index)`` holds, in order."""
    if fmt not in READERS:
        raise ValueError(f"--input-format {fmt!r}: expected one of {', '.join(FORMATS)}")
    for file_index, path in enumerate(paths):
        if not read_file(file_index):
            continue
        chunk: list[SourceRecord] = []
        index = 0
        for record in READERS[fmt](path, options):
            chunk.append(record)
            if len(chunk) == chunk_records:
                yield Chunk(file_index, index, chunk)
                chunk, index = [], index + 1
        if chunk:
            yield Chunk(file_index, index, chunk)
