"""The benchmark's photos: generated, listing-like, cached on disk between runs.

`listing_photos(count, seed)` returns photos like the ones sellers upload: about 80 % JPEG,
10 % PNG and 10 % WebP, 800 to 2000 px on the long side in the usual aspect ratios,
80 to 400 KB each, and one JPEG in twenty carrying an EXIF orientation (6 or 8: taken with
the phone turned). Content is a lit background, a few shapes and sensor-like noise: enough
texture that the encoders produce photo-sized files and the decoder does photo-sized work.
`tiny_photos(count)` returns 64 x 48 px JPEGs (a few hundred bytes) for the overhead run,
where the pipeline's own cost per event is measured and decoding should cost next to nothing.

Generation is deterministic for a seed and takes about a second per photo and core, so
the files are cached under `cache_dir` (keyed by the parameters and this module's version);
a later run reads them back in a second.
"""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import random
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

# Bump when generation changes, so caches of the old photos are not reused.
_GENERATOR_VERSION = 3
_MIN_BYTES = 80 * 1024
_MAX_BYTES = 400 * 1024
_ORIENTATION_TAG = 0x0112
_ASPECTS = ((4, 3), (3, 4), (1, 1), (16, 9), (3, 2))
_EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


@dataclass(frozen=True)
class Photo:
    """One image file: its name on the origin, its bytes and what it is."""

    name: str
    data: bytes
    fmt: str
    width: int
    height: int
    orientation: int

    @property
    def kib(self) -> float:
        return len(self.data) / 1024


def _format_for(index: int) -> str:
    slot = index % 10
    if slot == 3:
        return "PNG"
    if slot == 7:
        return "WEBP"
    return "JPEG"


