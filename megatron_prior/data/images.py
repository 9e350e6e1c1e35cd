"""Image stores, indexed like the caption documents (image ``i`` belongs to document ``i`` of
the token file beside it), and the one place where image bytes become model pixels.

Two stores share the path ``{prefix}.images``; the magic says which one a file is:

**Encoded** (``--image-store encoded``, the default): the image files' bytes as given (JPEG,
PNG or WebP), decoded when a batch is made. Identical images (COCO's five captions of one
photo) are stored once: the index gives each image an offset and a length into the blobs.

    offset  0  8 bytes  magic b"MPIMGENC"
    offset  8  u64      format version (1)
    offset 16  u64      n (images)
    offset 24  u64      H, the height images are decoded to
    offset 32  u64      W, the width
    offset 40  u8       aspect code (ASPECTS: 0 pad, 1 crop, 2 stretch)
    offset 41  zeros up to 64
    offset 64           the blobs, back to back
    end - 16 n          the index: n (offset, length) pairs of u64, offsets from byte 64

**Raw** (``--image-store raw``, the original store, still read): a 64-byte header, then one
C-ordered uint8 array ``[n, H, W, C]`` of pixels already decoded and fitted.

    offset  0  8 bytes  magic b"MPIMGST\\x00"
    offset  8  u64      format version (1)
    offset 16  u64      n (images)
    offset 24  u64      H
    offset 32  u64      W
    offset 40  u64      C (3)
    offset 48  u8       dtype code (megatron-core's DType: 1 = uint8)
    offset 49  zeros up to 64

Both read as ``store[i]`` -> uint8 ``[H, W, 3]``; the encoded one decodes there, which runs in
the DataLoader workers. Since it decodes at read time, an encoded store can be read at another
size or aspect rule than its header records (``fitted_to``: the trainer's ``--image-size`` and
``--image-aspect``); a raw store's pixels were fitted when it was written, so it reads only as
it was written. The dataset's metadata binds the store by content hash and records
its layout (``formats``). Writers stream to a temporary name and write the header (and the
encoded store's index) when they finish.

Fitting an image to ``H x W`` (``--image-aspect``), after EXIF orientation is applied and
grayscale, palette or RGBA images are converted to RGB (alpha dropped, as LLaVA's loader does):

- ``pad`` (LLaVA's ``expand2square``): the image is centred on a canvas of the target's aspect
  ratio filled with ``PAD_COLOUR`` (CLIP's mean colour, which normalisation with CLIP's mean
  maps to zero), then resized (bicubic);
- ``crop`` (CLIP's processor): resized (bicubic) so that it covers the target, then the
  centre cut out;
- ``stretch``: resized (bicubic) to the target, the aspect ratio lost.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import os
import stat
import struct
import warnings
from dataclasses import dataclass
from typing import Iterator, Optional, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megatron_prior.data.formats import (
    IMAGE_ASPECTS,
    FormatError,
    ScoreMetadata,
    check_header,
    images_path,
    metadata_path,
    read_header,
)

__all__ = ["ASPECTS", "DEFAULT_ASPECT", "EncodedImageStore", "EncodedImageStoreWriter", "ImageStore",
           "ImageStoreWriter", "PAD_COLOUR", "StoredImages", "check_encoded_image", "decode_image", "fit_image",
           "images_path", "load_image", "open_image_store", "read_image_file", "stored_images"]

MAGIC = b"MPIMGST\x00"
ENCODED_MAGIC = b"MPIMGENC"
VERSION = 1
HEADER_SIZE = 64
_FIELDS = struct.Struct("<QQQQQB")  # after the magic: version, n, H, W, C, dtype code
_ENCODED_FIELDS = struct.Struct("<QQQQB")  # after the magic: version, n, H, W, aspect code
UINT8_CODE = 1
# numpy cannot even describe a larger array; one image beyond it is a damaged header.
_MAX_ARRAY_BYTES = np.iinfo(np.intp).max

ASPECTS = IMAGE_ASPECTS
DEFAULT_ASPECT = "pad"
# The rule of a raw store bound before the rule was recorded: such images were stretched.
LEGACY_ASPECT = "stretch"
# LLaVA pads with tuple(int(x * 255) for x in CLIP's image_mean (0.48145466, 0.4578275, 0.40821073)).
PAD_COLOUR = (122, 116, 104)
# What the encoded store keeps as given: formats every PIL build decodes. Others (GIF, BMP,
# TIFF, ...) go into a raw store (--image-store raw), which decodes them while preprocessing.
ENCODED_FORMATS = ("JPEG", "PNG", "WEBP")


def read_image_file(path: str) -> bytes:
    """The bytes of an image file. Raises OSError (missing or unreadable) or ValueError (not a
    regular file)."""
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
    with f:
        return f.read()


@contextlib.contextmanager
def _opened(data: bytes) -> Iterator[Image.Image]:
    """The image in ``data``, every way PIL fails on untrusted bytes turned into ValueError."""
    try:
        with warnings.catch_warnings():
            # Past MAX_IMAGE_PIXELS PIL only warns (it raises at twice that): refuse both.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                yield img
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"more than {Image.MAX_IMAGE_PIXELS} pixels (PIL's decompression-bomb limit)") from None
    except (SyntaxError, IndexError, TypeError, struct.error, OSError, EOFError) as err:
        # What PIL's parsers raise on damaged data (a truncated JPEG is an OSError from the
        # decoder: nothing here reads a file); decoding happens after open, where nothing catches them.
        raise ValueError(f"damaged image file ({type(err).__name__}: {err})") from None


def check_encoded_image(data: bytes) -> str:
    """The format of encoded image bytes the encoded store keeps, decoded once in full so that
    damage shows while preprocessing, not in a training job; ValueError otherwise."""
    with _opened(data) as img:
        if img.format not in ENCODED_FORMATS:
            raise ValueError(f"a {img.format} image: the encoded store keeps {', '.join(ENCODED_FORMATS)} "
                             "(--image-store raw takes any format PIL reads)")
        img.load()
        return img.format


def fit_image(img: Image.Image, height: int, width: int, aspect: str) -> np.ndarray:
    """An RGB image fitted to uint8 ``[height, width, 3]`` as ``aspect`` says (module docstring)."""
    if aspect not in ASPECTS:
        raise ValueError(f"image aspect {aspect!r}: expected one of {', '.join(ASPECTS)}")
    w, h = img.size
    if aspect == "pad" and w * height != h * width:
        # The smallest canvas of the target's aspect ratio that holds the image.
        cw, ch = (w, round(w * height / width)) if w * height > h * width else (round(h * width / height), h)
        canvas = Image.new("RGB", (cw, ch), PAD_COLOUR)
        canvas.paste(img, ((cw - w) // 2, (ch - h) // 2))
        img = canvas
    elif aspect == "crop" and (w, h) != (width, height):
        scale = max(width / w, height / h)
        size = (max(width, round(w * scale)), max(height, round(h * scale)))
        if size != (w, h):
            img = img.resize(size, Image.Resampling.BICUBIC)
        left, top = (size[0] - width) // 2, (size[1] - height) // 2
        img = img.crop((left, top, left + width, top + height))
    if img.size != (width, height):
        img = img.resize((width, height), Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8)


def decode_image(data: bytes, height: int, width: int, aspect: str = DEFAULT_ASPECT) -> np.ndarray:
    """Encoded image bytes as uint8 ``[height, width, 3]``: EXIF orientation applied, converted
    to RGB, fitted per ``aspect``. ValueError names what is wrong with the bytes."""
    with _opened(data) as img:
        img = ImageOps.exif_transpose(img).convert("RGB")
    return fit_image(img, height, width, aspect)


def load_image(path: str, height: int, width: int, aspect: str = DEFAULT_ASPECT) -> np.ndarray:
    """An image file as uint8 ``[height, width, 3]`` (``decode_image`` of its bytes).

    Raises OSError (missing or unreadable file) or ValueError (not a regular file, not an
    image PIL can read, damaged, or more pixels than PIL's decompression-bomb limit).
    """
    return decode_image(read_image_file(path), height, width, aspect)


@dataclass(frozen=True)
class StoredImages:
    """An image store as its dataset's metadata binds it: where, which kind (``raw`` or
    ``encoded``), and the size and aspect rule its images were fitted or are decoded to."""

    path: str
    kind: str
    height: int
    width: int
    aspect: str

    def refit_problem(self, height: int, width: int, aspect: str) -> Optional[str]:
        """Why these images cannot be read at ``height x width`` per ``aspect`` (None: they can).
        An encoded store decodes at read time, so any size and rule serve; a raw store holds
        pixels fitted when it was written."""
        if self.kind == "encoded" or (height, width, aspect) == (self.height, self.width, self.aspect):
            return None
        return (f"{self.path} is a raw image store: its pixels were fitted to {self.height}x{self.width} "
                f"({self.aspect}) when it was preprocessed, so it cannot be read at {height}x{width} ({aspect}); "
                "preprocess it again with --image-store encoded (decoded when batches are made, at any size) "
                "or at that size and aspect")


def stored_images(prefix: str) -> StoredImages:
    """What ``prefix``'s metadata (``T.logprobs.json``) records of its image store; a store bound
    before the kind and the aspect rule were recorded is a raw one whose images were stretched."""
    path = images_path(prefix)
    binding = ScoreMetadata.load(metadata_path(prefix)).files.get("images")
    if binding is None:
        raise FormatError(path, f"missing file ({metadata_path(prefix)} binds no images: preprocess with --image-key)")
    return StoredImages(path, binding.get("store", "raw"), int(binding["height"]), int(binding["width"]),
                        binding.get("aspect", LEGACY_ASPECT))


def _check_fit(height: int, width: int, aspect: str) -> None:
    if aspect not in ASPECTS:
        raise ValueError(f"image aspect {aspect!r}: expected one of {', '.join(ASPECTS)}")
    # Every read decodes to H x W: past PIL's decompression-bomb limit each read would allocate
    # that much, so such a size is refused like such an image.
    if height < 1 or width < 1 or height * width > Image.MAX_IMAGE_PIXELS:
        raise ValueError(f"image size {height}x{width}: expected non-empty images of at most "
                         f"{Image.MAX_IMAGE_PIXELS} pixels (PIL's decompression-bomb limit)")


def _check_expected(path: str, said: dict, expected: Optional[dict]) -> None:
    if expected is None:
        return
    bound = {"store": "raw", **expected}
    differ = [f"{k} {said[k]} (bound: {bound.get(k)})" for k in said if bound.get(k, said[k]) != said[k]]
    if differ:
        raise FormatError(path, "header disagrees with the dataset's metadata: " + ", ".join(differ))


class ImageStore:
    """Read-only view of a validated raw image store; ``store[i]`` is uint8 ``[H, W, C]``.

    ``expected`` (from the dataset's metadata: ``count``, ``height``, ``width``) must agree
    with the header.
    """

    kind = "raw"

    def __init__(self, path: str, expected: Optional[dict] = None) -> None:
        self.path = path
        size, (version, n, h, w, c, code) = read_header(path, MAGIC, _FIELDS, HEADER_SIZE, "an image store")
        if c != 3 or h == 0 or w == 0 or h * w * c > _MAX_ARRAY_BYTES:
            raise FormatError(path, f"unsupported image layout H={h} W={w} C={c} (expected RGB, C=3, "
                                    "non-empty images numpy can address)")
        check_header(path, "image store", version, VERSION, code, {UINT8_CODE}, size,
                     HEADER_SIZE + n * h * w * c, f"{n} images of {h}x{w}x{c}")
        _check_expected(path, {"count": n, "height": h, "width": w, "store": self.kind}, expected)
        self.shape = (int(n), int(h), int(w), int(c))
        self.aspect = (expected or {}).get("aspect")  # applied before storing; None in stores from before it
        self._array = (np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=self.shape)
                       if n else np.zeros(self.shape, dtype=np.uint8))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, idx: int) -> np.ndarray:
        return self._array[idx]

    def fitted_to(self, height: Optional[int] = None, width: Optional[int] = None,
                  aspect: Optional[str] = None) -> "ImageStore":
        """This store, if its pixels are ``height x width`` fitted per ``aspect`` (None: as
        stored); else ValueError naming the file (raw pixels read as they were written)."""
        stored = StoredImages(self.path, self.kind, self.shape[1], self.shape[2], self.aspect or LEGACY_ASPECT)
        problem = stored.refit_problem(height or stored.height, width or stored.width, aspect or stored.aspect)
        if problem:
            raise ValueError(problem)
        return self

    def __getstate__(self) -> dict:
        return {"path": self.path}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])


class EncodedImageStore:
    """Read-only view of a validated encoded store; ``store[i]`` decodes image ``i`` to uint8
    ``[H, W, 3]`` (``decode_image``), ``store.encoded(i)`` is its bytes as stored."""

    kind = "encoded"

    def __init__(self, path: str, expected: Optional[dict] = None) -> None:
        self.path = path
        size, (version, n, h, w, code) = read_header(path, ENCODED_MAGIC, _ENCODED_FIELDS, HEADER_SIZE,
                                                     "an image store")
        if version != VERSION:
            raise FormatError(path, f"encoded image store version {version}, expected {VERSION}")
        # Every read decodes to H x W: a size past PIL's decompression-bomb limit would make each
        # read allocate that much, so it is refused like such an image.
        if h == 0 or w == 0 or h * w > Image.MAX_IMAGE_PIXELS or code >= len(ASPECTS):
            raise FormatError(path, f"unsupported layout H={h} W={w} aspect code {code} (expected non-empty "
                                    f"images of at most {Image.MAX_IMAGE_PIXELS} pixels, PIL's decompression-bomb "
                                    f"limit, and aspect code < {len(ASPECTS)})")
        blobs = size - HEADER_SIZE - 16 * n
        if n > size or blobs < 0:
            raise FormatError(path, f"{size} bytes, too short for the index of {n} images (truncated or unfinished)")
        self.shape = (int(n), int(h), int(w), 3)
        self.aspect = ASPECTS[code]
        _check_expected(path, {"count": n, "height": h, "width": w, "store": self.kind, "aspect": self.aspect},
                        expected)
        self._blobs = (np.memmap(path, dtype=np.uint8, mode="r", offset=HEADER_SIZE, shape=(blobs,))
                       if blobs else np.zeros(0, dtype=np.uint8))
        self._index = (np.memmap(path, dtype="<u8", mode="r", offset=HEADER_SIZE + blobs, shape=(n, 2))
                       if n else np.zeros((0, 2), dtype="<u8"))
        ends = self._index[:, 0] + self._index[:, 1]
        if n and (int(ends.max()) > blobs or (ends < self._index[:, 0]).any()):
            bad = int(np.flatnonzero((ends > blobs) | (ends < self._index[:, 0]))[0])
            raise FormatError(path, f"index entry {bad} (offset {int(self._index[bad, 0])}, length "
                                    f"{int(self._index[bad, 1])}) points outside the {blobs} bytes of images")

    def __len__(self) -> int:
        return self.shape[0]

    def encoded(self, idx: int) -> bytes:
        offset, length = (int(v) for v in self._index[idx])
        return self._blobs[offset:offset + length].tobytes()

    def __getitem__(self, idx: int) -> np.ndarray:
        try:
            return decode_image(self.encoded(idx), self.shape[1], self.shape[2], self.aspect)
        except ValueError as err:
            raise FormatError(self.path, f"image of record {idx} (document {idx} of the tokens beside it) "
                                         f"cannot be decoded: {err}") from None

    def fitted_to(self, height: Optional[int] = None, width: Optional[int] = None,
                  aspect: Optional[str] = None) -> "EncodedImageStore":
        """This store read at ``height x width`` per ``aspect`` instead of its header's (None: the
        header's): the same bytes, decoded to that."""
        height, width, aspect = height or self.shape[1], width or self.shape[2], aspect or self.aspect
        _check_fit(height, width, aspect)
        view = copy.copy(self)
        view.shape, view.aspect = (self.shape[0], height, width, 3), aspect
        return view

    def __getstate__(self) -> dict:
        return {"path": self.path, "fit": (self.shape[1], self.shape[2], self.aspect)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])
        height, width, aspect = state["fit"]
        self.shape, self.aspect = (self.shape[0], height, width, 3), aspect


