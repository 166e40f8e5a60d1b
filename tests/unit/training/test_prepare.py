"""prepare on folders of files and on URL lists served by a local HTTP server."""

from __future__ import annotations

import io
import json
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from tests.support.images import photo
from training.data import read_manifest
from training.errors import DataError
from training.prepare import DownloadPolicy, prepare, read_url_list
from training.synthetic import generate

FAST_RETRIES = DownloadPolicy(workers=4, attempts=3, backoff_s=0.01)


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def _same_pixels_as_png(jpeg: bytes) -> bytes:
    out = io.BytesIO()
    Image.open(io.BytesIO(jpeg)).save(out, format="PNG")
    return out.getvalue()


def _rotated_jpeg(seed: int) -> bytes:
    """A 640x480 photo whose EXIF says: turn me 90 degrees to view (orientation 6)."""
    img = Image.open(io.BytesIO(photo(seed)))
    exif = Image.Exif()
    exif[0x0112] = 6
    out = io.BytesIO()
    img.save(out, format="JPEG", exif=exif.tobytes())
    return out.getvalue()


@pytest.fixture
def messy_source(tmp_path: Path) -> Path:
    source = tmp_path / "source"
    shared = photo(100)
    books = [photo(1), photo(2), photo(3)]
    for i, data in enumerate(books):
        _write(source / "books" / f"b{i}.jpg", data)
    _write(source / "books" / "copy_of_b0.jpg", books[0])  # the same bytes
    _write(source / "books" / "nested" / "b1.png", _same_pixels_as_png(books[1]))  # same pixels
    _write(source / "books" / "shared.jpg", shared)
    _write(source / "books" / "corrupt.jpg", b"\xff\xd8\xff\xe0 this is not a jpeg")
    _write(source / "books" / "truncated.jpg", photo(4)[:2000])
    _write(source / "books" / "notes.txt", b"bought in 2019")
    _write(source / "books" / ".DS_Store", b"\x00\x01")
    _write(source / "car" / "c0.jpg", photo(10))
    _write(source / "car" / "c1.jpg", _rotated_jpeg(11))
    _write(source / "car" / "c2.png", photo(12, fmt="PNG", mode="RGBA"))
    _write(source / "car" / "also_shared.jpg", shared)
    return source


