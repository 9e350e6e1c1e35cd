"""The words the synthetic captions are made of, grouped by what they say about the image.

Grounded words name what the image shows (colour, shape, size, position, count); template
words are glue that the text alone predicts; unrelated words are metadata that no image
shows (a place, a photographer, a date, a price), drawn at random so that neither the image
nor the text predicts them. The order of COLORS and SHAPES matters: ``--num-colors`` and
``--num-shapes`` take prefixes, and ``--object-skew`` makes earlier entries more frequent.
"""

from __future__ import annotations

# Saturated, well separated hues that survive a downscale to 32x32 on a dark background.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 90, 235),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 205),
    "orange": (245, 140, 30),
    "white": (235, 235, 235),
    "cyan": (40, 205, 215),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "diamond", "heart")
# Radius as a fraction of half a grid cell.
SIZES: dict[str, float] = {"small": 0.55, "large": 0.85}
# Grid cell (row, col) -> the words that name it; the centre cell is just "center".
POSITIONS: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
COUNT_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
BACKGROUND: tuple[int, int, int] = (28, 28, 32)

PLACES: tuple[str, ...] = (
    "paris", "berlin", "lisbon", "oslo", "cairo", "lima", "quito", "hanoi", "dublin", "vienna",
    "madrid", "warsaw", "nairobi", "toronto", "sydney", "osaka", "seoul", "denver", "boston",
    "glasgow", "porto", "krakow", "bergen", "geneva", "havana", "mumbai", "austin", "dakar",
)
FIRST_NAMES: tuple[str, ...] = (
    "anna", "ben", "chloe", "david", "elena", "farid", "grace", "hugo", "ines", "jonas", "kofi",
    "lena", "marco", "nadia", "oscar", "priya", "quinn", "rosa", "sven", "tara", "umar", "vera",
)
LAST_NAMES: tuple[str, ...] = (
    "kowalski", "okafor", "lindqvist", "moreau", "tanaka", "silva", "novak", "haddad", "brennan",
    "fischer", "rossi", "petrov", "nguyen", "garcia", "schmidt", "obi", "larsen", "costa",
)
MONTHS: tuple[str, ...] = (
    "january", "february", "march", "april", "may", "june", "july", "august", "september",
    "october", "november", "december",
)
