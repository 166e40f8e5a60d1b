"""Photos made in tests: coloured shapes on a background, in any format Pillow writes."""

from __future__ import annotations

import io
import random

from PIL import Image, ImageDraw


def photo(
    seed: int, *, size: tuple[int, int] = (640, 480), fmt: str = "JPEG", mode: str = "RGB"
) -> bytes:
    rng = random.Random(seed)
    background = tuple(rng.randrange(256) for _ in range(3))
    image = Image.new("RGB", size, background)  # type: ignore[arg-type]
    draw = ImageDraw.Draw(image)
    for _ in range(6):
        x0, y0 = rng.randrange(size[0]), rng.randrange(size[1])
        x1, y1 = x0 + rng.randrange(20, size[0] // 2), y0 + rng.randrange(20, size[1] // 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        if rng.random() < 0.5:
            draw.rectangle((x0, y0, x1, y1), fill=colour)  # type: ignore[arg-type]
        else:
            draw.ellipse((x0, y0, x1, y1), fill=colour)  # type: ignore[arg-type]
    if mode != "RGB":
        image = image.convert(mode)
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()
