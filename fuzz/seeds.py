"""Seed inputs of the fuzz targets, from the hostile-input corpus (tests/corpus).

Kept apart from the targets so that making seeds imports nothing instrumented.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
from PIL import Image

from category_suggester.preprocess import ACCEPTED_FORMATS


def event_seeds() -> list[bytes]:
    """Hostile values from the corpus, and valid events of both kinds."""
    from tests.corpus.events import event_cases

    values = [case.value for case in event_cases("http://203.0.113.9/image.jpg")]
    return [value for value in values if value is not None and len(value) <= 4096]


def image_seeds() -> list[bytes]:
    """The corpus images that are small, and small images of every mode and format."""
    from tests.corpus.images import encode, exif_orientation, image_cases, picture

    out = [case.data for case in image_cases() if len(case.data) <= 64 * 1024]
    base = picture(1, (48, 36))
    images = [base.convert(mode) for mode in ("RGB", "L", "P", "RGBA", "LA", "1", "CMYK")]
    images.append(Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257))
    for image in images:
        for fmt in ACCEPTED_FORMATS:
            with contextlib.suppress(OSError):  # a mode this format cannot store
                out.append(encode(image, fmt))
    frames = [picture(2, (48, 36)), picture(3, (48, 36))]
    out += [encode(frames, "WEBP"), encode(frames, "PNG")]
    out += [encode(base, "JPEG", exif=exif_orientation(6))]
    out += [encode(base, "PNG", exif=exif_orientation(8))]
    return out


SEEDS: dict[str, Callable[[], list[bytes]]] = {"events": event_seeds, "images": image_seeds}