AnyImageStore = Union[ImageStore, EncodedImageStore]


def open_image_store(path: str, expected: Optional[dict] = None) -> AnyImageStore:
    """The raw or encoded store at ``path``, by its magic."""
    try:
        with open(path, "rb") as f:
            magic = f.read(len(ENCODED_MAGIC))
    except OSError:
        magic = b""  # ImageStore names what is wrong with the path
    return (EncodedImageStore if magic == ENCODED_MAGIC else ImageStore)(path, expected)


class _StoreWriter:
    """A store file whose header holds the image count: written first with 0, rewritten on close."""

    def __init__(self, path: str, height: int, width: int, aspect: Optional[str]) -> None:
        self.path, self.height, self.width, self.aspect, self.count = path, height, width, aspect, 0
        self._file = open(path, "wb")
        self._file.write(self._header())

    def _header(self) -> bytes:
        raise NotImplementedError

    def close(self) -> None:
        """Write the final count into the header."""
        self._file.seek(0)
        self._file.write(self._header())
        self._file.close()

    def abort(self) -> None:
        if not self._file.closed:
            self._file.close()


class ImageStoreWriter(_StoreWriter):
    """Appends decoded images of one size to a raw store at ``path`` (the caller renames it
    into place)."""

    kind = "raw"

    def __init__(self, path: str, height: int, width: int, aspect: Optional[str] = None) -> None:
        super().__init__(path, height, width, aspect)

    def _header(self) -> bytes:
        header = MAGIC + _FIELDS.pack(VERSION, self.count, self.height, self.width, 3, UINT8_CODE)
        return header + b"\x00" * (HEADER_SIZE - len(header))

    def binding(self) -> dict:
        """What the dataset's metadata records about the store besides its size and hash."""
        out = {"count": self.count, "height": self.height, "width": self.width, "store": self.kind}
        return out if self.aspect is None else {**out, "aspect": self.aspect}

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


