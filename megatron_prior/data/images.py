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

Image ``i`` belongs to document ``i`` of the token file beside it; the dataset's metadata
binds the store by content hash and records its shape (``formats``). The writer streams
images to a temporary name and writes the count into the header when it finishes.
"""

from __future__ import annotations

import os
import stat
import struct
import warnings
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from megatron_prior.data.formats import FormatError, check_header, images_path, read_header

__all__ = ["ImageStore", "ImageStoreWriter", "images_path", "load_image"]

MAGIC = b"MPIMGST\x00"
VERSION = 1
HEADER_SIZE = 64
_FIELDS = struct.Struct("<QQQQQB")  # after the magic: version, n, H, W, C, dtype code
UINT8_CODE = 1
# numpy cannot even describe a larger array; one image beyond it is a damaged header.
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max


def load_image(path: str, height: int, width: int) -> np.ndarray:
    """An image file as uint8 ``[height, width, 3]`` (RGB, resized with bicubic filtering).

    Raises OSError (missing or unreadable file) or ValueError (not a regular file, not an
    image PIL can read, damaged, or more pixels than PIL's decompression-bomb limit).
    """
    # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer forever; the
    # type is checked on the opened descriptor, so the file cannot change in between.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError("not a regular file")
        f = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    try:
        with f, warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS PIL only warns (it raises at twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as img:
                img = img.convert("RGB")
                if img.size != (width, height):
                    img = img.resize((width, height), Image.Resampling.BICUBIC)
                return np.asarray(img, dtype=np.uint8)
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"more than {Image.MAX_IMAGE_PIXELS} pixels (PIL's decompression-bomb limit)") from None
    except (SyntaxError, IndexError, TypeError, struct.error) as err:
        # What PIL's parsers raise on damaged data (Image.open takes the same set to mean "not
        # this format"); decoding happens after open, in convert(), where nothing catches them.
        raise ValueError(f"damaged image file ({type(err).__name__}: {err})") from None


class ImageStore:
    """Read-only view of a validated image store; ``store[i]`` is uint8 ``[H, W, C]``.

    ``expected`` (from the dataset's metadata: ``count``, ``height``, ``width``) must agree
    with the header.
    """

    def __init__(self, path: str, expected: Optional[dict] = None) -> None:
        self.path = path
        size, (version, n, h, w, c, code) = read_header(path, MAGIC, _FIELDS, HEADER_SIZE, "an image store")
        if c != 3 or h == 0 or w == 0 or h * w * c > _MAX_ARRAY_BYTES:
            raise FormatError(path, f"unsupported image layout H={h} W={w} C={c} (expected RGB, C=3, "
                                    "non-empty images numpy can address)")
        check_header(path, "image store", version, VERSION, code, {UINT8_CODE}, size,
                     HEADER_SIZE + n * h * w * c, f"{n} images of {h}x{w}x{c}")
        if expected is not None:
            said = {"count": n, "height": h, "width": w}
            differ = [f"{k} {said[k]} (bound: {expected[k]})" for k in said if said[k] != expected[k]]
            if differ:
                raise FormatError(path, "header disagrees with the dataset's metadata: " + ", ".join(differ))
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
    """Appends images of one size to a store at ``path`` (the caller renames it into place)."""

    def __init__(self, path: str, height: int, width: int) -> None:
        self.path, self.height, self.width, self.count = path, height, width, 0
        self._file = open(path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        header = MAGIC + _FIELDS.pack(VERSION, self.count, self.height, self.width, 3, UINT8_CODE)
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
        """Write the final count into the header."""
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()
