"""Tokenizers with the special tokens PRIOR's models need and a stable fingerprint.

Every tokenizer here exposes what megatron-core's datasets expect (``vocab_size``, ``eod``,
``pad``, ``unique_identifiers``) plus the image placeholder and the U-LVLM image markers,
and a ``fingerprint``: a hash of the tokenizer file and the special-token ids. The scores
written by ``tools/preprocess_with_weights.py`` record it, so a dataset tokenized with one
tokenizer is never trained with another.

SentencePiece models come from ``tools/train_tokenizer.py``; HuggingFace ``tokenizer.json``
files load through the ``tokenizers`` package when it is installed (it is optional).
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import sentencepiece

from megatron_prior.files import sha256_file

# Attribute name -> the piece that holds it in the vocabulary.
SPECIAL_PIECES: "OrderedDict[str, str]" = OrderedDict(
    eod="<eod>",
    pad="<pad>",
    image_token_id="<image>",
    image_start_id="<img_start>",
    image_row_id="<img_row>",
    image_end_id="<img_end>",
)

TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


def _first_visible(text: str, begin: int, end: int) -> int:
    """The first non-space character of ``text[begin:end]`` (``begin`` if all are spaces).

    Subword pieces often carry the space before a word ("▁red", "Ġred"); a token belongs to
    the word it spells, so its position is that of its first visible character.
    """
    for i in range(begin, end):
        if not text[i].isspace():
            return i
    return begin


class Tokenizer(ABC):
    """The tokenizer interface the data pipeline and the models share."""

    def __init__(self, path: str, special_ids: Mapping[str, int], vocab_size: int) -> None:
        self.path = path
        self.vocab_size = vocab_size
        for name, token_id in special_ids.items():
            setattr(self, name, token_id)
        self.special_ids = dict(special_ids)
        ids = list(special_ids.values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"tokenizer {path}: special tokens share ids: {self.special_ids}")
        payload = json.dumps({"class": type(self).__name__, "file_sha256": sha256_file(path),
                              "special_ids": self.special_ids}, sort_keys=True)
        self.fingerprint = "sha256:" + hashlib.sha256(payload.encode()).hexdigest()
        # Path-free on purpose: megatron-core hashes these into its index cache names, and a
        # moved tokenizer file is the same tokenizer.
        self.unique_identifiers = OrderedDict(
            [("class", type(self).__name__), ("fingerprint", self.fingerprint)]
        )

    eod: int
    pad: int
    image_token_id: int
    image_start_id: int
    image_row_id: int
    image_end_id: int

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""

    @abstractmethod
    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids and, per token, the index in ``text`` of its first visible character."""

    @abstractmethod
    def detokenize(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (special tokens dropped)."""

    def __getstate__(self) -> dict:
        return {"path": self.path, "special_pieces": getattr(self, "_special_pieces", None)}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["special_pieces"])  # type: ignore[misc]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose vocabulary holds the pieces of ``SPECIAL_PIECES``."""

    def __init__(self, path: str, special_pieces: Optional[Mapping[str, str]] = None) -> None:
        self._special_pieces = dict(SPECIAL_PIECES, **(special_pieces or {}))
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        special_ids = {}
        for name, piece in self._special_pieces.items():
            token_id = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"tokenizer {path}: no piece {piece!r} for {name}; train it with "
                    "tools/train_tokenizer.py, which adds the special pieces"
                )
            special_ids[name] = token_id
        super().__init__(path, special_ids, self._sp.get_piece_size())

    def tokenize(self, text: str) -> list[int]:
        return self._sp.encode(text)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        proto = self._sp.encode(text, return_type="proto")
        # SentencePiece reports UTF-8 byte offsets; kind spans are in characters.
        char_at_byte = []
        for i, ch in enumerate(text):
            char_at_byte.extend([i] * len(ch.encode("utf-8")))
        char_at_byte.append(len(text))
        ids, starts = [], []
        for piece in proto.pieces:
            ids.append(piece.id)
            starts.append(_first_visible(text, char_at_byte[piece.begin], char_at_byte[piece.end]))
        return ids, starts

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])


class HuggingFaceTokenizer(Tokenizer):
    """A HuggingFace ``tokenizer.json`` (through the optional ``tokenizers`` package)."""

    def __init__(self, path: str, special_pieces: Optional[Mapping[str, str]] = None) -> None:
        try:
            # Optional dependency: only HuggingFace tokenizer.json files need it.
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError as err:
            raise ImportError(
                f"tokenizer {path}: HuggingFace tokenizers need the 'tokenizers' package "
                f"(pip install tokenizers): {err}"
            ) from err
        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        self._special_pieces = dict(SPECIAL_PIECES, **(special_pieces or {}))
        self._tok = HFTokenizer.from_file(path)
        special_ids = {}
        for name, piece in self._special_pieces.items():
            token_id = self._tok.token_to_id(piece)
            if token_id is None:
                raise ValueError(
                    f"tokenizer {path}: no token {piece!r} for {name}; add it to the tokenizer "
                    "or map the name to one it has (special_pieces)"
                )
            special_ids[name] = token_id
        super().__init__(path, special_ids, self._tok.get_vocab_size(with_added_tokens=True))

    def tokenize(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [_first_visible(text, b, e) for b, e in enc.offsets]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def infer_tokenizer_type(path: str) -> str:
    """Megatron's tokenizer type of a file: a ``tokenizer.json`` (or a folder holding one) is
    HuggingFace's, anything else a SentencePiece model."""
    is_hf = path.endswith(".json") or os.path.isfile(os.path.join(path, "tokenizer.json"))
    return "HuggingFaceTokenizer" if is_hf else "SentencePieceTokenizer"


def load_tokenizer(
    path: str,
    tokenizer_type: Optional[str] = None,
    special_pieces: Optional[Mapping[str, str]] = None,
) -> Tokenizer:
    """Load a tokenizer file; the type is inferred from the name when not given.

    ``tokenizer_type`` takes Megatron's names: ``SentencePieceTokenizer`` (a ``.model``
    file) or ``HuggingFaceTokenizer`` (a ``tokenizer.json`` or a folder holding one).
    ``special_pieces`` maps attribute names (``eod``, ``pad``, ``image_token_id``, ...) to
    pieces other than the defaults of ``SPECIAL_PIECES``.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"tokenizer model {path} does not exist")
    if tokenizer_type is None:
        tokenizer_type = infer_tokenizer_type(path)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(path, special_pieces)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path, special_pieces)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {TOKENIZER_TYPES}")
