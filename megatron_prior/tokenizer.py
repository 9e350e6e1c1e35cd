"""Tokenizers with the special tokens PRIOR's models need and a stable fingerprint.

Every tokenizer here exposes what megatron-core's datasets expect (``vocab_size``, ``eod``,
``pad``, ``unique_identifiers``) plus the image placeholder and the U-LVLM image markers,
the start token a reference LM reads before a document's first token (``start_token``: the
tokenizer's BOS if it has one, else ``eod``), and a ``fingerprint``: a hash of the tokenizer
files, the special-token ids and the tokens added. The scores written by ``tools/preprocess_with_weights.py``
and the checkpoints record it, so a dataset tokenized with one tokenizer is never trained or
evaluated with another.

- ``SentencePieceTokenizer``: a model from ``tools/train_tokenizer.py``, which holds all six
  pieces of ``SPECIAL_PIECES``.
- ``HuggingFaceTokenizer``: a pretrained model's tokenizer, loaded by ``transformers``'
  ``AutoTokenizer`` from a local directory as ``save_pretrained`` writes it (``tokenizer.json``
  with ``tokenizer_config.json``), or a bare ``tokenizer.json``. Its EOS token is the document
  end ``eod``; its pad token is ``pad``; the image markers, and ``<pad>`` when it has no pad
  token, are added as special tokens after its vocabulary, always in the order of
  ``SPECIAL_PIECES``, so the same files give the same ids.

``special_pieces`` (``--special-tokens``, a JSON mapping) names other tokens for any of the
six roles.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
from abc import ABC, abstractmethod
from collections import OrderedDict
from typing import Mapping, Optional, Sequence

import sentencepiece
from tokenizers import AddedToken

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

# The files of a save_pretrained tokenizer directory that decide how it tokenizes; the
# fingerprint hashes those present.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")

SPECIAL_TOKENS_HELP = ("JSON mapping of special-token roles to tokens of the tokenizer, overriding the defaults "
                       f"({', '.join(SPECIAL_PIECES)}), e.g. '{{\"eod\": \"</s>\", \"image_token_id\": "
                       "\"<image>\"}'. A HuggingFace tokenizer's defaults are its EOS and pad tokens and the "
                       "image markers, added when missing; give the same mapping to preprocessing, training "
                       "and evaluation (it is part of the tokenizer's fingerprint)")

# "org/name" or "name": what a Hugging Face hub id looks like.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def require_local(path: str, flag: str) -> None:
    """Refuse a path that does not exist, saying how to get it when it looks like a hub id:
    nothing here downloads."""
    if os.path.exists(path):
        return
    hint = ""
    if _HUB_ID.match(path) and not path.startswith("."):
        hint = (f"; if {path!r} is a Hugging Face hub id, download it first (huggingface-cli download {path} "
                f"--local-dir DIR) and pass DIR: nothing is downloaded at run time")
    raise FileNotFoundError(f"{flag} {path}: no such file or directory{hint}")


def parse_special_tokens(text: str) -> dict[str, str]:
    """``--special-tokens``: a JSON object mapping roles of ``SPECIAL_PIECES`` to tokens."""
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"not JSON ({err}): {text!r}") from None
    if not isinstance(mapping, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object of role -> token, got {text!r}")
    for name, token in mapping.items():
        if name not in SPECIAL_PIECES:
            raise argparse.ArgumentTypeError(f"unknown role {name!r}; the roles are {', '.join(SPECIAL_PIECES)}")
        if not isinstance(token, str) or not token:
            raise argparse.ArgumentTypeError(f"{name}: the token must be a non-empty string, got {token!r}")
    return mapping


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
    """The tokenizer interface the data pipeline and the models share.

    ``bos`` is the tokenizer's beginning-of-sequence id (None without one); ``start_token``
    is what a reference LM reads before a document's first token: ``bos``, else ``eod``.
    ``own_vocab_size`` counts the ids the tokenizer had before any were added here (a
    reference LM of the same tokenizer must score all of them); ``added_tokens`` maps the
    tokens added here to their ids.
    """

    def __init__(self, path: str, special_ids: Mapping[str, int], vocab_size: int, files: Mapping[str, str],
                 special_pieces: Optional[Mapping[str, str]], bos: Optional[int] = None,
                 own_vocab_size: Optional[int] = None, added_tokens: Optional[Mapping[str, int]] = None) -> None:
        self.path = path
        self.vocab_size = vocab_size
        self.own_vocab_size = vocab_size if own_vocab_size is None else own_vocab_size
        self.bos = bos
        self.start_token = bos if bos is not None else special_ids["eod"]
        self._special_pieces = dict(special_pieces or {})
        for name, token_id in special_ids.items():
            setattr(self, name, token_id)
        self.special_ids = dict(special_ids)
        ids = list(special_ids.values())
        if len(set(ids)) != len(ids):
            raise ValueError(f"tokenizer {path}: special tokens share ids: {self.special_ids}")
        self.added_tokens = dict(added_tokens or {})
        payload = {"class": type(self).__name__, "special_ids": self.special_ids}
        if self.added_tokens:  # the files do not hold them: their names and ids are the tokenizer too
            payload["added_tokens"] = self.added_tokens
        for key, file in files.items():
            payload[key] = sha256_file(file)
        self.fingerprint = "sha256:" + hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
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

    @property
    def special_pieces(self) -> dict[str, str]:
        """The roles given to this tokenizer explicitly (``--special-tokens``)."""
        return dict(self._special_pieces)

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
        return {"path": self.path, "special_pieces": self._special_pieces}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"], state["special_pieces"])  # type: ignore[misc]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model whose vocabulary holds the pieces of ``SPECIAL_PIECES``."""

    def __init__(self, path: str, special_pieces: Optional[Mapping[str, str]] = None) -> None:
        pieces = dict(SPECIAL_PIECES, **(special_pieces or {}))
        self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
        special_ids = {}
        for name, piece in pieces.items():
            token_id = self._sp.piece_to_id(piece)
            if self._sp.id_to_piece(token_id) != piece:
                raise ValueError(
                    f"tokenizer {path}: no piece {piece!r} for {name}; train it with "
                    "tools/train_tokenizer.py, which adds the special pieces"
                )
            special_ids[name] = token_id
        bos = self._sp.bos_id()
        super().__init__(path, special_ids, self._sp.get_piece_size(), {"file_sha256": path}, special_pieces,
                         bos=bos if bos >= 0 else None)

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
    """A Hugging Face fast tokenizer: a ``save_pretrained`` directory or a bare ``tokenizer.json``.

    Roles (each overridable by ``special_pieces``): ``eod`` is the tokenizer's EOS token (a
    bare ``tokenizer.json`` declares none: its ``<eod>`` token, else the role must be given);
    ``pad`` its pad token, or an added ``<pad>`` when it has none or pads with its EOS
    (megatron-core masks the loss of labels equal to the pad id, which would drop every EOD);
    the image markers its own tokens of those names, else added. ``eod`` must already be in
    the vocabulary: a reference LM has to know the token it scores. Added tokens are special
    (never split, dropped by ``detokenize``) and take the next ids in ``SPECIAL_PIECES``
    order, so ``vocab_size`` grows by their number and the ids are the same on every load.
    Text is tokenized with ``add_special_tokens=False`` (no BOS/EOS added) and with special
    tokens split like any text.
    """

    def __init__(self, path: str, special_pieces: Optional[Mapping[str, str]] = None) -> None:
        pieces = dict(special_pieces or {})
        files = {}
        if os.path.isdir(path):
            tokenizer_json = os.path.join(path, "tokenizer.json")
            if not os.path.isfile(tokenizer_json):
                raise ValueError(f"tokenizer {path}: no tokenizer.json in the directory (save the tokenizer with "
                                 "a fast tokenizer's save_pretrained; token offsets need one)")
            for name in HF_TOKENIZER_FILES[1:]:
                if os.path.isfile(os.path.join(path, name)):
                    files[f"{name}_sha256"] = os.path.join(path, name)
        else:
            tokenizer_json = path
        files["file_sha256"] = tokenizer_json
        # Optional for the SentencePiece path: transformers takes seconds to import, which every
        # trainer start and spawned rank would pay; only HuggingFace tokenizers need it.
        from transformers import AutoTokenizer, PreTrainedTokenizerFast

        try:
            hf = (AutoTokenizer.from_pretrained(path, local_files_only=True) if os.path.isdir(path)
                  else PreTrainedTokenizerFast(tokenizer_file=path))
        # transformers raises OSError or ValueError for files it cannot use, the tokenizers
        # library a bare Exception for a tokenizer.json it cannot parse: the files are wrong.
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"tokenizer {path}: transformers cannot load it: {err}") from None
        if not hf.is_fast:
            raise ValueError(f"tokenizer {path}: loads as a slow {type(hf).__name__}; token offsets need a fast "
                             "tokenizer (tokenizer.json)")
        vocab = hf.get_vocab()
        own_vocab_size = max(vocab.values()) + 1
        eod = pieces.get("eod") or hf.eos_token or ("<eod>" if "<eod>" in vocab else None)
        if eod is None:
            raise ValueError(f"tokenizer {path}: no EOS token to end documents with (a bare tokenizer.json names "
                             "none); give the directory save_pretrained wrote, or name it with --special-tokens "
                             "'{\"eod\": \"TOKEN\"}'")
        if eod not in vocab:
            raise ValueError(f"tokenizer {path}: no token {eod!r} for eod; the document end must be a token the "
                             "tokenizer (and a reference LM of it) knows")
        pad = pieces.get("pad") or (hf.pad_token if hf.pad_token not in (None, eod) else SPECIAL_PIECES["pad"])
        roles = {"eod": eod, "pad": pad}
        roles.update((name, pieces.get(name, SPECIAL_PIECES[name])) for name in list(SPECIAL_PIECES)[2:])
        missing = list(dict.fromkeys(token for token in roles.values() if token not in vocab))
        hf.add_tokens([AddedToken(token, special=True, normalized=False) for token in missing], special_tokens=True)
        self._hf = hf
        vocab = hf.get_vocab()
        special_ids = {name: vocab[token] for name, token in roles.items()}
        super().__init__(path, special_ids, max(vocab.values()) + 1, files, special_pieces, bos=hf.bos_token_id,
                         own_vocab_size=own_vocab_size, added_tokens={token: vocab[token] for token in missing})

    # split_special_tokens: text that spells a special token ("<image>", "</s>") is tokenized as
    # text, as SentencePiece treats its control symbols; a caption never yields a marker or an EOD.
    def tokenize(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False, split_special_tokens=True, verbose=False)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._hf(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True,
                       verbose=False)
        return enc["input_ids"], [_first_visible(text, b, e) for b, e in enc["offset_mapping"]]

    def detokenize(self, ids: Sequence[int]) -> str:
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=True)


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
    """Load a tokenizer from a local path; the type is inferred from the name when not given.

    ``tokenizer_type`` takes Megatron's names: ``SentencePieceTokenizer`` (a ``.model``
    file) or ``HuggingFaceTokenizer`` (a ``save_pretrained`` directory or a ``tokenizer.json``).
    ``special_pieces`` maps roles (``eod``, ``pad``, ``image_token_id``, ...) to tokens other
    than the defaults (``--special-tokens``). A path that does not exist is refused, with the
    command that downloads it when it looks like a hub id.
    """
    require_local(path, "--tokenizer-model")
    if tokenizer_type is None:
        tokenizer_type = infer_tokenizer_type(path)
    if tokenizer_type == "SentencePieceTokenizer":
        return SentencePieceTokenizer(path, special_pieces)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(path, special_pieces)
    raise ValueError(f"unknown tokenizer type {tokenizer_type!r}; choose one of {TOKENIZER_TYPES}")
