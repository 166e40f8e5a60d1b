"""Prepare: raw labelled photos -> clean, deduplicated images and a stratified split.

Takes a source folder with one sub-folder per category (the folder name is the label),
holding either image files or a `data.csv` of image URLs. URLs are downloaded in parallel,
with retries, into `<out>/downloads/<category>/`; files already there are kept, so a rerun
resumes where the last one stopped. Every image is decoded, EXIF-rotated, converted to
RGB, shrunk so its shorter side is at most `stored_size` and written as JPEG under
`<out>/images/<category>/`. Writes `<out>/manifest.csv` (path, label, split, sha256,
source), `<out>/labels.txt` and `<out>/prepare_report.json`; returns a `PrepareReport`.

Dropped, each with its reason in the report:
- `download_failed`: the URL did not deliver (after retries where retrying can help);
- `undecodable`: not an image, truncated, or more pixels than `max_pixels`;
- `duplicate`: the same photo as one already kept in the same category (the first source
  in sorted order is kept);
- `cross_category_duplicate`: the same photo appears in two or more categories; every copy
  is dropped, since nothing says which label is right.
A photo is identified by the SHA-256 of its decoded pixels, so the same photo saved with
other metadata or under another name is still a duplicate.

The split is stratified and seeded: within each category the images are ordered by hash,
shuffled by a generator seeded with (seed, category) and the first `val_fraction` of them
go to validation, so the split depends only on the images and the seed.

Raises `DataError` when the source has fewer than two categories, a `data.csv` has no URL
column, or a category keeps fewer than two images.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import random
import struct
import time
import uuid
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

import httpx
from PIL import Image, ImageOps
from tqdm import tqdm

from training.data import Sample, write_manifest
from training.errors import DataError
from training.model import format_labels

log = logging.getLogger(__name__)

URL_LIST_NAME: Final = "data.csv"
REPORT_NAME: Final = "prepare_report.json"
URL_COLUMNS: Final = ("url", "image_url", "image", "img_url", "link", "src")
DROP_REASONS: Final = (
    "download_failed",
    "undecodable",
    "duplicate",
    "cross_category_duplicate",
)
# Statuses worth another try: the origin is overloaded or briefly unwell.
_RETRY_STATUSES: Final = frozenset({408, 425, 429, 500, 502, 503, 504})
# What Pillow raises for bytes that are not a (complete) image it can decode.
_DECODE_ERRORS: Final = (
    OSError,
    ValueError,
    SyntaxError,
    EOFError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
    # Raised, not printed, once category_suggester.preprocess has made it an error process-wide.
    Image.DecompressionBombWarning,
)


@dataclass(frozen=True)
class DownloadPolicy:
    """How URLs are fetched: parallelism, attempts with exponential backoff, limits."""

    workers: int = 16
    attempts: int = 3
    backoff_s: float = 0.5
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 20.0
    max_bytes: int = 25 * 1024 * 1024


@dataclass(frozen=True)
class Dropped:
    """One input that is not in the manifest, and why."""

    category: str
    source: str
    reason: str
    detail: str


@dataclass
class PrepareReport:
    """What prepare kept (per class and split) and what it dropped."""

    labels: list[str]
    counts: dict[str, dict[str, int]]
    dropped: list[Dropped] = field(default_factory=list)
    stored_size: int = 256
    val_fraction: float = 0.3
    seed: int = 0

    def dropped_by_reason(self) -> dict[str, int]:
        counted = Counter(item.reason for item in self.dropped)
        return {reason: counted.get(reason, 0) for reason in DROP_REASONS}

    def to_dict(self) -> dict[str, Any]:
        return {
            "labels": self.labels,
            "counts": self.counts,
            "kept": sum(sum(split.values()) for split in self.counts.values()),
            "dropped_by_reason": self.dropped_by_reason(),
            "dropped": [asdict(item) for item in self.dropped],
            "stored_size": self.stored_size,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
        }

    def summary(self) -> str:
        """A plain-text table of kept images per class and split, then drops by reason."""
        width = max([len("class"), *(len(label) for label in self.labels)])
        lines = [f"{'class':<{width}}  {'train':>7}  {'val':>7}  {'total':>7}"]
        for label in self.labels:
            train, val = self.counts[label]["train"], self.counts[label]["val"]
            lines.append(f"{label:<{width}}  {train:>7}  {val:>7}  {train + val:>7}")
        train_all = sum(c["train"] for c in self.counts.values())
        val_all = sum(c["val"] for c in self.counts.values())
        lines.append(f"{'all':<{width}}  {train_all:>7}  {val_all:>7}  {train_all + val_all:>7}")
        lines.append(
            "dropped: " + ", ".join(f"{k}={v}" for k, v in self.dropped_by_reason().items())
        )
        return "\n".join(lines)


@dataclass(frozen=True)
class _Item:
    category: str
    source: str  # the path relative to the source folder, or the URL
    file: Path | None  # None until a URL is downloaded (or when it could not be)


@dataclass(frozen=True)
class _Decoded:
    item: _Item
    sha256: str
    stored: Path


_T = TypeVar("_T")
_R = TypeVar("_R")


def prepare(
    source: Path,
    out: Path,
    *,
    stored_size: int = 256,
    val_fraction: float = 0.3,
    seed: int = 0,
    workers: int = 8,
    download: DownloadPolicy | None = None,
    client: httpx.Client | None = None,
    max_pixels: int = 40_000_000,
    progress: bool = True,
) -> PrepareReport:
    """Run the whole preparation (see the module docstring) and return its report.

    `client` serves the downloads (one is made from `download` when not given);
    `workers` decode in parallel threads (Pillow releases the GIL while decoding).
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"val_fraction must be between 0 and 1, got {val_fraction}")
    if stored_size < 16:
        raise DataError(f"stored_size must be at least 16 px, got {stored_size}")
    policy = download or DownloadPolicy()
    if out.resolve().is_relative_to(source.resolve()):
        raise DataError(f"the output folder {out} must not be inside the source {source}")
    categories = _categories(source)
    items, dropped = _collect(source, out, categories, policy, client, progress)

    decoded: list[_Decoded] = []
    for result in _parallel(
        lambda item: _decode_and_store(item, out, stored_size, max_pixels),
        items,
        workers=workers,
        desc="decode",
        progress=progress,
    ):
        if isinstance(result, Dropped):
            dropped.append(result)
        else:
            decoded.append(result)

    kept, dup_drops = _deduplicate(decoded)
    dropped.extend(dup_drops)
    dropped.sort(key=lambda d: (d.reason, d.category, d.source))

    label_index = {name: i for i, name in enumerate(categories)}
    by_class: dict[str, list[_Decoded]] = defaultdict(list)
    for entry in kept:
        by_class[entry.item.category].append(entry)
    too_few = [name for name in categories if len(by_class[name]) < 2]
    if too_few:
        raise DataError(
            "every category needs at least two usable images for a train/val split; "
            f"too few in: {', '.join(too_few)} (see the drops: "
            f"{Counter(d.reason for d in dropped)})"
        )

    samples: list[Sample] = []
    counts: dict[str, dict[str, int]] = {}
    for name in categories:
        entries = sorted(by_class[name], key=lambda e: e.sha256)
        rng = random.Random(f"{seed}/{name}")  # noqa: S311  (a reproducible split, not a secret)
        rng.shuffle(entries)
        n_val = min(max(round(len(entries) * val_fraction), 1), len(entries) - 1)
        counts[name] = {"train": len(entries) - n_val, "val": n_val}
        for position, entry in enumerate(entries):
            samples.append(
                Sample(
                    path=entry.stored,
                    label=label_index[name],
                    split="val" if position < n_val else "train",
                    sha256=entry.sha256,
                    source=entry.item.source,
                )
            )
    samples.sort(key=lambda s: (s.label, s.split, s.sha256))
    write_manifest(out, categories, samples)

    report = PrepareReport(
        labels=categories,
        counts=counts,
        dropped=dropped,
        stored_size=stored_size,
        val_fraction=val_fraction,
        seed=seed,
    )
    (out / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return report


def _categories(source: Path) -> list[str]:
    if not source.is_dir():
        raise DataError(f"source {source} is not a folder")
    names = sorted(p.name for p in source.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(names) < 2:
        raise DataError(
            f"{source} must hold one sub-folder per category (at least two); found {names}"
        )
    try:
        format_labels(names)
    except ValueError as exc:
        raise DataError(f"{source}: a category folder name cannot be a label: {exc}") from exc
    return names


def _collect(
    source: Path,
    out: Path,
    categories: Sequence[str],
    policy: DownloadPolicy,
    client: httpx.Client | None,
    progress: bool,
) -> tuple[list[_Item], list[Dropped]]:
    """Every input of every category, with URL lists downloaded first."""
    local: list[_Item] = []
    remote: list[tuple[_Item, Path]] = []
    for name in categories:
        folder = source / name
        url_list = folder / URL_LIST_NAME
        if url_list.is_file():
            for url in read_url_list(url_list):
                digest = hashlib.sha1(url.encode()).hexdigest()[:24]  # noqa: S324  (a file name)
                remote.append(
                    (_Item(name, url, None), out / "downloads" / name / digest),
                )
        for path in sorted(folder.rglob("*")):
            if path == url_list or not path.is_file() or _hidden(path.relative_to(folder)):
                continue
            local.append(_Item(name, path.relative_to(source).as_posix(), path))

    dropped: list[Dropped] = []
    if not remote:
        return local, dropped
    own_client = client is None
    http = client or httpx.Client(
        follow_redirects=True,
        timeout=httpx.Timeout(policy.read_timeout_s, connect=policy.connect_timeout_s),
        limits=httpx.Limits(max_connections=policy.workers),
    )
    try:
        results = _parallel(
            lambda job: _download(http, job[0].source, job[1], policy),
            remote,
            workers=policy.workers,
            desc="download",
            progress=progress,
        )
    finally:
        if own_client:
            http.close()
    fetched = 0
    for (item, dest), error in zip(remote, results, strict=True):
        if error is None:
            local.append(_Item(item.category, item.source, dest))
            fetched += 1
        else:
            dropped.append(Dropped(item.category, item.source, "download_failed", error))
    log.info("downloads: %d of %d URLs available in %s", fetched, len(remote), out / "downloads")
    return local, dropped


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def read_url_list(path: Path) -> list[str]:
    """The image URLs of a category's `data.csv`.

    With a header, the column named url, image_url, image, img_url, link or src (any case)
    is used, or else the first column whose first value is an http(s) URL; without a header
    (the first row already holds a URL), the first column holding a URL. Blank cells are
    skipped. Raises DataError if no column holds URLs.
    """
    with path.open(newline="", encoding="utf-8-sig") as handle:
        rows = [row for row in csv.reader(handle) if any(cell.strip() for cell in row)]
    if not rows:
        return []
    first = [cell.strip() for cell in rows[0]]
    column = next((i for i, cell in enumerate(first) if _is_url(cell)), None)
    body = rows
    if column is None:  # a header row
        body = rows[1:]
        lowered = [cell.lower() for cell in first]
        column = next((lowered.index(name) for name in URL_COLUMNS if name in lowered), None)
        if column is None and body:
            column = next(
                (i for i, cell in enumerate(body[0]) if _is_url(cell.strip())),
                None,
            )
        if column is None:
            raise DataError(
                f"{path}: no URL column (name one of {', '.join(URL_COLUMNS)}, "
                "or put http(s) URLs in a column)"
            )
    return [row[column].strip() for row in body if len(row) > column and row[column].strip()]


def _is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def _download(client: httpx.Client, url: str, dest: Path, policy: DownloadPolicy) -> str | None:
    """Fetch `url` into `dest` unless it is already there; None on success, else why not."""
    if dest.is_file():
        return None
    if not _is_url(url):
        return "not an http(s) URL"
    dest.parent.mkdir(parents=True, exist_ok=True)
    partial = dest.with_name(f"{dest.name}.{uuid.uuid4().hex}.part")
    error = "no attempt made"
    for attempt in range(policy.attempts):
        if attempt:
            time.sleep(policy.backoff_s * 2 ** (attempt - 1))
        try:
            with client.stream("GET", url) as response:
                if response.status_code != 200:
                    error = f"HTTP {response.status_code}"
                    if response.status_code in _RETRY_STATUSES:
                        continue
                    return error
                size = 0
                with partial.open("wb") as handle:
                    for chunk in response.iter_bytes():
                        size += len(chunk)
                        if size > policy.max_bytes:
                            break
                        handle.write(chunk)
                if size > policy.max_bytes:
                    partial.unlink(missing_ok=True)
                    return f"larger than {policy.max_bytes} bytes"
            # Renamed only when complete: an interrupted run never leaves a half file
            # under the final name, which a resumed run would otherwise trust.
            partial.replace(dest)
            return None
        except httpx.TransportError as exc:
            partial.unlink(missing_ok=True)
            error = f"{type(exc).__name__}: {exc}"
        except (httpx.RequestError, httpx.InvalidURL) as exc:
            # Not transient: too many redirects, an undecodable body, a malformed URL.
            partial.unlink(missing_ok=True)
            return f"{type(exc).__name__}: {exc}"
    return f"{error} (after {policy.attempts} attempts)"


def _decode_and_store(
    item: _Item, out: Path, stored_size: int, max_pixels: int
) -> _Decoded | Dropped:
    assert item.file is not None
    try:
        with Image.open(item.file) as opened:
            if opened.width * opened.height > max_pixels:
                return Dropped(
                    item.category,
                    item.source,
                    "undecodable",
                    f"{opened.width}x{opened.height} is over {max_pixels} pixels",
                )
            img = _to_rgb(ImageOps.exif_transpose(opened))
    except _DECODE_ERRORS as exc:
        return Dropped(item.category, item.source, "undecodable", f"{type(exc).__name__}: {exc}")
    digest = hashlib.sha256()
    digest.update(f"{img.width}x{img.height}:".encode())
    digest.update(img.tobytes())
    sha = digest.hexdigest()
    shorter = min(img.size)
    if shorter > stored_size:
        scale = stored_size / shorter
        size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    stored = out / "images" / item.category / f"{sha[:32]}.jpg"
    stored.parent.mkdir(parents=True, exist_ok=True)
    # Two copies of one photo in a category decode in parallel to the same name: write
    # to a private file and rename, so neither reader nor writer sees a half file.
    partial = stored.with_name(f"{stored.name}.{uuid.uuid4().hex}.part")
    img.save(partial, format="JPEG", quality=95)
    partial.replace(stored)
    return _Decoded(item, sha, stored)


def _to_rgb(img: Image.Image) -> Image.Image:
    # Transparent areas become white, as the service composites them.
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _deduplicate(decoded: Iterable[_Decoded]) -> tuple[list[_Decoded], list[Dropped]]:
    by_hash: dict[str, list[_Decoded]] = defaultdict(list)
    for entry in decoded:
        by_hash[entry.sha256].append(entry)
    kept: list[_Decoded] = []
    dropped: list[Dropped] = []
    for copies in by_hash.values():
        copies.sort(key=lambda e: (e.item.category, e.item.source))
        categories = sorted({c.item.category for c in copies})
        if len(categories) > 1:
            for copy in copies:
                others = [name for name in categories if name != copy.item.category]
                dropped.append(
                    Dropped(
                        copy.item.category,
                        copy.item.source,
                        "cross_category_duplicate",
                        f"same photo also in: {', '.join(others)} (sha256 {copy.sha256[:16]})",
                    )
                )
            # Each category's copy was written under the same name; none may stay behind
            # to be mistaken for a kept image.
            for copy in copies:
                copy.stored.unlink(missing_ok=True)
            continue
        first, *rest = copies
        kept.append(first)
        dropped.extend(
            Dropped(
                copy.item.category,
                copy.item.source,
                "duplicate",
                f"same photo as {first.item.source}",
            )
            for copy in rest
        )
    return kept, dropped


def _parallel(
    work: Callable[[_T], _R],
    items: Sequence[_T],
    *,
    workers: int,
    desc: str,
    progress: bool,
) -> list[_R]:
    """`work` over `items` in a thread pool, results in input order, with a progress bar."""
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(items), desc=desc, unit="img", disable=not progress) as bar,
    ):
        futures = [pool.submit(work, item) for item in items]
        for future in futures:
            future.add_done_callback(lambda _: bar.update(1))
        return [future.result() for future in futures]
