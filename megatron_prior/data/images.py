"""A memory-mapped store of equally sized RGB images, indexed like the caption documents.

Layout of ``{prefix}.images`` (little-endian): a 64-byte header, then one C-ordered uint8
array ``[n, H, W, C]``.

    offset  0  8 bytes  magic b"MPIMGST\\x00"
    offset  8  u64      format version (1)
    offset 16  u64      n (images)
    offset 24  u64      H
    offset 32  u64      W
    offset 40  u64      C (3)
    offset 48  u8       dtype code (megatron-core's DType: 1 = uint8)
    offset 49  zeros up to 64

Image ``i`` belongs to document ``i`` of the token file beside it. The writer streams images
to a temporary name and writes the count into the header when it finishes.
"""

from __future__ import annotations

import os
import struct
from typing import Optional

import numpy as np

from megatron_prior.data.formats import AtomicFiles, FormatError

MAGIC = b"MPIMGST\x00"
VERSION = 1
HEADER_SIZE = 64
_HEADER = struct.Struct("<8sQQQQQB")
UINT8_CODE = 1


def images_path(prefix: str) -> str:
    return prefix + ".images"


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file as uint8 ``[height, width, 3]`` (RGB, resized with bicubic filtering).

    Raises OSError (missing or unreadable file) or ValueError (not an image PIL can read).
    """
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (width, height):
                img = img.resize((width, height), Image.Resampling.BICUBIC)
            return np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError as err:
        raise ValueError(f"not an image file PIL can read: {path}") from err


class ImageStore:
    """Read-only view of a validated image store; ``store[i]`` is uint8 ``[H, W, C]``."""

    def __init__(self, path: str, expected_count: Optional[int] = None) -> None:
        self.path = path
        if not os.path.isfile(path):
            raise FormatError(path, "missing file")
        size = os.path.getsize(path)
        if size < HEADER_SIZE:
            raise FormatError(path, f"truncated: {size} bytes, shorter than the {HEADER_SIZE}-byte header")
        with open(path, "rb") as f:
            magic, version, n, h, w, c, code = _HEADER.unpack(f.read(_HEADER.size))
        if magic != MAGIC:
            raise FormatError(path, f"not an image store (magic {magic!r})")
        if version != VERSION:
            raise FormatError(path, f"image store version {version}, expected {VERSION}")
        if code != UINT8_CODE or c != 3 or h == 0 or w == 0:
            raise FormatError(path, f"unsupported image layout H={h} W={w} C={c} dtype code {code} "
                                    f"(expected uint8 RGB, code {UINT8_CODE}, C=3)")
        expected = HEADER_SIZE + n * h * w * c
        if size != expected:
            raise FormatError(path, f"{size} bytes, expected {expected} for {n} images of {h}x{w}x{c} "
                                    "(truncated or unfinished)")
        if expected_count is not None and n != expected_count:
            raise FormatError(path, f"{n} images for {expected_count} documents")
        self.shape = (int(n), int(h), int(w), int(c))
        self._array = (np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=self.shape)
                       if n else np.zeros(self.shape, dtype=np.uint8))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self._array[idx]

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class ImageStoreWriter:
    """Appends images of one size to a store, written under a temporary name."""

    def __init__(self, path: str, height: int, width: int, files: AtomicFiles) -> None:
        self.height, self.width, self.count = height, width, 0
        self._tmp = files.temp(path)
        self._file = open(self._tmp, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        header = _HEADER.pack(MAGIC, VERSION, self.count, self.height, self.width, 3, UINT8_CODE)
        return header + b"\x00" * (HEADER_SIZE - len(header))

    def add(self, image: np.ndarray) -> None:
        if image.shape != (self.height, self.width, 3) or image.dtype != np.uint8:
            raise ValueError(f"image of shape {image.shape} ({image.dtype}), expected "
                             f"({self.height}, {self.width}, 3) uint8")
        self._file.write(np.ascontiguousarray(image).tobytes())
        self.count += 1

    def add_store(self, store: ImageStore, block: int = 1024) -> None:
        """Append every image of ``store`` (same size), ``block`` images per write."""
        if store.shape[1:] != (self.height, self.width, 3):
            raise ValueError(f"{store.path}: images of {store.shape[1]}x{store.shape[2]}, expected "
                             f"{self.height}x{self.width}")
        for start in range(0, len(store), block):
            chunk = np.ascontiguousarray(store._array[start:start + block])
            self._file.write(chunk.tobytes())
            self.count += len(chunk)

    def close(self) -> None:
        """Write the final count into the header (the store is renamed by its AtomicFiles)."""
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