def _canvas(rng: random.Random, width: int, height: int, noise: float) -> Image.Image:
    """A product-photo-like RGB image: lit background, shapes, blur, sensor noise."""
    gen = np.random.default_rng(rng.randrange(2**32))
    top = np.array([rng.randrange(120, 256) for _ in range(3)], dtype=np.float32)
    bottom = top * rng.uniform(0.4, 0.9)
    ramp = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    background = (top * (1 - ramp) + bottom * ramp).astype(np.uint8)
    image = Image.fromarray(np.broadcast_to(background, (height, width, 3)).copy())
    draw = ImageDraw.Draw(image)
    for _ in range(rng.randrange(4, 9)):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randrange(width // 10, width // 2)
        y1 = y0 + rng.randrange(height // 10, height // 2)
        colour = (rng.randrange(256), rng.randrange(256), rng.randrange(256))
        shape = rng.choice(("rectangle", "ellipse", "polygon"))
        if shape == "rectangle":
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        elif shape == "ellipse":
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        else:
            points = [(rng.randrange(width), rng.randrange(height)) for _ in range(5)]
            draw.polygon(points, fill=colour)
    image = image.filter(ImageFilter.GaussianBlur(radius=rng.uniform(1.0, 3.0)))
    if noise > 0:
        pixels = np.asarray(image, dtype=np.int16)
        grain = gen.normal(0.0, noise, size=(height, width, 1)).astype(np.int16)
        image = Image.fromarray(np.clip(pixels + grain, 0, 255).astype(np.uint8))
    return image


def _encode(image: Image.Image, fmt: str, quality: int, orientation: int) -> bytes:
    out = io.BytesIO()
    if fmt == "JPEG":
        options: dict[str, object] = {"quality": quality, "optimize": False}
        if orientation != 1:
            exif = Image.Exif()
            exif[_ORIENTATION_TAG] = orientation
            options["exif"] = exif.tobytes()
        image.save(out, format="JPEG", **options)
    elif fmt == "WEBP":
        image.save(out, format="WEBP", quality=quality, method=2)
    else:
        # A PNG photo at these sizes is megabytes; sellers' PNGs are mostly product shots
        # on flat backgrounds, which a palette keeps in range.
        image.quantize(colors=64, method=Image.Quantize.MEDIANCUT).save(
            out, format="PNG", compress_level=6
        )
    return out.getvalue()


def _one_photo(index: int, seed: int) -> Photo:
    rng = random.Random(seed * 1_000_003 + index)
    fmt = _format_for(index)
    long_side = rng.randrange(800, 2001)
    a, b = rng.choice(_ASPECTS)
    width, height = (long_side, long_side * b // a) if a >= b else (long_side * a // b, long_side)
    orientation = rng.choice((6, 8)) if fmt == "JPEG" and index % 20 == 1 else 1
    # Photo-sized files: more grain on small images, less on large ones; adjust the quality
    # (lossy formats) or the grain (PNG) until the file lands in 80-400 KB.
    pixels = width * height
    noise = float(np.clip(6.0 * 1.5e6 / pixels, 2.0, 10.0))
    quality = 82
    data = b""
    for _ in range(8):
        data = _encode(_canvas(rng, width, height, noise), fmt, quality, orientation)
        if _MIN_BYTES <= len(data) <= _MAX_BYTES:
            break
        if len(data) > _MAX_BYTES:
            quality = max(40, quality - 12)
            noise *= 0.7
        else:
            quality = min(95, quality + 6)
            noise *= 1.5
    name = f"photos/{index:04d}.{_EXTENSIONS[fmt]}"
    return Photo(name, data, fmt, width, height, orientation)


def _tiny_photo(index: int) -> Photo:
    rng = random.Random(index)
    image = Image.new("RGB", (64, 48), (rng.randrange(256), rng.randrange(256), 128))
    ImageDraw.Draw(image).ellipse((8, 8, 40, 40), fill=(rng.randrange(256), 40, 200))
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=85)
    return Photo(f"tiny/{index:03d}.jpg", out.getvalue(), "JPEG", 64, 48, 1)


def _cache_path(cache_dir: Path, key: dict[str, object]) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"photos-{digest}"


def _load(folder: Path) -> list[Photo] | None:
    index_file = folder / "index.json"
    if not index_file.is_file():
        return None
    entries = json.loads(index_file.read_text())
    photos = []
    for entry in entries:
        path = folder / entry["name"]
        if not path.is_file():
            return None
        photos.append(
            Photo(
                entry["name"],
                path.read_bytes(),
                entry["fmt"],
                entry["width"],
                entry["height"],
                entry["orientation"],
            )
        )
    return photos


def _store(folder: Path, photos: list[Photo]) -> None:
    for photo in photos:
        path = folder / photo.name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(photo.data)
    entries = [
        {
            "name": p.name,
            "fmt": p.fmt,
            "width": p.width,
            "height": p.height,
            "orientation": p.orientation,
        }
        for p in photos
    ]
    # Written last: a folder without it (an interrupted run) is regenerated.
    (folder / "index.json").write_text(json.dumps(entries, indent=1))


def listing_photos(count: int, *, seed: int = 7, cache_dir: Path | None = None) -> list[Photo]:
    """`count` listing-like photos (see the module docstring), from the cache if there."""
    key: dict[str, object] = {"kind": "listing", "count": count, "seed": seed}
    key["version"] = _GENERATOR_VERSION
    folder = _cache_path(cache_dir, key) if cache_dir is not None else None
    if folder is not None:
        cached = _load(folder)
        if cached is not None:
            return cached
    # One process per core: a hundred photos take tens of seconds on one. Spawned, since
    # the caller may have threads running.
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(os.cpu_count() or 1, mp_context=context) as pool:
        photos = list(pool.map(_one_photo, range(count), [seed] * count))
    if folder is not None:
        _store(folder, photos)
    return photos


def tiny_photos(count: int) -> list[Photo]:
    """`count` 64 x 48 px JPEGs for the overhead run (cheap to make; never cached)."""
    return [_tiny_photo(index) for index in range(count)]


def describe(photos: list[Photo]) -> dict[str, object]:
    """Counts per format, size range in KB and px, and how many carry an EXIF rotation."""
    sizes = [p.kib for p in photos]
    sides = [max(p.width, p.height) for p in photos]
    formats: dict[str, int] = {}
    for photo in photos:
        formats[photo.fmt] = formats.get(photo.fmt, 0) + 1
    return {
        "count": len(photos),
        "formats": formats,
        "kib_min": round(min(sizes), 1),
        "kib_mean": round(sum(sizes) / len(sizes), 1),
        "kib_max": round(max(sizes), 1),
        "long_side_min": min(sides),
        "long_side_max": max(sides),
        "exif_rotated": sum(1 for p in photos if p.orientation != 1),
    }
