"""The try-a-photo page in a real browser over the real stack.

Debian's Chromium, driven by Selenium through chromedriver, opens the page that
`python -m category_suggester web` serves; the service (`python -m category_suggester run`) runs
on the test's Kafka topics and Triton. Every answer the page shows is compared with what the service
published, read from the topics here independently; refusals (not an image, a pixel bomb,
too large, a private address) and a timeout show their reasons. The run saves the
screenshot the README shows (docs/web-page.png).
"""

from __future__ import annotations

import base64
import io
import math
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.ui import WebDriverWait

from category_suggester.events import CategorySuggestion, EventCodec, parse_dlq_headers
from category_suggester.settings import Settings, TritonSettings, WebSettings
from category_suggester.web import PipelineProbe
from devstack.kafka import KafkaBroker
from devstack.process import free_port
from devstack.triton import TritonServer
from tests.conftest import REPO_ROOT, ServiceFactory, Topics
from tests.corpus.images import png_pixel_bomb
from tests.support.kafka import read_answers
from tests.support.origin import ImageOrigin
from tests.support.service import ServiceProcess

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SCREENSHOT = REPO_ROOT / "docs" / "web-page.png"
PHOTOS = REPO_ROOT / "training" / "photos"
CODEC = EventCodec()
LIMIT = 2 * 1024 * 1024  # the service's fetch limit in this test, and so the page's
FINAL_STATES = ("suggested", "dead_lettered", "refused", "timeout")


# Drops a file (name, base64 bytes) on the element with the given id, as a user's drag
# and drop does: dragenter, dragover, drop, carrying a DataTransfer with the file.
DROP = """
const [name, data, id] = arguments;
const bytes = Uint8Array.from(atob(data), (c) => c.charCodeAt(0));
const transfer = new DataTransfer();
transfer.items.add(new File([bytes], name));
const target = document.getElementById(id);
for (const type of ["dragenter", "dragover", "drop"]) {
  target.dispatchEvent(
    new DragEvent(type, {dataTransfer: transfer, bubbles: true, cancelable: true}),
  );
}
"""


def demo_photos() -> list[tuple[str, bytes]]:
    """The photos the browser uploads, as (file name, bytes): one per accepted format.

    Real product photos from training/photos (Caltech 101, CC BY 4.0), re-encoded so
    that each format the page accepts is uploaded once.
    """
    return [
        ("car_side_0001.jpg", real_photo("car/car_side_0001.jpg", "JPEG")),
        ("chair_0001.png", real_photo("furniture/chair_0001.jpg", "PNG")),
        ("Motorbikes_0003.webp", real_photo("motorcycle/Motorbikes_0003.jpg", "WEBP")),
    ]


def real_photo(path: str, fmt: str) -> bytes:
    """A committed photo (relative to training/photos) encoded as `fmt`."""
    out = io.BytesIO()
    with Image.open(PHOTOS / path) as image:
        image.save(out, format=fmt)
    return out.getvalue()


@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not path.exists():
            pytest.fail(
                f"{path} is missing: install the Debian package {package} (make system-deps)",
                pytrace=False,
            )
    options = Options()
    options.binary_location = str(CHROMIUM)
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.add_argument("--window-size=1280,1000")
    try:
        driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    except WebDriverException as exc:
        pytest.fail(f"Chromium did not start under chromedriver: {exc.msg}", pytrace=False)
    yield driver
    driver.quit()


