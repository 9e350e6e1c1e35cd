"""Scenes of a few objects on a 3x3 grid: sampling them from a seeded RNG and rendering them.

Rendering draws at ``RENDER_SCALE`` times the target size and downsamples with a box filter,
so small shapes keep anti-aliased, recognisable outlines at 32x32. Everything depends only on
the RNG passed in, so a seed gives the same pixels everywhere (PIL's drawing and PNG encoder
are deterministic).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from PIL import Image, ImageDraw

from megatron_prior.demo.vocab import BACKGROUND, COLORS, POSITIONS, SHAPES, SIZES

RENDER_SCALE = 8
# A shape's centre may move this fraction of a cell away from the cell centre, and its
# radius and colour vary a little, so that no two renders of one description are identical.
POSITION_JITTER = 0.08
SIZE_JITTER = 0.08
COLOR_JITTER = 18


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    row: int
    col: int

    @property
    def position(self) -> str:
        return POSITIONS[(self.row, self.col)]

    @property
    def pair(self) -> tuple[str, str]:
        """What the probe calls "an object": colour and shape (size and place aside)."""
        return (self.color, self.shape)

    def to_json(self) -> dict:
        return {**asdict(self), "position": self.position}


@dataclass(frozen=True)
class SceneSpec:
    """What scenes may contain: the active colour and shape vocabularies and their weights."""

    colors: tuple[str, ...]
    shapes: tuple[str, ...]
    color_weights: tuple[float, ...]
    shape_weights: tuple[float, ...]
    min_objects: int
    max_objects: int

    @classmethod
    def build(cls, num_colors: int, num_shapes: int, object_skew: float, min_objects: int,
              max_objects: int) -> "SceneSpec":
        if not 2 <= num_colors <= len(COLORS):
            raise ValueError(f"--num-colors must be in [2, {len(COLORS)}], got {num_colors}")
        if not 2 <= num_shapes <= len(SHAPES):
            raise ValueError(f"--num-shapes must be in [2, {len(SHAPES)}], got {num_shapes}")
        if not 1 <= min_objects <= max_objects <= len(POSITIONS):
            raise ValueError(f"need 1 <= --min-objects <= --max-objects <= {len(POSITIONS)}, "
                             f"got {min_objects} and {max_objects}")
        if object_skew < 0 or not math.isfinite(object_skew):
            raise ValueError(f"--object-skew must be a finite number >= 0, got {object_skew}")
        # Zipf-like frequencies: a language prior to resist, as POPE's "popular" split needs.
        zipf = lambda n: tuple(1.0 / (k + 1) ** object_skew for k in range(n))  # noqa: E731
        return cls(tuple(COLORS)[:num_colors], SHAPES[:num_shapes], zipf(num_colors),
                   zipf(num_shapes), min_objects, max_objects)

    @property
    def pairs(self) -> list[tuple[str, str]]:
        return [(c, s) for c in self.colors for s in self.shapes]


def sample_scene(rng: random.Random, spec: SceneSpec) -> list[SceneObject]:
    """1..max objects in distinct grid cells, listed in reading order (row by row)."""
    n = rng.randint(spec.min_objects, spec.max_objects)
    cells = sorted(rng.sample(sorted(POSITIONS), n))
    return [SceneObject(shape=rng.choices(spec.shapes, spec.shape_weights)[0],
                        color=rng.choices(spec.colors, spec.color_weights)[0],
                        size=rng.choice(sorted(SIZES)), row=r, col=c) for r, c in cells]


def _shape_points(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    def ring(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
        step = 360.0 / len(radii)
        return [(cx + rad * math.cos(math.radians(start_deg + i * step)),
                 cy + rad * math.sin(math.radians(start_deg + i * step))) for i, rad in enumerate(radii)]

    if shape == "square":
        h = r * 0.82
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return ring([r] * 3, -90.0)
    if shape == "star":
        return ring([r, r * 0.42] * 5, -90.0)
    if shape == "diamond":
        return ring([r] * 4, -90.0)
    if shape == "cross":
        a, w = r * 0.95, r * 0.34
        return [(cx - w, cy - a), (cx + w, cy - a), (cx + w, cy - w), (cx + a, cy - w),
                (cx + a, cy + w), (cx + w, cy + w), (cx + w, cy + a), (cx - w, cy + a),
                (cx - w, cy + w), (cx - a, cy + w), (cx - a, cy - w), (cx - w, cy - w)]
    if shape == "heart":
        # The classic parametric heart, scaled to fit the radius, point down.
        pts = []
        for i in range(48):
            t = 2 * math.pi * i / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + x * r / 17, cy - (y + 2.5) * r / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


def render_scene(rng: random.Random, scene: list[SceneObject], image_size: int) -> Image.Image:
    """An RGB image of ``image_size`` x ``image_size`` pixels; ``rng`` supplies the jitter."""
    if image_size < 12:
        raise ValueError(f"--image-size must be at least 12 pixels for 3x3 recognisable cells, got {image_size}")
    big = image_size * RENDER_SCALE
    cell = big / 3.0
    canvas = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for obj in scene:
        cx = (obj.col + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
        cy = (obj.row + 0.5 + rng.uniform(-POSITION_JITTER, POSITION_JITTER)) * cell
        r = SIZES[obj.size] * (1 + rng.uniform(-SIZE_JITTER, SIZE_JITTER)) * cell / 2
        fill = tuple(min(255, max(0, v + rng.randint(-COLOR_JITTER, COLOR_JITTER))) for v in COLORS[obj.color])
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        else:
            draw.polygon(_shape_points(obj.shape, cx, cy, r), fill=fill)
    return canvas.resize((image_size, image_size), Image.Resampling.BOX)
