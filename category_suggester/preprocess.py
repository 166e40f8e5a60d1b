"""Decode and resize step: image bytes in, the model's input array out.

Takes the bytes of a fetched image (JPEG, PNG or WebP) and returns a `uint8` array of shape
`[S, S, 3]`, RGB, as the model contract in DESIGN.md asks. The steps, in order:

1. open with Pillow restricted to JPEG, PNG and WebP (only the header is read);
2. refuse images with more than `max_pixels` pixels (`max_pixels_lossless` for PNG and
   WebP, which are decoded at full size) before any pixel is decoded;
3. JPEG only: ask libjpeg for a DCT-scaled decode no smaller than S x S (`draft`);
4. decode the first frame (animations keep their first frame);
5. apply the EXIF orientation (a broken EXIF block is ignored, not fatal);
6. convert any mode to RGB (transparency is composited on white, 16-bit is scaled to 8);
7. `to_model_input`: scale the shorter side to S and centre-crop the longer side.

Raises `ImageDecodeError` with `reason`:

- `format_refused`: a known image format that is not accepted (GIF, TIFF, BMP, PSD, SVG...);
- `image_too_large`: more pixels than allowed (a decompression bomb), or PNG metadata
  chunks that would inflate past the limits set below;
- `image_undecodable`: anything else Pillow cannot read: unknown bytes, truncated or
  corrupt data.

`decode_image` is pure and thread-safe; `Decoder` runs it on threads of its own (Pillow
releases the GIL while decoding and resampling). Training calls `decode_image` too, so the
model sees the same pixels in training and in serving.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import queue
import struct
import threading
import time
import warnings
import zlib
from dataclasses import dataclass
from types import TracebackType

import numpy as np
import numpy.typing as npt

# The three plugins are imported (and so registered) here, so Image.open never falls back
# to importing every Pillow plugin, and only these three parsers ever see untrusted bytes.
from PIL import Image, JpegImagePlugin, PngImagePlugin, UnidentifiedImageError, WebPImagePlugin

from category_suggester.errors import ImageDecodeError
from category_suggester.settings import DecodeSettings
from category_suggester.threads import NamedThread

__all__ = [
    "ACCEPTED_FORMATS",
    "Decoder",
    "decode_image",
    "sniff_format",
    "to_model_input",
]

ACCEPTED_FORMATS: tuple[str, ...] = (
    JpegImagePlugin.JpegImageFile.format,
    PngImagePlugin.PngImageFile.format,
    WebPImagePlugin.WebPImageFile.format,
)

# PNG text, zTXt, iTXt and iCCP chunks are inflated while the header is read, before our
# pixel limit can help. Pillow's defaults allow 1 MiB per chunk and 64 MiB per image; an
# image we classify needs none of that metadata, so cap the total at 4 MiB per image
# (one ICC profile or one text chunk may still take 1 MiB). Larger metadata is refused.
# These are process-wide module globals of Pillow, set once here on purpose.
PngImagePlugin.MAX_TEXT_CHUNK = 1024 * 1024
PngImagePlugin.MAX_TEXT_MEMORY = 4 * 1024 * 1024

# Pillow warns (rather than raises) for images between MAX_IMAGE_PIXELS and twice that.
# Our own `max_pixels` check refuses them right after, but the warning would be printed
# first (and is an exception under pytest's warnings-as-errors), so make it an exception
# everywhere and turn it into ImageDecodeError below. Process-wide, set once on purpose.
warnings.filterwarnings("error", category=Image.DecompressionBombWarning)
# Pillow reports some damage it recovers from (a corrupt EXIF block, an invalid APNG
# animation chunk) as UserWarnings and carries on. Untrusted photos are often like that;
# the outcome (pixels or ImageDecodeError) is what counts, so keep them out of the logs.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_FOR_ORIENTATION: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# What Pillow raises on malformed input: UnidentifiedImageError and "image file is
# truncated" are OSErrors; broken PNG chunks raise SyntaxError or ValueError; short
# reads raise EOFError or struct.error; corrupt deflate streams raise zlib.error. Where
# the process runs with warnings as errors, recovered damage raises UserWarning instead.
_PILLOW_INPUT_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    zlib.error,
    UserWarning,
)

_WHITE = (255, 255, 255)
# 16-bit value -> 8-bit value, scaled and rounded: round(v * 255 / 65535).
_SIXTEEN_TO_EIGHT_BITS = ((np.arange(65536, dtype=np.uint32) * 255 + 32767) // 65535).astype(
    np.uint8
)


def sniff_format(head: bytes) -> str | None:
    """Name the image format from the first bytes (magic numbers), or None if unknown.

    Returns one of `ACCEPTED_FORMATS` ("JPEG", "PNG", "WEBP") or the name of a known
    format that is refused ("GIF", "TIFF", "BMP", "PSD", "EPS", "SVG", "ICO", "AVIF",
    "HEIF", "JPEG2000", "JPEGXL"). 32 bytes are enough; SVG is recognised within the first
    1 KiB.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if head[:4] == b"8BPS":
        return "PSD"
    if head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6")):
        # PostScript (EPS) as text, or in the binary DOS EPS wrapper.
        return "EPS"
    if head[:4] in (b"\x00\x00\x01\x00", b"\x00\x00\x02\x00"):
        return "ICO"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "AVIF"
        if brand in (b"heic", b"heix", b"hevc", b"hevx", b"mif1", b"msf1"):
            return "HEIF"
    if head.startswith((b"\x00\x00\x00\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51")):
        return "JPEG2000"
    if head.startswith((b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")):
        return "JPEGXL"
    text = head[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith(b"<svg") or (text.startswith(b"<?xml") and b"<svg" in text):
        return "SVG"
    return None


def to_model_input(img: Image.Image, size: int) -> Image.Image:
    """Resize an RGB image to `size` x `size`: the shorter side to `size`, centre crop.

    This is the model contract's "resize to S x S", shared by training and serving. It
    keeps the aspect ratio (a squashed sofa looks like another class); the longer side
    loses equal margins. One resampling pass over the centred square (a fractional box, so
    the crop is exactly centred), bilinear with Pillow's antialiasing; `reducing_gap`
    first shrinks large images by an integer factor with a box filter, which is much
    faster and indistinguishable at these sizes.
    """
    width, height = img.size
    side = min(width, height)
    left = (width - side) / 2
    top = (height - side) / 2
    return img.resize(
        (size, size),
        Image.Resampling.BILINEAR,
        box=(left, top, left + side, top + side),
        reducing_gap=3.0,
    )


def decode_image(
    data: bytes, *, size: int, max_pixels: int, max_pixels_lossless: int | None = None
) -> npt.NDArray[np.uint8]:
    """Decode `data` (JPEG, PNG or WebP) into a `uint8` `[size, size, 3]` RGB array.

    Pure and thread-safe. Raises `ImageDecodeError` (see the module docstring).
    """
    if size <= 0:
        raise ValueError("size must be positive")
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as img:
            width, height = img.size
            is_jpeg = isinstance(img, JpegImagePlugin.JpegImageFile)
            limit = max_pixels if is_jpeg or max_pixels_lossless is None else max_pixels_lossless
            if width * height > limit:
                raise ImageDecodeError(
                    f"{img.format} image is {width}x{height} pixels, over the limit of {limit}",
                    reason="image_too_large",
                )
            if is_jpeg:
                img.draft("RGB", (size, size))
            # Image.open left the first frame current; load decodes only that one.
            img.load()
            upright = _apply_orientation(img)
            rgb = _to_rgb(upright)
            out = to_model_input(rgb, size)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageDecodeError(str(exc), reason="image_too_large") from exc
    except UnidentifiedImageError as exc:
        fmt = sniff_format(data[:1024])
        if fmt is not None and fmt not in ACCEPTED_FORMATS:
            raise ImageDecodeError(f"{fmt} images are refused", reason="format_refused") from exc
        raise ImageDecodeError("not a JPEG, PNG or WebP image", reason="image_undecodable") from exc
    except ValueError as exc:
        if "MAX_TEXT" in str(exc):
            # Pillow's only signal for the PNG metadata limits set above is this message.
            raise ImageDecodeError(
                "PNG metadata chunks exceed the limit", reason="image_too_large"
            ) from exc
        raise ImageDecodeError(f"corrupt image: {exc}", reason="image_undecodable") from exc
    except _PILLOW_INPUT_ERRORS as exc:
        raise ImageDecodeError(f"corrupt image: {exc}", reason="image_undecodable") from exc
    array = np.asarray(out, dtype=np.uint8)
    if array.shape != (size, size, 3):
        raise ImageDecodeError(f"unexpected decoded shape {array.shape}")
    return array


def _apply_orientation(img: Image.Image) -> Image.Image:
    """Return the image turned upright per its EXIF Orientation tag (1 to 8)."""
    try:
        orientation = img.getexif().get(_ORIENTATION_TAG, 1)
    except (*_PILLOW_INPUT_ERRORS, KeyError, IndexError, TypeError):
        # A broken EXIF block says nothing trustworthy about orientation; the pixels are
        # still fine, so keep them as stored.
        return img
    method = _TRANSPOSE_FOR_ORIENTATION.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB; transparent areas become white."""
    mode = img.mode
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grayscale (PNG). Pillow's own conversion to L clips at 255 instead of
        # scaling, so scale 0..65535 to 0..255 (rounded) here, with one table lookup per
        # pixel: at 40 MP, arithmetic on wide temporaries took seconds and half a GB.
        wide = np.asarray(img)
        if wide.dtype.itemsize > 2:  # mode I: 32-bit signed
            wide = np.clip(wide, 0, 65535).astype(np.uint16)
        img = Image.fromarray(_SIXTEEN_TO_EIGHT_BITS[wide])
        mode = "L"
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    # 1, L, P (no transparency), CMYK (Pillow reads Adobe's inverted CMYK correctly), YCbCr.
    return img.convert("RGB")


@dataclass(frozen=True, slots=True)
class _DecodeJob:
    future: asyncio.Future[npt.NDArray[np.uint8]]
    data: bytes
    size: int


class Decoder:
    """Runs `decode_image` on `settings.threads` threads of its own.

    `decode` returns the array and the seconds from submission to result (so it includes
    any wait for a free thread: the stage's latency as the pipeline sees it).

    Results reach the event loop in groups: a thread that finishes an image while earlier
    results still wait for the loop adds its result to them instead of waking the loop
    again. At hundreds of images a second a wake-up per image (what `run_in_executor`
    does, with a concurrent future and a callback chain per call) cost more CPU than
    decoding a small image.
    """

    def __init__(self, settings: DecodeSettings) -> None:
        self._max_pixels = settings.max_pixels
        self._max_pixels_lossless = settings.max_pixels_lossless
        self._jobs: queue.SimpleQueue[_DecodeJob | None] = queue.SimpleQueue()
        self._finished: list[tuple[_DecodeJob, npt.NDArray[np.uint8] | None, Exception | None]]
        self._finished = []
        self._finished_lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._threads = [
            NamedThread(target=self._work, name=f"decode_{index}", daemon=True)
            for index in range(settings.threads)
        ]
        for thread in self._threads:
            thread.start()

    async def decode(self, data: bytes, size: int) -> tuple[npt.NDArray[np.uint8], float]:
        """Decode on the threads; raises `ImageDecodeError` like `decode_image`."""
        if self._closed:
            raise RuntimeError("the Decoder is closed")
        loop = asyncio.get_running_loop()
        if self._loop is None:
            self._loop = loop
        started = time.perf_counter()
        future: asyncio.Future[npt.NDArray[np.uint8]] = loop.create_future()
        self._jobs.put(_DecodeJob(future, data, size))
        array = await future
        return array, time.perf_counter() - started

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job.future.cancelled():  # its caller gave up while it was queued
                continue
            try:
                array = decode_image(
                    job.data,
                    size=job.size,
                    max_pixels=self._max_pixels,
                    max_pixels_lossless=self._max_pixels_lossless,
                )
            except Exception as exc:  # noqa: BLE001  (handed to the caller's future)
                self._finish(job, None, exc)
            else:
                self._finish(job, array, None)
            del job

    def _finish(
        self, job: _DecodeJob, array: npt.NDArray[np.uint8] | None, error: Exception | None
    ) -> None:
        with self._finished_lock:
            wake = not self._finished
            self._finished.append((job, array, error))
        if wake and self._loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
                self._loop.call_soon_threadsafe(self._settle)

    def _settle(self) -> None:
        with self._finished_lock:
            finished, self._finished = self._finished, []
        for job, array, error in finished:
            if job.future.done():
                continue
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(array)  # type: ignore[arg-type]

    def close(self) -> None:
        """Wait for running decodes; queued ones are dropped (their callers cancelled)."""
        if self._closed:
            return
        self._closed = True
        dropped: list[_DecodeJob] = []
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if job is not None:
                    dropped.append(job)
        for _ in self._threads:
            self._jobs.put(None)
        for thread in self._threads:
            thread.join()
        loop = self._loop
        if dropped and loop is not None and not loop.is_closed():
            for job in dropped:
                loop.call_soon_threadsafe(job.future.cancel)

    def __enter__(self) -> Decoder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
