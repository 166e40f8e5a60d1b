"""Unit tests of the decode step, on images generated here with Pillow."""

from __future__ import annotations

import asyncio
import io
import struct
import time
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from category_suggester.errors import ImageDecodeError
from category_suggester.preprocess import Decoder, decode_image, sniff_format, to_model_input
from category_suggester.settings import DecodeSettings

SIZE = 112
MAX_PIXELS = 40_000_000
RED = (255, 0, 0)
WHITE = (255, 255, 255)
LOSSY = {"JPEG": 12, "WEBP": 12, "PNG": 0}


def encode(img: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    if fmt == "WEBP" and "lossless" not in params:
        params["quality"] = 95
    if fmt == "JPEG":
        params.setdefault("quality", 95)
    img.save(buffer, fmt, **params)
    return buffer.getvalue()


def decode(data: bytes, size: int = SIZE) -> npt.NDArray[np.uint8]:
    return decode_image(data, size=size, max_pixels=MAX_PIXELS)


def refused(data: bytes, max_pixels: int = MAX_PIXELS) -> str:
    with pytest.raises(ImageDecodeError) as caught:
        decode_image(data, size=SIZE, max_pixels=max_pixels)
    assert caught.value.stage == "decode"
    return caught.value.reason


def close_to(pixel: Any, colour: tuple[int, int, int], tolerance: int) -> bool:
    return bool(np.all(np.abs(np.asarray(pixel, dtype=int) - np.asarray(colour)) <= tolerance))


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_with(width: int, height: int, *chunks: bytes) -> bytes:
    """A PNG whose header claims width x height; the pixel data is a stub."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"".join(
        [
            b"\x89PNG\r\n\x1a\n",
            png_chunk(b"IHDR", header),
            *chunks,
            png_chunk(b"IDAT", zlib.compress(b"\0" * 16)),
            png_chunk(b"IEND", b""),
        ]
    )


# -- formats and modes -------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_accepted_formats_give_uint8_rgb_at_size(fmt: str) -> None:
    data = encode(Image.new("RGB", (640, 480), (10, 120, 240)), fmt)
    array = decode(data)
    assert array.shape == (SIZE, SIZE, 3)
    assert array.dtype == np.uint8
    assert close_to(array[SIZE // 2, SIZE // 2], (10, 120, 240), LOSSY[fmt])
    assert decode(data, size=224).shape == (224, 224, 3)


def test_cmyk_jpeg() -> None:
    data = encode(Image.new("CMYK", (64, 48), (0, 255, 255, 0)), "JPEG")
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    assert close_to(decode(data)[50, 50], RED, 12)


@pytest.mark.parametrize(("value", "expected"), [(0, 0), (32768, 128), (65535, 255)])
def test_16_bit_png_is_scaled_not_clipped(value: int, expected: int) -> None:
    data = encode(Image.new("I;16", (64, 48), value), "PNG")
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    assert close_to(decode(data)[50, 50], (expected,) * 3, 1)


def test_palette_with_transparency_is_composited_on_white() -> None:
    img = Image.new("P", (64, 64), 0)
    img.putpalette([0, 0, 0, 255, 0, 0])
    img.paste(1, (32, 0, 64, 64))
    array = decode(encode(img, "PNG", transparency=0))
    assert close_to(array[56, 8], WHITE, 0)  # transparent black -> white
    assert close_to(array[56, 104], RED, 0)


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("LA", (0, 0), WHITE),
        ("LA", (0, 255), (0, 0, 0)),
        ("RGBA", (255, 0, 0, 0), WHITE),
        ("RGBA", (255, 0, 0, 128), (255, 127, 127)),
        ("L", 100, (100, 100, 100)),
        ("1", 1, WHITE),
    ],
)
def test_modes_to_rgb(mode: str, colour: Any, expected: tuple[int, int, int]) -> None:
    array = decode(encode(Image.new(mode, (64, 48), colour), "PNG"))
    assert close_to(array[50, 50], expected, 1)


def test_grayscale_jpeg_has_equal_channels() -> None:
    array = decode(encode(Image.linear_gradient("L").resize((300, 200)), "JPEG"))
    assert np.array_equal(array[..., 0], array[..., 1])
    assert np.array_equal(array[..., 0], array[..., 2])


@pytest.mark.parametrize("fmt", ["WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    frames = [Image.new("RGB", (64, 64), colour) for colour in (RED, (0, 0, 255))]
    params: dict[str, Any] = {"save_all": True, "append_images": frames[1:], "duration": 100}
    if fmt == "WEBP":
        params["lossless"] = True
    data = encode(frames[0], fmt, **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 2
    assert close_to(decode(data)[56, 56], RED, 2)


# -- EXIF orientation --------------------------------------------------------------------

# For each Orientation value, how to store an upright picture so that a viewer that honours
# the tag shows it upright (the inverse of the transform the tag asks for).
STORE_FOR_ORIENTATION = {
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_90,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_270,
}


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
@pytest.mark.parametrize("orientation", sorted(STORE_FOR_ORIENTATION))
def test_exif_orientation_is_applied(fmt: str, orientation: int) -> None:
    upright = Image.new("RGB", (160, 120), WHITE)
    upright.paste(RED, (20, 0, 70, 50))  # a marker in the top-left of the centre square
    method = STORE_FOR_ORIENTATION[orientation]
    stored = upright if method is None else upright.transpose(method)
    exif = Image.Exif()
    exif[0x0112] = orientation
    array = decode(encode(stored, fmt, exif=exif))
    assert close_to(array[15, 15], RED, 40), "marker not top-left"
    assert close_to(array[15, 96], WHITE, 40)
    assert close_to(array[96, 15], WHITE, 40)


@pytest.mark.parametrize(
    "exif",
    [
        b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05garbage",
        b"Exif\x00\x00II*\x00\xff\xff\xff\xff",
        b"Exif\x00\x00",
        b"not exif at all",
    ],
)
# Pillow warns about the damage and carries on; the service ignores those warnings
# (category_suggester.preprocess filters them), pytest would turn them into errors.
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_broken_exif_is_ignored(exif: bytes) -> None:
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", exif=exif)
    assert close_to(decode(data)[50, 50], RED, 12)


def test_broken_exif_under_warnings_as_errors_is_undecodable_not_a_crash() -> None:
    exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05garbage"
    data = encode(Image.new("RGB", (64, 48), RED), "JPEG", exif=exif)
    assert refused(data) == "image_undecodable"


def test_unusual_orientation_values_are_ignored() -> None:
    exif = Image.Exif()
    exif[0x0112] = 9
    data = encode(Image.new("RGB", (64, 48), RED), "PNG", exif=exif)
    assert close_to(decode(data)[50, 50], RED, 0)


# -- resizing ----------------------------------------------------------------------------


def test_to_model_input_keeps_aspect_and_crops_the_centre() -> None:
    img = Image.new("RGB", (300, 100), RED)
    img.paste((0, 255, 0), (100, 0, 200, 100))
    out = to_model_input(img, 50)
    assert out.size == (50, 50)
    array = np.asarray(out)
    assert close_to(array[25, 2], (0, 255, 0), 40)
    assert close_to(array[25, 25], (0, 255, 0), 0)
    assert close_to(array[25, 47], (0, 255, 0), 40)


def test_large_jpeg_uses_a_reduced_decode() -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (1200, 1600, 3), dtype=np.uint8)
    data = encode(Image.fromarray(pixels), "JPEG")
    array = decode(data)
    # the reduced decode averages noise: the result is close to mid-grey everywhere
    assert abs(float(array.mean()) - 127) < 10
    assert float(array.std()) < 40


# -- refusals ----------------------------------------------------------------------------


@pytest.mark.timeout(10)
@pytest.mark.parametrize(
    ("width", "height"),
    [(30_000, 30_000), (10_000, 10_000), (7_000, 7_000), (40_000_001, 1)],
)
def test_pixel_bomb_is_refused_from_the_header(width: int, height: int) -> None:
    started = time.perf_counter()
    assert refused(png_with(width, height)) == "image_too_large"
    assert time.perf_counter() - started < 1.0


def test_pixel_limit_is_the_setting() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    assert refused(data, max_pixels=9_999) == "image_too_large"
    assert decode_image(data, size=SIZE, max_pixels=10_000).shape == (SIZE, SIZE, 3)


def test_png_and_webp_have_their_own_lower_limit_and_jpeg_keeps_the_higher_one() -> None:
    image = Image.new("RGB", (100, 100))
    for fmt in ("PNG", "WEBP"):
        with pytest.raises(ImageDecodeError) as caught:
            decode_image(
                encode(image, fmt), size=SIZE, max_pixels=10_000, max_pixels_lossless=9_999
            )
        assert caught.value.reason == "image_too_large"
    jpeg = encode(image, "JPEG")
    out = decode_image(jpeg, size=SIZE, max_pixels=10_000, max_pixels_lossless=9_999)
    assert out.shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize(
    "chunk",
    [
        png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"a" * (8 << 20))),
        png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (8 << 20))),
        png_chunk(b"iTXt", b"Comment\0\1\0\0\0" + zlib.compress(b"a" * (8 << 20))),
    ],
)
def test_png_metadata_inflating_past_the_limit_is_refused(chunk: bytes) -> None:
    assert len(chunk) < 64 * 1024  # small on the wire, 8 MiB inflated
    assert refused(png_with(16, 16, chunk)) == "image_too_large"


def test_png_text_chunks_are_bounded_in_total() -> None:
    chunks = [png_chunk(b"tEXt", b"k%d\0" % i + b"a" * (1 << 20)) for i in range(5)]
    assert refused(png_with(16, 16, *chunks)) == "image_too_large"


@pytest.mark.parametrize("fmt", ["GIF", "TIFF", "BMP", "ICO"])
def test_other_image_formats_are_refused(fmt: str) -> None:
    assert refused(encode(Image.new("RGB", (32, 32), RED), fmt)) == "format_refused"


def test_animated_gif_is_refused() -> None:
    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, WHITE)]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert refused(data) == "format_refused"


@pytest.mark.parametrize(
    "data",
    [
        b"8BPS\x00\x01" + b"\0" * 64,  # PSD
        b'<svg xmlns="http://www.w3.org/2000/svg"/>',
    ],
)
def test_psd_and_svg_are_refused(data: bytes) -> None:
    assert refused(data) == "format_refused"


def noisy(fmt: str) -> bytes:
    rng = np.random.default_rng(1)
    return encode(Image.fromarray(rng.integers(0, 255, (256, 256, 3), dtype=np.uint8)), fmt)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_images_are_undecodable(fmt: str) -> None:
    data = noisy(fmt)
    assert refused(data[: len(data) // 2]) == "image_undecodable"


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"<!doctype html><html></html>",
        b"\xff\xd8\xff" + bytes(range(256)) * 4,
        b"\x89PNG\r\n\x1a\n" + b"\0" * 64,
        b"RIFF\x10\x00\x00\x00WEBPVP8 garbage!",
    ],
)
def test_corrupt_bytes_are_undecodable(data: bytes) -> None:
    assert refused(data) == "image_undecodable"


def test_corrupt_pixel_data_in_valid_png_is_undecodable() -> None:
    data = png_with(64, 64)  # the IDAT stub holds far fewer bytes than 64x64 needs
    assert refused(data) == "image_undecodable"


# -- sniffing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("JPEG", "JPEG"), ("PNG", "PNG"), ("WEBP", "WEBP"), ("GIF", "GIF"), ("TIFF", "TIFF")],
)
def test_sniff_format(fmt: str, name: str) -> None:
    assert sniff_format(encode(Image.new("RGB", (8, 8)), fmt)[:32]) == name


def test_sniff_format_unknown() -> None:
    assert sniff_format(b"") is None
    assert sniff_format(b"RIFF\0\0\0\0AVI LIST") is None
    assert sniff_format(b"%PDF-1.7") is None


# -- the thread pool ---------------------------------------------------------------------


async def test_decoder_runs_on_threads_and_times_decodes() -> None:
    data = encode(Image.new("RGB", (320, 240), RED), "JPEG")
    with Decoder(DecodeSettings(threads=2)) as decoder:
        results = await asyncio.gather(*(decoder.decode(data, SIZE) for _ in range(4)))
        for array, seconds in results:
            assert array.shape == (SIZE, SIZE, 3)
            assert seconds > 0
        with pytest.raises(ImageDecodeError) as caught:
            await decoder.decode(b"not an image", SIZE)
        assert caught.value.reason == "image_undecodable"


async def test_decoder_uses_the_pixel_limit_from_settings() -> None:
    image = Image.new("RGB", (100, 100))
    settings = DecodeSettings(max_pixels=1_000, max_pixels_lossless=1_000)
    for fmt in ("JPEG", "PNG"):
        with Decoder(settings) as decoder, pytest.raises(ImageDecodeError) as caught:
            await decoder.decode(encode(image, fmt), SIZE)
        assert caught.value.reason == "image_too_large"


async def test_decoder_gives_each_caller_its_own_image() -> None:
    # Results come back to the loop in groups; each must still reach its own caller.
    shades = list(range(0, 256, 8))
    images = [
        encode(Image.new("RGB", (64, 48), (shade, 0, 255 - shade)), "PNG") for shade in shades
    ]
    with Decoder(DecodeSettings(threads=3)) as decoder:
        results = await asyncio.gather(*(decoder.decode(data, SIZE) for data in images))
    for shade, (array, _) in zip(shades, results, strict=True):
        assert tuple(array[SIZE // 2, SIZE // 2]) == (shade, 0, 255 - shade)


async def test_decoder_survives_a_caller_that_gave_up() -> None:
    data = encode(Image.new("RGB", (640, 480), RED), "PNG")
    with Decoder(DecodeSettings(threads=1)) as decoder:
        abandoned = [asyncio.ensure_future(decoder.decode(data, SIZE)) for _ in range(8)]
        await asyncio.sleep(0)  # let them queue
        for task in abandoned:
            task.cancel()
        await asyncio.gather(*abandoned, return_exceptions=True)
        array, _ = await decoder.decode(data, SIZE)
    assert tuple(array[0, 0]) == RED


async def test_decoder_close_cancels_queued_decodes() -> None:
    data = encode(Image.new("RGB", (1600, 1200), RED), "PNG")
    decoder = Decoder(DecodeSettings(threads=1))
    queued = [asyncio.ensure_future(decoder.decode(data, SIZE)) for _ in range(20)]
    await asyncio.sleep(0)
    decoder.close()
    outcomes = await asyncio.gather(*queued, return_exceptions=True)
    cancelled = [o for o in outcomes if isinstance(o, asyncio.CancelledError)]
    decoded = [o for o in outcomes if isinstance(o, tuple)]
    assert len(cancelled) + len(decoded) == len(queued)
    assert cancelled, "queued decodes should be dropped at close"
    with pytest.raises(RuntimeError, match="closed"):
        await decoder.decode(data, SIZE)
