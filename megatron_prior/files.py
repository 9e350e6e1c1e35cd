"""File helpers shared across the pipeline: content hashes, and writers that never leave a
half-written file under the final name.

Each writes to a temporary file in the destination's own directory (so the rename stays on
one file system and is atomic) and renames it into place; a crash leaves at most a stray
``.tmp`` file, never a truncated result that a later step would read as complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

log = logging.getLogger(__name__)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with every way untrusted text can fail turned into ValueError(reason).

    Besides syntax errors, CPython's parser raises RecursionError on deep nesting and a
    ValueError about the integer digit limit on very long numbers; both name no position,
    so the reason says which it was.
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"invalid JSON ({err.msg}, line {err.lineno} column {err.colno})") from None
    except RecursionError:
        raise ValueError("invalid JSON (nested too deeply)") from None
    except ValueError as err:  # "Exceeds the limit (4300 digits) for integer string conversion: ..."
        # (without the advice to call sys.set_int_max_str_digits, which is not the reader's to take)
        raise ValueError(f"invalid JSON ({str(err).split('; use sys.')[0]})") from None


def temp_path(final: str) -> str:
    """Where a writer streams ``final`` before renaming it into place: the same folder (one file
    system, so the rename is atomic), tagged with this host and process so that a later run can
    tell a dead writer's leftovers from a live writer's file (see ``remove_stale_temps``)."""
    return f"{final}.tmp-{socket.gethostname()}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temps(finals: Iterable[str]) -> list[str]:
    """Remove the ``temp_path`` files of ``finals`` left by writers of this host that are no
    longer running (killed before they could clean up), with any suffix a tool adds to a
    temporary prefix (``PREFIX.tmp-host-pid.model``); returns what was removed.

    Files of other hosts are left alone: on a shared file system their writer may be alive.
    """
    host = socket.gethostname()
    removed = []
    for final in finals:
        folder, name = os.path.split(os.path.abspath(final))
        pattern = re.compile(re.escape(f"{name}.tmp-{host}-") + r"(\d+)(\.[^/]*)?$")
        try:
            entries = os.listdir(folder)
        except FileNotFoundError:
            continue
        for entry in entries:
            match = pattern.match(entry)
            if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
                path = os.path.join(folder, entry)
                try:
                    os.remove(path)
                except FileNotFoundError:  # another run cleaned it first
                    continue
                log.warning("removed %s, left by an interrupted writer (process %s is gone)",
                            path, match.group(1))
                removed.append(path)
    return removed


def atomic_write_with(path: str | os.PathLike, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Call ``write(fileobj)`` on a temp file beside ``path``, then rename it to ``path``.

    ``fsync`` forces the bytes to disk before the rename, for files whose loss in a power cut
    would cost more than a rerun (checkpoint metadata)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    return atomic_write_with(path, lambda f: f.write(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = True, fsync: bool = False,
                      allow_nan: bool = False) -> Path:
    """Pretty JSON with a final newline; key-sorted by default (stable bytes for the same
    object), or in the object's own order where that order reads better (reports).
    ``allow_nan`` writes NaN/Infinity (not strict JSON) instead of refusing them."""
    text = json.dumps(obj, indent=2, sort_keys=sort_keys, allow_nan=allow_nan) + "\n"
    return atomic_write_text(path, text, fsync=fsync)


def atomic_write_jsonl(path: str | os.PathLike, records: list[dict]) -> Path:
    """One compact JSON object per line, keys in insertion order (the records' own order)."""
    text = "".join(json.dumps(r, ensure_ascii=False, allow_nan=False) + "\n" for r in records)
    return atomic_write_text(path, text)


def atomic_savefig(fig, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """``fig.savefig`` as PNG through a temp name (the temp name has no .png suffix, so the
    format is passed explicitly)."""
    savefig_kwargs.setdefault("format", "png")
    return atomic_write_with(path, lambda f: fig.savefig(f, **savefig_kwargs))
