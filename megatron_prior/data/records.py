"""Reading JSONL records line by line, with every bad record reported as ``file:record: reason``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Optional, Sequence, Union

from megatron_prior.files import parse_json


class BadRecord(ValueError):
    """An input record that cannot be used; ``str()`` is ``file:record: reason``.

    ``line`` is how the input format counts its records: a JSONL line (1-based), or a label
    such as ``record 17 (id '004539375')`` or ``sample '000017'``. ``category`` groups the
    reasons in the counts a run reports (``record``, ``image``, ``shard``).
    """

    def __init__(self, path: str, line: Union[int, str], reason: str, category: str = "record") -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason, self.category = path, line, reason, category

    def __reduce__(self):
        # Worker processes send these back to the main one.
        return BadRecord, (self.path, self.line, self.reason, self.category)


@dataclass
class Record:
    path: str
    line: Union[int, str]  # a JSONL line, 1-based as editors count; a record label for other formats
    data: dict


def iter_lines(path: str) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw bytes) for each non-blank line."""
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def parse_line(path: str, line: Union[int, str], raw: bytes) -> Record:
    """Decode one JSONL line into a Record (an object), or raise BadRecord."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadRecord(path, line, f"invalid UTF-8 ({err.reason} at byte {err.start})") from None
    try:
        data = parse_json(text)
    except ValueError as err:
        raise BadRecord(path, line, str(err)) from None
    if not isinstance(data, dict):
        raise BadRecord(path, line, f"a record must be a JSON object, not {type(data).__name__}")
    return Record(path, line, data)


def text_field(record: Record, key: str) -> str:
    """The non-empty string under ``key``, or BadRecord.

    JSON's ``\\uXXXX`` escapes can spell a lone UTF-16 surrogate, which is not a character:
    tokenizers (SentencePiece's UTF-8 conversion) fail on it, so it is refused here.
    """
    if key not in record.data:
        raise BadRecord(record.path, record.line, f"missing key {key!r}")
    value = record.data[key]
    if not isinstance(value, str):
        raise BadRecord(record.path, record.line, f"{key!r} is {type(value).__name__}, not a string")
    if not value.strip():
        raise BadRecord(record.path, record.line, f"empty {key!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        where = f"{value[err.start]!r} at character {err.start}"
        raise BadRecord(record.path, record.line, f"{key!r} holds a lone surrogate ({where}), not text") from None
    return value


def iter_texts(paths: Sequence[str], keys: Sequence[str], errors: Optional[list] = None) -> Iterator[str]:
    """Every text under ``keys`` in the JSONL ``paths``.

    A bad line raises BadRecord, unless ``errors`` is a list: then it is appended there
    and skipped.
    """
    for path in paths:
        for line, raw in iter_lines(path):
            try:
                record = parse_line(path, line, raw)
                texts = [text_field(record, key) for key in keys]
            except BadRecord as bad:
                if errors is None:
                    raise
                errors.append(bad)
                continue
            yield from texts
