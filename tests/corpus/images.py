"""Odd and hostile image files, each with the outcome the service must give it.

`image_cases()` returns `ImageCase`s: good-but-odd images (CMYK, 16-bit, palette with
transparency, animations, grayscale, EXIF-rotated, extreme aspect ratios, the largest
allowed size) that must be classified, and hostile ones (pixel bombs, inflating PNG
metadata, truncated files, formats outside the allow-list) that must be dead-lettered with
their reason. Built once per process (a few seconds), deterministic.

An EXIF-rotated case carries `upright`: a file of the same picture stored upright without
EXIF, whose suggestion must be the same. Files that are stored losslessly (PNG, lossless
WebP) make that equality exact.
"""

from __future__ import annotations

import functools
import gzip
import io
import random
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from tests.corpus import SUGGESTED

ORIENTATION = 0x0112
# The largest image the service's default pixel limit (40 MP) still decodes.
LARGEST_ALLOWED = (6000, 6000)  # JPEG: under decode.max_pixels (40 MP)
# PNG and WebP decode at full size, so they have a lower limit (decode.max_pixels_lossless).
LARGEST_ALLOWED_LOSSLESS = (4000, 4000)


@dataclass(frozen=True)
class ImageCase:
    name: str  # also the file name on the test origin
    data: bytes
    expect: str  # SUGGESTED or the DLQ reason
    upright: bytes | None = None  # EXIF cases: the same picture stored upright


# -- building blocks ----------------------------------------------------------------------