def start_page(env: dict[str, str], port: int, log_path: Path) -> ServiceProcess:
    """`python -m category_suggester web`, once its status answers (Kafka reached, topics found)."""
    page = ServiceProcess(
        [sys.executable, "-m", "category_suggester", "web"],
        env=env,
        log_path=log_path,
        cwd=REPO_ROOT,
    )
    page.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if page.exit_code() is not None:
            raise AssertionError(f"the page exited with {page.exit_code()}:\n{page.log_tail()}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5):
                return page
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(0.2)  # polling a probe, not synchronising on time
    raise AssertionError(f"the page did not answer within 60 s:\n{page.log_tail()}")


def cards(driver: webdriver.Chrome) -> list[WebElement]:
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def wait_settled(driver: webdriver.Chrome, count: int) -> list[WebElement]:
    """The page's cards once `count` of them show a final state (newest first)."""

    def settled(d: webdriver.Chrome) -> bool:
        shown = cards(d)
        return len(shown) == count and all(
            c.get_attribute("data-state") in FINAL_STATES for c in shown
        )

    WebDriverWait(driver, 120, poll_frequency=0.2).until(settled)
    return cards(driver)


def js_round(value: float) -> int:
    return math.floor(value + 0.5)


def assert_shows_suggestion(card: WebElement, published: CategorySuggestion) -> None:
    """The card shows exactly the suggestion the service published."""
    assert card.get_attribute("data-state") == "suggested"
    assert card.find_element(By.CSS_SELECTOR, ".category").text.lower() == published.category
    assert card.find_element(By.CSS_SELECTOR, ".score").text == f"{published.score * 100:.1f}%"
    badge = card.find_element(By.CSS_SELECTOR, ".badge").text
    assert badge == ("confident" if published.confident else "not confident")
    bars = card.find_elements(By.CSS_SELECTOR, ".bars li")
    shown = [
        (b.get_attribute("data-category"), b.find_element(By.CSS_SELECTOR, ".pct").text)
        for b in bars
    ]
    assert shown == [(s.category, f"{s.score * 100:.1f}%") for s in published.scores]
    widths = [
        float(b.find_element(By.CSS_SELECTOR, ".fill").value_of_css_property("width").rstrip("px"))
        for b in bars
    ]
    assert widths == sorted(widths, reverse=True)
    facts = card.find_element(By.CSS_SELECTOR, ".facts").text
    assert f"{published.confidence_threshold * 100:.1f}%" in facts
    assert f"{published.model_name}, version {published.model_version}" in facts
    timings = published.timings
    assert f"fetch {js_round(timings.fetch_ms)} ms" in facts
    assert f"inference {js_round(timings.inference_ms)} ms" in facts
    assert f"total {js_round(timings.total_ms)} ms" in facts


def test_the_page_will_not_start_without_its_topics(kafka: KafkaBroker, topics: Topics) -> None:
    missing = f"pytest_missing_{uuid.uuid4().hex[:8]}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SUGGESTER_")} | {
        "SUGGESTER_KAFKA__BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "SUGGESTER_KAFKA__INPUT_TOPIC": topics.input,
        "SUGGESTER_KAFKA__DLQ_TOPIC": topics.dlq,
        "SUGGESTER_KAFKA__OUTPUT_TOPIC": missing,
        "SUGGESTER_WEB__PORT": str(free_port()),
    }
    result = subprocess.run(
        [sys.executable, "-m", "category_suggester", "web"],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert f"topic {missing} does not exist on {kafka.bootstrap_servers}" in result.stderr
    assert "Traceback" not in result.stderr


async def test_the_probe_tells_what_is_missing_from_the_real_triton(triton: TritonServer) -> None:
    """What a timeout message is made of, asked of a real Triton and a port nobody serves."""
    nobody = f"http://127.0.0.1:{free_port()}"

    def probe(model: str = "category_classifier", url: str = triton.grpc_url) -> PipelineProbe:
        return PipelineProbe(
            Settings(
                triton=TritonSettings(url=url, model_name=model),
                web=WebSettings(service_url=nobody),
            )
        )

    readiness = await probe().readiness()
    assert (readiness.service, readiness.triton) == ("down", "ready")
    assert f"nothing answers at {nobody}/readyz" in readiness.missing()
    readiness = await probe(model="no_such_model").readiness()
    assert readiness.triton == "model_not_ready"
    readiness = await probe(url=f"127.0.0.1:{free_port()}").readiness()
    assert readiness.triton == "down"
    assert "Triton does not answer at 127.0.0.1:" in readiness.missing()


def test_the_page_shows_what_the_service_published_and_why_it_refused(
    kafka: KafkaBroker,
    topics: Topics,
    image_origin: ImageOrigin,
    start_service: ServiceFactory,
    service_env: dict[str, str],
    browser: webdriver.Chrome,
    tmp_path: Path,
) -> None:
    web_port = free_port()
    shared = {
        "SUGGESTER_FETCH__ALLOWED_HOSTS": f"{image_origin.host_port},127.0.0.1:{web_port}",
        "SUGGESTER_FETCH__MAX_BYTES": str(LIMIT),
    }
    service = start_service(**shared)
    uploads = tmp_path / "uploads"
    page_env = (
        service_env
        | shared
        | {
            "SUGGESTER_OBSERVABILITY__PORT": str(service.port),
            "SUGGESTER_WEB__PORT": str(web_port),
            "SUGGESTER_WEB__UPLOAD_DIR": str(uploads),
            "SUGGESTER_WEB__ANSWER_TIMEOUT_S": "90",
        }
    )
    page = start_page(page_env, web_port, tmp_path / "web.log")
    quiet: ServiceProcess | None = None
    try:
        service.wait_ready()
        files = tmp_path / "files"
        files.mkdir()
        for name, data in [
            *demo_photos(),
            ("notes.txt", b"a seller's notes, not a photo\n" * 20),
            ("huge.jpg", b"\xff\xd8\xff" + os.urandom(LIMIT + 512 * 1024)),
            ("bomb.png", png_pixel_bomb(50_000, 50_000)),
        ]:
            (files / name).write_bytes(data)
        linked = image_origin.add(
            "web/cellphone_0003.jpg", real_photo("mobile/cellphone_0003.jpg", "JPEG")
        )

        browser.get(f"http://127.0.0.1:{web_port}/")
        WebDriverWait(browser, 30).until(
            lambda d: "Service: ready" in d.find_element(By.ID, "status").text
        )
        picker = browser.find_element(By.ID, "files")
        # Bad input first, so the photos' answers end up on top of the page.
        for name in ("notes.txt", "huge.jpg", "bomb.png"):
            picker.send_keys(str(files / name))
        url_field = browser.find_element(By.ID, "url")
        for url in ("http://169.254.169.254/latest/meta-data/", linked):
            url_field.send_keys(url)
            browser.find_element(By.CSS_SELECTOR, "#url-form button").click()
        # Several photos at once through the file picker, and one dropped on the page.
        *picked, (dropped, dropped_data) = demo_photos()
        picker.send_keys("\n".join(str(files / name) for name, _ in picked))
        browser.execute_script(DROP, dropped, base64.b64encode(dropped_data).decode(), "drop")
        photo_names = [name for name, _ in demo_photos()]

        shown = {c.find_element(By.CSS_SELECTOR, ".name").text: c for c in wait_settled(browser, 8)}
        published = read_answers(
            kafka.bootstrap_servers, topics.output, topics.dlq, CODEC, expect=6, settle_s=1.0
        )

        # Photos and the allowed URL: the suggestion the service published for each event.
        assert not set(published.dead_letters) - {
            shown[n].get_attribute("data-event-id") for n in ("notes.txt", "bomb.png")
        }
        for name in [*photo_names, linked]:
            card = shown[name]
            event_id = card.get_attribute("data-event-id")
            assert event_id in published.suggestions, f"{name}: nothing published for it"
            (suggestion,) = published.suggestions[event_id]
            assert_shows_suggestion(card, suggestion)

        # Not an image, and a pixel bomb: the reason on the dead-letter record.
        for name, reason in (("notes.txt", "not_an_image"), ("bomb.png", "image_too_large")):
            card = shown[name]
            (record,) = published.dead_letters[card.get_attribute("data-event-id") or ""]
            info = parse_dlq_headers(record.headers() or [])
            assert info.reason == reason
            assert card.get_attribute("data-state") == "dead_lettered"
            assert card.get_attribute("data-reason") == reason
            message = card.find_element(By.CSS_SELECTOR, ".message").text
            assert f"{reason}: {info.message} (stage {info.stage})" in message

        # Too large: refused while it arrived, never published. A disallowed URL: refused
        # by the service's URL policy before publishing.
        huge = shown["huge.jpg"]
        assert huge.get_attribute("data-state") == "refused"
        assert huge.get_attribute("data-event-id") is None
        assert (
            "larger than the 2.0 MiB limit" in huge.find_element(By.CSS_SELECTOR, ".message").text
        )
        metadata = shown["http://169.254.169.254/latest/meta-data/"]
        assert metadata.get_attribute("data-state") == "refused"
        assert metadata.get_attribute("data-reason") == "address_refused"
        assert published.count() == 6

        # Answered uploads are deleted.
        assert list(uploads.iterdir()) == []

        height = browser.execute_script("return document.documentElement.scrollHeight")
        browser.set_window_size(1280, int(height) + 150)  # the window's frame included
        SCREENSHOT.parent.mkdir(exist_ok=True)
        assert browser.save_screenshot(str(SCREENSHOT))

        # A second page whose input topic nobody reads: after its answer timeout it says
        # what is missing, from the service's /readyz (nothing answers there) and Triton.
        quiet_topic = f"{topics.input}.unread"
        kafka.create_topics({quiet_topic: 1})
        quiet_port, nobody = free_port(), f"http://127.0.0.1:{free_port()}"
        quiet = start_page(
            page_env
            | {
                "SUGGESTER_KAFKA__INPUT_TOPIC": quiet_topic,
                "SUGGESTER_WEB__PORT": str(quiet_port),
                "SUGGESTER_WEB__SERVICE_URL": nobody,
                "SUGGESTER_WEB__ANSWER_TIMEOUT_S": "3",
                "SUGGESTER_WEB__UPLOAD_DIR": str(tmp_path / "quiet-uploads"),
            },
            quiet_port,
            tmp_path / "quiet.log",
        )
        browser.get(f"http://127.0.0.1:{quiet_port}/")
        browser.find_element(By.ID, "files").send_keys(str(files / photo_names[0]))
        (card,) = wait_settled(browser, 1)
        assert card.get_attribute("data-state") == "timeout"
        message = card.find_element(By.CSS_SELECTOR, ".message").text
        assert (
            f"no answer within 3 s: the service is not running (nothing answers at {nobody}/readyz)"
            in message
        )
        assert "Service: not running" in browser.find_element(By.ID, "status").text
    except Exception:
        # What the page showed and what the app logged, for the failure report.
        for card in cards(browser):
            print(card.get_attribute("data-state"), card.text.replace("\n", " | "))
        print(page.log_tail())
        raise
    finally:
        page.kill()
        if quiet is not None:
            quiet.kill()
