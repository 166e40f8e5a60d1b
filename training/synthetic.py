"""Synthetic photos whose classes are visually distinct, and the demo that trains on them.

`generate(out, per_class=..., seed=...)` writes `<out>/<class>/<n>.jpg` in the layout
`prepare` reads (one folder per category), for the five classes of the report. Each class
has its own colour family and its own drawing (stacked bars for books, a body on two
wheels for car, a table for furniture, a tall rounded slab for mobile, two wheels and a
frame for motorcycle), placed, sized and tinted at random over a noisy background, so a
network must learn something, yet a few epochs on a CPU suffice. Sizes and aspect ratios
vary to exercise the resizing. The same seed gives the same files.

They exist for tests, which need many classes of images quickly; `python -m training demo
--synthetic` trains on them too, the real demo on the committed photos (training/demo.py).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from training.model import DEFAULT_LABELS

log = logging.getLogger(__name__)

Box = tuple[float, float, float, float]
Colour = tuple[int, int, int]
Painter = Callable[[ImageDraw.ImageDraw, Box, Colour, random.Random], None]

# Hue (0..1) of each class's colour family: a fifth of the wheel apart.
_HUES: Final = {"books": 0.0, "car": 0.6, "furniture": 0.2, "mobile": 0.8, "motorcycle": 0.4}


def _books(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    count = rng.randint(3, 6)
    height = (y1 - y0) / count
    for i in range(count):
        inset = rng.uniform(0, 0.2) * (x1 - x0)
        shade = _shade(colour, rng.uniform(0.6, 1.2))
        draw.rectangle((x0 + inset, y0 + i * height, x1 - inset, y0 + (i + 0.85) * height), shade)


def _car(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle((x0, y0 + 0.45 * h, x1, y0 + 0.8 * h), colour)
    draw.rectangle((x0 + 0.25 * w, y0 + 0.2 * h, x1 - 0.25 * w, y0 + 0.45 * h), _shade(colour, 0.8))
    r = 0.13 * w
    for cx in (x0 + 0.22 * w, x1 - 0.22 * w):
        draw.ellipse((cx - r, y0 + 0.8 * h - r, cx + r, y0 + 0.8 * h + r), (20, 20, 20))


def _furniture(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    draw.rectangle((x0, y0 + 0.3 * h, x1, y0 + 0.42 * h), colour)
    leg = 0.08 * w
    for lx in (x0 + 0.05 * w, x1 - 0.05 * w - leg):
        draw.rectangle((lx, y0 + 0.42 * h, lx + leg, y1), _shade(colour, 0.7))


def _mobile(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w = x1 - x0
    slab = (x0 + 0.3 * w, y0, x1 - 0.3 * w, y1)
    draw.rounded_rectangle(slab, radius=0.08 * w, fill=(25, 25, 30))
    m = 0.04 * w
    draw.rectangle((slab[0] + m, slab[1] + 3 * m, slab[2] - m, slab[3] - 3 * m), colour)


def _motorcycle(draw: ImageDraw.ImageDraw, box: Box, colour: Colour, rng: random.Random) -> None:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    r = 0.2 * w
    centres = ((x0 + r, y1 - r), (x1 - r, y1 - r))
    for cx, cy in centres:
        draw.ellipse(
            (cx - r, cy - r, cx + r, cy + r), outline=(15, 15, 15), width=max(2, int(r / 4))
        )
    (ax, ay), (bx, by) = centres
    top = y0 + 0.35 * h
    draw.line((ax, ay, (ax + bx) / 2, top, bx, by), fill=colour, width=max(3, int(w / 14)))
    draw.rectangle(((ax + bx) / 2 - 0.1 * w, top - 0.08 * h, (ax + bx) / 2 + 0.15 * w, top), colour)


_PAINTERS: Final[dict[str, Painter]] = {
    "books": _books,
    "car": _car,
    "furniture": _furniture,
    "mobile": _mobile,
    "motorcycle": _motorcycle,
}


def _shade(colour: Colour, factor: float) -> Colour:
    r, g, b = (min(255, max(0, int(c * factor))) for c in colour)
    return r, g, b


def _hsv(hue: float, saturation: float, value: float) -> Colour:
    pixel = Image.new(
        "HSV", (1, 1), (int(hue % 1.0 * 255), int(saturation * 255), int(value * 255))
    )
    r, g, b = pixel.convert("RGB").getpixel((0, 0))  # type: ignore[misc]
    return int(r), int(g), int(b)


def draw_image(label: str, rng: random.Random) -> Image.Image:
    """One synthetic photo of `label` (one of the five classes)."""
    width, height = rng.randint(96, 176), rng.randint(96, 176)
    hue = _HUES[label] + rng.uniform(-0.04, 0.04)
    background = _hsv(hue + 0.5, rng.uniform(0.05, 0.25), rng.uniform(0.75, 0.95))
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0, 12, (height, width, 3))
    pixels = np.clip(np.asarray(background, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels, "RGB")
    draw = ImageDraw.Draw(img)
    side = min(width, height) * rng.uniform(0.55, 0.85)
    x0 = rng.uniform(0, width - side)
    y0 = rng.uniform(0, height - side)
    colour = _hsv(hue, rng.uniform(0.6, 1.0), rng.uniform(0.55, 0.95))
    _PAINTERS[label](draw, (x0, y0, x0 + side, y0 + side), colour, rng)
    return img.filter(ImageFilter.GaussianBlur(rng.uniform(0.0, 0.8)))


def generate(
    out: Path,
    *,
    per_class: int = 40,
    seed: int = 0,
    labels: Sequence[str] = DEFAULT_LABELS,
) -> Path:
    """Write `per_class` JPEGs per label into `<out>/<label>/`; return `out`."""
    unknown = [label for label in labels if label not in _PAINTERS]
    if unknown:
        raise ValueError(f"no drawing for {unknown}; known: {sorted(_PAINTERS)}")
    for label in labels:
        folder = out / label
        folder.mkdir(parents=True, exist_ok=True)
        rng = random.Random(f"{seed}/{label}")  # noqa: S311  (test data, not a secret)
        for n in range(per_class):
            draw_image(label, rng).save(folder / f"{n:04d}.jpg", quality=90)
    return out