class EncodedImageStoreWriter(_StoreWriter):
    """Appends encoded images to an encoded store at ``path`` (the caller renames it into
    place); bytes identical to an image already written are stored once."""

    kind = "encoded"

    def __init__(self, path: str, height: int, width: int, aspect: str) -> None:
        if aspect not in ASPECTS:
            raise ValueError(f"image aspect {aspect!r}: expected one of {', '.join(ASPECTS)}")
        super().__init__(path, height, width, aspect)
        self._index: list[tuple[int, int]] = []
        self._end = 0
        self._seen: dict[bytes, int] = {}  # blake2b digest -> offset of those bytes

    def _header(self) -> bytes:
        header = ENCODED_MAGIC + _ENCODED_FIELDS.pack(VERSION, self.count, self.height, self.width,
                                                      ASPECTS.index(self.aspect))
        return header + b"\x00" * (HEADER_SIZE - len(header))

    def binding(self) -> dict:
        return {"count": self.count, "height": self.height, "width": self.width, "store": self.kind,
                "aspect": self.aspect}

    def add(self, data: bytes) -> None:
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ValueError(f"an encoded store takes image bytes, not {type(data).__name__}")
        digest = hashlib.blake2b(data, digest_size=20).digest() + len(data).to_bytes(8, "little")
        offset = self._seen.get(digest)
        if offset is None:
            offset = self._seen[digest] = self._end
            self._file.write(data)
            self._end += len(data)
        self._index.append((offset, len(data)))
        self.count += 1

    def add_store(self, store: EncodedImageStore) -> None:
        """Append every image of ``store`` (same size and aspect)."""
        if (store.shape[1], store.shape[2], store.aspect) != (self.height, self.width, self.aspect):
            raise ValueError(f"{store.path}: images decoded to {store.shape[1]}x{store.shape[2]} ({store.aspect}), "
                             f"expected {self.height}x{self.width} ({self.aspect})")
        for i in range(len(store)):
            self.add(store.encoded(i))

    def close(self) -> None:
        """Write the index after the blobs and the final count into the header."""
        self._file.write(np.asarray(self._index, dtype="<u8").reshape(-1, 2).tobytes())
        super().close()


def image_store_writer(path: str, kind: str, height: int, width: int,
                       aspect: str) -> Union[ImageStoreWriter, EncodedImageStoreWriter]:
    """A writer of the ``kind`` (``raw`` or ``encoded``) store."""
    if kind == "encoded":
        return EncodedImageStoreWriter(path, height, width, aspect)
    if kind == "raw":
        return ImageStoreWriter(path, height, width, aspect)
    raise ValueError(f"image store {kind!r}: expected encoded or raw")
