"""Token kinds, for losses reported per kind of caption token.

A token's kind says why it is in the caption: ``grounded`` (depends on the image),
``template`` (predictable from the text), ``unrelated`` (neither: tags, noise), or
``other`` (no annotation). Stored per token as uint8 in ``{prefix}.kinds.bin/.idx``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

KIND_NAMES: tuple[str, ...] = ("other", "grounded", "template", "unrelated")
KIND_IDS: dict[str, int] = {name: i for i, name in enumerate(KIND_NAMES)}
OTHER: int = KIND_IDS["other"]


def kinds_from_spans(
    token_char_starts: Sequence[int], spans: Iterable[Sequence], text_length: int
) -> np.ndarray:
    """Per-token kind ids from character spans ``[start, end, kind_name]``.

    A token takes the kind of the span that holds its first character, "other" if none.
    Raises ValueError for an unknown kind name or a span outside the text.
    """
    starts = np.asarray(token_char_starts, dtype=np.int64)
    kinds = np.full(len(starts), OTHER, dtype=np.uint8)
    for span in spans:
        if not isinstance(span, (list, tuple)) or len(span) != 3:
            raise ValueError(f"kind span {span!r} is not [char_start, char_end, kind]")
        begin, end, name = span
        if not isinstance(name, str) or name not in KIND_IDS:
            raise ValueError(f"unknown token kind {name!r} (known: {', '.join(KIND_NAMES)})")
        if not (type(begin) is int and type(end) is int and 0 <= begin <= end <= text_length):  # no bools
            raise ValueError(f"kind span {span!r} lies outside the text of {text_length} characters")
        kinds[(starts >= begin) & (starts < end)] = KIND_IDS[name]
    return kinds