def test_prepare_drops_and_reports_corrupt_files_and_duplicates(
    messy_source: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    report = prepare(messy_source, out, stored_size=96, progress=False)

    by_reason = Counter((d.reason, d.category, Path(d.source).name) for d in report.dropped)
    assert set(by_reason) == {
        ("undecodable", "books", "corrupt.jpg"),
        ("undecodable", "books", "truncated.jpg"),
        ("undecodable", "books", "notes.txt"),
        ("duplicate", "books", "copy_of_b0.jpg"),
        ("duplicate", "books", "b1.png"),
        ("cross_category_duplicate", "books", "shared.jpg"),
        ("cross_category_duplicate", "car", "also_shared.jpg"),
    }
    assert report.dropped_by_reason() == {
        "download_failed": 0,
        "undecodable": 3,
        "duplicate": 2,
        "cross_category_duplicate": 2,
    }
    shared = next(d for d in report.dropped if d.source.endswith("shared.jpg"))
    assert "also in: car" in shared.detail
    duplicate = next(d for d in report.dropped if d.source.endswith("copy_of_b0.jpg"))
    assert "books/b0.jpg" in duplicate.detail
    assert report.counts == {"books": {"train": 2, "val": 1}, "car": {"train": 2, "val": 1}}

    manifest = read_manifest(out)
    assert manifest.labels == ("books", "car")
    kept = sorted(s.source for s in manifest.samples)
    assert kept == ["books/b0.jpg", "books/b1.jpg", "books/b2.jpg", "car/c0.jpg", "car/c1.jpg",
                    "car/c2.png"]  # fmt: skip
    stored = {}
    for sample in manifest.samples:
        with Image.open(sample.path) as img:
            stored[sample.source] = (img.format, img.mode, img.size)
    assert {(fmt, mode) for fmt, mode, _ in stored.values()} == {("JPEG", "RGB")}
    assert stored["books/b0.jpg"][2] == (128, 96)  # 640x480, shorter side to 96
    assert stored["car/c1.jpg"][2] == (96, 128)  # EXIF rotation applied before storing
    # A photo in two categories is trained on in neither, and no file of it stays behind.
    images = sorted(p.name for p in (out / "images").rglob("*.jpg"))
    assert len(images) == 6

    saved = json.loads((out / "prepare_report.json").read_text())
    assert saved["kept"] == 6
    assert saved["dropped_by_reason"]["cross_category_duplicate"] == 2
    assert len(saved["dropped"]) == 7
    assert "cross_category_duplicate=2" in report.summary()


def test_split_is_stratified_seeded_and_70_30(tmp_path: Path) -> None:
    source = generate(tmp_path / "raw", per_class=20, labels=["books", "car", "mobile"])
    first = prepare(source, tmp_path / "a", seed=5, progress=False)
    prepare(source, tmp_path / "b", seed=5, progress=False)
    other = prepare(source, tmp_path / "c", seed=6, progress=False)
    assert first.counts == {name: {"train": 14, "val": 6} for name in ("books", "car", "mobile")}

    def val_sources(out: Path) -> set[str]:
        return {s.source for s in read_manifest(out).split("val")}

    assert val_sources(tmp_path / "a") == val_sources(tmp_path / "b")
    assert val_sources(tmp_path / "a") != val_sources(tmp_path / "c")
    assert other.counts == first.counts


def test_prepare_refuses_what_cannot_be_split(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="must not be inside"):
        prepare(tmp_path, tmp_path / "prepared", progress=False)
    _write(tmp_path / "one" / "books" / "a.jpg", photo(1))
    with pytest.raises(DataError, match="at least two"):
        prepare(tmp_path / "one", tmp_path / "out", progress=False)
    _write(tmp_path / "two" / "books" / "a.jpg", photo(1))
    _write(tmp_path / "two" / "books" / "b.jpg", photo(2))
    _write(tmp_path / "two" / "car" / "a.jpg", photo(3))
    _write(tmp_path / "two" / "car" / "broken.jpg", b"nope")
    with pytest.raises(DataError, match="too few in: car"):
        prepare(tmp_path / "two", tmp_path / "out", progress=False)


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("url\nhttp://h/a.jpg\nhttp://h/b.jpg\n", ["http://h/a.jpg", "http://h/b.jpg"]),
        ("id,Image_URL,title\n1,https://h/a.jpg,x\n2,,y\n", ["https://h/a.jpg"]),
        ("http://h/a.jpg\nhttp://h/b.jpg\n", ["http://h/a.jpg", "http://h/b.jpg"]),
        ("id,picture\n1,http://h/a.jpg\n", ["http://h/a.jpg"]),
        ("\ufeffid,url\n\n1,http://h/a.jpg\n", ["http://h/a.jpg"]),
    ],
)
def test_read_url_list_finds_the_url_column(tmp_path: Path, text: str, urls: list[str]) -> None:
    path = tmp_path / "data.csv"
    path.write_text(text, encoding="utf-8")
    assert read_url_list(path) == urls


def test_read_url_list_without_urls_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "data.csv"
    path.write_text("id,title\n1,a chair\n")
    with pytest.raises(DataError, match="no URL column"):
        read_url_list(path)


@dataclass
class Origin:
    """Paths served by a loopback HTTP server, counting every request."""

    base: str
    files: dict[str, bytes]
    failures: dict[str, list[int]]  # statuses to answer before the file, per path
    redirects: dict[str, str] = field(default_factory=dict)
    requests: Counter[str] = field(default_factory=Counter)


