"""What the targets, the driver and the runner share: the input layout, the target list.

A fuzz input is a flags byte and then the files one call reads, joined by ``SEP``; a part
equal to ``ABSENT`` (or missing at the end) is a file that does not exist. Joining by a
separator rather than by length fields keeps a mutation inside one file from shifting the
others, so most mutants still reach the checks behind the first file.

Nothing here imports megatron_prior: the driver imports the targets (and through them the
package) under atheris' instrumentation, which covers only modules imported after it starts.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Optional, Sequence

SEP = b"\n\x00--fuzz-part--\x00\n"
ABSENT = b"\x00absent\x00"
TARGETS = ("index", "scores", "images", "sidecar", "records", "checkpoint")
# Packages instrumented for coverage besides megatron_prior: PIL decodes the records' images.
INSTRUMENT = {"records": ("PIL",)}


def pack(flags: int, parts: Sequence[Optional[bytes]]) -> bytes:
    return bytes([flags & 0xFF]) + SEP.join(ABSENT if p is None else p for p in parts)


def unpack(data: bytes, count: int) -> tuple[int, list[Optional[bytes]]]:
    """(flags, ``count`` parts): None for an absent file; extra parts belong to the last."""
    if not data:
        return 0, [None] * count
    parts: list[Optional[bytes]] = list(data[1:].split(SEP, count - 1))
    parts += [None] * (count - len(parts))
    return data[0], [None if p == ABSENT else p for p in parts]


def write_files(paths: Sequence[str], parts: Sequence[Optional[bytes]]) -> None:
    """Make ``paths[i]`` hold ``parts[i]``, or not exist where that part is None."""
    for path, part in zip(paths, parts):
        if part is None:
            if os.path.lexists(path):
                os.remove(path)
        else:
            with open(path, "wb") as f:
                f.write(part)


def load_target(name: str) -> ModuleType:
    """The module of target ``name`` (``fuzz/fuzz_{name}.py``)."""
    if name not in TARGETS:
        raise ValueError(f"unknown fuzz target {name!r} (known: {', '.join(TARGETS)})")
    return importlib.import_module(f"fuzz.fuzz_{name}")