def picture(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """An RGB picture: coloured shapes, and corner marks that make any rotation visible."""
    rng = random.Random(seed)
    width, height = size
    image = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, y0 = rng.randrange(width), rng.randrange(height)
        x1 = x0 + rng.randrange(width // 8 + 1, width // 2 + 2)
        y1 = y0 + rng.randrange(height // 8 + 1, height // 2 + 2)
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = draw.rectangle if rng.random() < 0.5 else draw.ellipse
        shape((x0, y0, x1, y1), fill=colour)
    draw.rectangle((0, 0, width // 5, height // 7), fill=(250, 20, 20))
    draw.polygon(
        [(width - 1, height - 1), (width // 2, height - 1), (width - 1, height // 3)],
        fill=(20, 20, 250),
    )
    return image


def encode(image: Image.Image | list[Image.Image], fmt: str, **options: object) -> bytes:
    frames = image if isinstance(image, list) else [image]
    out = io.BytesIO()
    if len(frames) > 1:
        options = {"save_all": True, "append_images": frames[1:], "duration": 80, **options}
    frames[0].save(out, format=fmt, **options)
    return out.getvalue()


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def png_raw(width: int, height: int, depth: int, colour_type: int, rows: bytes) -> bytes:
    """A PNG from raw scanlines (each already prefixed with its filter byte)."""
    header = struct.pack(">IIBBBBB", width, height, depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(rows, 9))
        + png_chunk(b"IEND", b"")
    )


def png_with_chunks(base: bytes, *chunks: bytes) -> bytes:
    """`base` (a PNG) with `chunks` inserted right after IHDR, so they are read on open."""
    ihdr_end = 8 + 4 + 4 + 13 + 4
    return base[:ihdr_end] + b"".join(chunks) + base[ihdr_end:]


def png_16bit_rgb(image: Image.Image) -> bytes:
    """A 48-bit RGB PNG (Pillow cannot write one): each 8-bit value v becomes v * 257."""
    wide = np.asarray(image, dtype=np.uint16) * 257
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in wide)
    return png_raw(image.width, image.height, 16, 2, rows)


def png_pixel_bomb(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims `width` x `height` pixels (the data is a stub)."""
    return png_raw(width, height, 8, 2, b"\x00" * 4096)


def jpeg_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a baseline JPEG) with its frame header claiming another size."""
    at = data.index(b"\xff\xc0")
    return data[: at + 5] + struct.pack(">HH", height, width) + data[at + 9 :]


def webp_lossless_with_size(data: bytes, width: int, height: int) -> bytes:
    """`data` (a lossless WebP, VP8L) with its bitstream header claiming another size."""
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F, "not a simple lossless WebP"
    (bits,) = struct.unpack("<I", data[at + 1 : at + 5])
    bits = (bits & ~0x0FFFFFFF) | (width - 1) | ((height - 1) << 14)
    return data[: at + 1] + struct.pack("<I", bits) + data[at + 5 :]


def exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = value
    return exif.tobytes()


# The Pillow transpose that undoes what `apply` does, per EXIF orientation.
_STORE_FOR_ORIENTATION = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,  # shown after ROTATE_270
    8: Image.Transpose.ROTATE_270,  # shown after ROTATE_90
    5: Image.Transpose.TRANSPOSE,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
}


def exif_rotated(upright: Image.Image, orientation: int, fmt: str, **options: object) -> bytes:
    """`upright` stored turned so that applying EXIF `orientation` shows it upright."""
    stored = upright.transpose(_STORE_FOR_ORIENTATION[orientation])
    return encode(stored, fmt, exif=exif_orientation(orientation), **options)


# -- the cases ----------------------------------------------------------------------------


def _good_but_odd() -> list[ImageCase]:
    base = picture(1)
    rgba = base.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(base.size))
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    palette.info["transparency"] = 0
    gray16 = Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257)
    frames = [picture(2), picture(3), picture(4)]
    up_png, up_webp = picture(5, (500, 300)), picture(6, (300, 520))
    cases = [
        ImageCase("odd/cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=90), SUGGESTED),
        ImageCase("odd/progressive.jpg", encode(base, "JPEG", progressive=True), SUGGESTED),
        ImageCase("odd/gray.jpg", encode(base.convert("L"), "JPEG"), SUGGESTED),
        ImageCase("odd/gray.png", encode(base.convert("L"), "PNG"), SUGGESTED),
        ImageCase("odd/bilevel.png", encode(base.convert("1"), "PNG"), SUGGESTED),
        ImageCase("odd/gray16.png", encode(gray16, "PNG"), SUGGESTED),
        ImageCase("odd/rgb48.png", png_16bit_rgb(base), SUGGESTED),
        ImageCase("odd/gray-alpha.png", encode(base.convert("LA"), "PNG"), SUGGESTED),
        ImageCase("odd/rgba.png", encode(rgba, "PNG"), SUGGESTED),
        ImageCase("odd/rgba.webp", encode(rgba, "WEBP", lossless=True), SUGGESTED),
        ImageCase("odd/palette-transparency.png", encode(palette, "PNG"), SUGGESTED),
        ImageCase("odd/animated.webp", encode(frames, "WEBP", loop=0), SUGGESTED),
        ImageCase("odd/animated.png", encode(frames, "PNG", loop=0), SUGGESTED),
        ImageCase(
            "odd/exif-6.png", exif_rotated(up_png, 6, "PNG"), SUGGESTED, encode(up_png, "PNG")
        ),
        ImageCase(
            "odd/exif-8.webp",
            exif_rotated(up_webp, 8, "WEBP", lossless=True),
            SUGGESTED,
            encode(up_webp, "WEBP", lossless=True),
        ),
        ImageCase(
            "odd/exif-5.png", exif_rotated(up_png, 5, "PNG"), SUGGESTED, encode(up_png, "PNG")
        ),
        ImageCase("odd/exif-3.jpg", exif_rotated(base, 3, "JPEG", quality=95), SUGGESTED),
        ImageCase(
            "odd/one-pixel.png", encode(Image.new("RGB", (1, 1), (9, 99, 199)), "PNG"), SUGGESTED
        ),
        ImageCase(
            "odd/panorama.png", encode(picture(7, (800, 300)).resize((8000, 3)), "PNG"), SUGGESTED
        ),
        ImageCase(
            "odd/tower.jpg", encode(picture(8, (300, 800)).resize((16, 4000)), "JPEG"), SUGGESTED
        ),
        ImageCase(
            "odd/largest-allowed.jpg", encode(picture(9, LARGEST_ALLOWED), "JPEG"), SUGGESTED
        ),
        ImageCase(
            "odd/largest-allowed.png",
            encode(picture(10, LARGEST_ALLOWED_LOSSLESS), "PNG", compress_level=1),
            SUGGESTED,
        ),
        # Metadata within the limits is read and ignored.
        ImageCase(
            "odd/icc-900k.png",
            png_with_chunks(
                encode(base, "PNG"),
                png_chunk(b"iCCP", b"profile\x00\x00" + zlib.compress(b"\x01" * 900_000)),
            ),
            SUGGESTED,
        ),
        ImageCase(
            "odd/exif-64k.jpg",
            encode(base, "JPEG", exif=b"Exif\x00\x00" + b"\x00" * 65000),
            SUGGESTED,
        ),
        ImageCase(
            "odd/trailing-garbage.jpg", encode(base, "JPEG") + b"\x00garbage" * 1000, SUGGESTED
        ),
    ]
    return cases


def _hostile() -> list[ImageCase]:
    base = picture(11, (64, 48))
    jpeg = encode(base, "JPEG")
    webp = encode(base, "WEBP", lossless=True)
    two_mib = 2 * 1024 * 1024
    noise = Image.fromarray(
        np.random.default_rng(5).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    )
    return [
        # Pixel bombs: small files, huge headers. Refused before any pixel is decoded.
        ImageCase("bomb/50000x50000.png", png_pixel_bomb(50_000, 50_000), "image_too_large"),
        ImageCase("bomb/8000x8000.png", png_pixel_bomb(8000, 8000), "image_too_large"),
        # Allowed as a JPEG (see odd/largest-allowed.jpg), over the PNG/WebP limit.
        ImageCase("bomb/5000x5000.png", png_pixel_bomb(5000, 5000), "image_too_large"),
        ImageCase("bomb/65500x65500.jpg", jpeg_with_size(jpeg, 65_500, 65_500), "image_too_large"),
        ImageCase("bomb/7000x7000.jpg", jpeg_with_size(jpeg, 7000, 7000), "image_too_large"),
        ImageCase(
            "bomb/16384x16384.webp", webp_lossless_with_size(webp, 16384, 16384), "image_too_large"
        ),
        ImageCase(
            "bomb/7000x7000.webp", webp_lossless_with_size(webp, 7000, 7000), "image_too_large"
        ),
        # PNG metadata that inflates while the header is read.
        ImageCase(
            "bomb/iccp-2mib.png",
            png_with_chunks(
                encode(base, "PNG"),
                png_chunk(b"iCCP", b"icc\x00\x00" + zlib.compress(bytes(two_mib))),
            ),
            "image_too_large",
        ),
        ImageCase(
            "bomb/ztxt-2mib.png",
            png_with_chunks(
                encode(base, "PNG"),
                png_chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"a" * two_mib)),
            ),
            "image_too_large",
        ),
        ImageCase(
            "bomb/ztxt-5x900k.png",
            png_with_chunks(
                encode(base, "PNG"),
                *(
                    png_chunk(b"zTXt", b"k%d\x00\x00" % i + zlib.compress(b"b" * 900_000))
                    for i in range(5)
                ),
            ),
            "image_too_large",
        ),
        # Damaged files.
        ImageCase("broken/truncated.jpg", encode(noise, "JPEG")[:4000], "image_undecodable"),
        ImageCase("broken/truncated.png", encode(noise, "PNG")[:4000], "image_undecodable"),
        ImageCase("broken/truncated.webp", encode(noise, "WEBP")[:4000], "image_undecodable"),
        ImageCase("broken/bad-crc.png", _corrupt_crc(encode(base, "PNG")), "image_undecodable"),
        ImageCase(
            "broken/jpeg-magic-only.jpg",
            b"\xff\xd8\xff" + bytes(range(256)) * 8,
            "image_undecodable",
        ),
        # Formats outside the allow-list: refused from their magic numbers, never parsed.
        ImageCase(
            "formats/animated.gif",
            encode([picture(12), picture(13)], "GIF", loop=0),
            "format_refused",
        ),
        ImageCase("formats/still.gif", encode(base, "GIF"), "format_refused"),
        ImageCase("formats/image.tiff", encode(base, "TIFF"), "format_refused"),
        ImageCase("formats/image.bmp", encode(base, "BMP"), "format_refused"),
        ImageCase("formats/image.ico", encode(base, "ICO"), "format_refused"),
        ImageCase("formats/image.psd", _psd_header(64, 48), "format_refused"),
        ImageCase("formats/image.eps", _eps(), "format_refused"),
        ImageCase(
            "formats/dos.eps",
            b"\xc5\xd0\xd3\xc6" + struct.pack("<I", 30) + bytes(64),
            "format_refused",
        ),
        ImageCase("formats/image.svg", _svg(), "format_refused"),
        ImageCase("formats/laughs.svg", _billion_laughs_svg(), "format_refused"),
        ImageCase("formats/image.avif", b"\x00\x00\x00\x1cftypavif" + bytes(64), "format_refused"),
        ImageCase("formats/image.heic", b"\x00\x00\x00\x18ftypheic" + bytes(64), "format_refused"),
        ImageCase(
            "formats/image.jp2", b"\x00\x00\x00\x0cjP  \r\n\x87\n" + bytes(64), "format_refused"
        ),
        # Not images at all.
        ImageCase("other/page.pdf", b"%PDF-1.7\n" + bytes(64), "not_an_image"),
        ImageCase("other/gzip-of-png.png", gzip.compress(encode(base, "PNG")), "not_an_image"),
    ]


def _corrupt_crc(png: bytes) -> bytes:
    crc_at = 8 + 4 + 4 + 13  # the IHDR chunk's checksum
    return png[:crc_at] + bytes(b ^ 0xFF for b in png[crc_at : crc_at + 4]) + png[crc_at + 4 :]


def _psd_header(width: int, height: int) -> bytes:
    # Signature, version 1, reserved, 3 channels, height, width, depth 8, RGB.
    return b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, height, width, 8, 3) + bytes(64)


def _eps() -> bytes:
    return (
        b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 48\n"
        b"newpath 0 0 moveto 64 48 lineto stroke showpage\n%%EOF\n"
    )


def _svg() -> bytes:
    return (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="48">'
        b'<rect width="64" height="48" fill="red"/></svg>\n'
    )


def _billion_laughs_svg() -> bytes:
    entities = [b'<!ENTITY l0 "lol">']
    entities += [b'<!ENTITY l%d "%s">' % (i, b"&l%d;" % (i - 1) * 10) for i in range(1, 10)]
    return (
        b'<?xml version="1.0"?>\n<!DOCTYPE svg [' + b"".join(entities) + b"]>\n"
        b'<svg xmlns="http://www.w3.org/2000/svg"><text>&l9;</text></svg>\n'
    )


# The side of a square image at the service's default pixel limit (40 MP).
_LIMIT_SIDE = 6324


def _worst(kind: str) -> bytes:
    side = (_LIMIT_SIDE, _LIMIT_SIDE)
    if kind == "gray16.png":
        return encode(Image.fromarray(np.full(side, 1000, dtype=np.uint16)), "PNG")
    if kind == "rgba.png":
        return encode(Image.new("RGBA", side, (9, 8, 7, 6)), "PNG")
    if kind == "gray-alpha.png":
        return encode(Image.new("LA", side, (9, 6)), "PNG")
    if kind == "palette-transparency.png":
        return encode(Image.new("P", side, 0), "PNG", transparency=0)
    if kind == "rgb.png":
        return encode(Image.new("RGB", side, (9, 8, 7)), "PNG")
    if kind == "rgba-lossless.webp":
        return encode(Image.new("RGBA", side, (9, 8, 7, 6)), "WEBP", lossless=True)
    if kind == "cmyk.jpg":
        return encode(Image.new("CMYK", side, (9, 8, 7, 6)), "JPEG")
    if kind == "progressive.jpg":
        return encode(Image.new("RGB", side, (9, 8, 7)), "JPEG", progressive=True)
    raise ValueError(kind)


WORST_CASES = (
    "gray16.png",
    "rgba.png",
    "gray-alpha.png",
    "palette-transparency.png",
    "rgb.png",
    "rgba-lossless.webp",
    "cmyk.jpg",
    "progressive.jpg",
)


def worst_case_image(kind: str) -> ImageCase:
    """One of the costliest images the default pixel limit still lets through (`WORST_CASES`):
    40 MP decoded in full (PNG, WebP) or converted (alpha, 16-bit, palette, CMYK). The files
    are small (a lossless WebP of one colour is 2 KiB); the pixels are not. About a second.
    """
    return ImageCase(f"worst/{kind}", _worst(kind), SUGGESTED)


@functools.cache
def image_cases() -> tuple[ImageCase, ...]:
    """Every image case; names are unique."""
    cases = (*_good_but_odd(), *_hostile())
    assert len({c.name for c in cases}) == len(cases)
    return cases