@pytest.fixture
def origin() -> Iterator[Origin]:
    state = Origin(base="", files={}, failures={})
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            with lock:
                state.requests[self.path] += 1
                pending = state.failures.get(self.path)
                status = pending.pop(0) if pending else None
            if self.path in state.redirects:
                self.send_response(302)
                self.send_header("Location", state.redirects[self.path])
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            if status is None and self.path in state.files:
                body = state.files[self.path]
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_response(status or 404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.base = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()
    thread.join()


def test_url_lists_download_in_parallel_with_retries_and_resume(
    origin: Origin, tmp_path: Path
) -> None:
    shared = photo(50)
    origin.files.update(
        {
            "/books/1.jpg": photo(1),
            "/books/2.jpg": photo(2),
            "/books/flaky.jpg": photo(3),
            "/books/shared.jpg": shared,
            "/books/bad.jpg": b"<html>not found</html>",
            "/car/1.jpg": photo(11),
            "/car/2.jpg": photo(12),
            "/car/shared-again.jpg": shared,
        }
    )
    origin.failures["/books/flaky.jpg"] = [503]
    origin.failures["/car/2.jpg"] = [503, 502, 500]  # more failures than attempts
    origin.redirects["/books/loop.jpg"] = "/books/loop.jpg"
    source = tmp_path / "source"
    b = origin.base
    _write(
        source / "books" / "data.csv",
        (
            f"id,url\n1,{b}/books/1.jpg\n2,{b}/books/2.jpg\n3,{b}/books/flaky.jpg\n"
            f"4,{b}/books/missing.jpg\n5,{b}/books/shared.jpg\n6,{b}/books/bad.jpg\n"
            f"7,ftp://elsewhere/x.jpg\n8,{b}/books/loop.jpg\n"
        ).encode(),
    )
    _write(
        source / "car" / "data.csv",
        f"{b}/car/1.jpg\n{b}/car/2.jpg\n{b}/car/shared-again.jpg\n".encode(),
    )
    _write(source / "car" / "local.jpg", photo(13))  # files and a URL list may mix
    out = tmp_path / "out"

    report = prepare(source, out, download=FAST_RETRIES, progress=False)

    reasons = {(d.reason, d.source.rsplit("/", 1)[-1]): d.detail for d in report.dropped}
    assert reasons.keys() == {
        ("download_failed", "missing.jpg"),
        ("download_failed", "2.jpg"),
        ("download_failed", "x.jpg"),
        ("download_failed", "loop.jpg"),
        ("undecodable", "bad.jpg"),
        ("cross_category_duplicate", "shared.jpg"),
        ("cross_category_duplicate", "shared-again.jpg"),
    }
    assert reasons[("download_failed", "missing.jpg")] == "HTTP 404"
    assert reasons[("download_failed", "2.jpg")] == "HTTP 500 (after 3 attempts)"
    assert reasons[("download_failed", "loop.jpg")].startswith("TooManyRedirects")
    assert origin.requests["/books/flaky.jpg"] == 2  # a 503, then the photo
    assert origin.requests["/books/missing.jpg"] == 1  # a 404 is not retried
    assert origin.requests["/car/2.jpg"] == 3
    assert report.counts == {"books": {"train": 2, "val": 1}, "car": {"train": 1, "val": 1}}
    assert {s.source for s in read_manifest(out).samples} >= {f"{b}/books/flaky.jpg"}
    assert not list((out / "downloads").rglob("*.part"))

    # A rerun fetches only what is still missing; what was fetched is kept.
    origin.requests.clear()
    origin.files["/books/missing.jpg"] = photo(4)
    rerun = prepare(source, out, download=FAST_RETRIES, progress=False)
    assert set(origin.requests) == {"/books/missing.jpg", "/car/2.jpg", "/books/loop.jpg"}
    assert rerun.counts["books"] == {"train": 3, "val": 1}
    assert rerun.counts["car"] == {"train": 2, "val": 1}
