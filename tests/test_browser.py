"""Against a live server on loopback: the web page in a real browser (Debian's headless chromium driven by
Playwright), and raw-socket behaviour.

Screenshots of each state go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import REPO, live_server

from api.app import create_app
from api.settings import Settings
from indexer.runner import IndexConfig, index_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed here (`make browser` installs it; CI always does)")


@pytest.fixture
def server(photos, embedder, tiny_model, tmp_path):
    require_chromium()
    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    app = create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0))
    with live_server(app) as (url, _):
        yield url, photos


def test_upload_then_draw_a_box(server):
    from playwright.sync_api import sync_playwright

    url, photos = server
    ARTIFACTS.mkdir(exist_ok=True)
    query = sorted(photos.rglob("*.jpg"))[9]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_function("document.getElementById('stats').textContent.includes('48 photos')")

        # keyboard: Tab from the top of the page reaches the file input first
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "file"
        page.set_input_files("#file", str(query))
        page.wait_for_selector("#results li.result img")
        page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
        names = page.locator("#results .meta span:first-child").all_text_contents()
        assert len(names) == 12 and names[0] == query.name
        assert "similar" in page.text_content("#mode")
        assert page.locator("#results .match").count() == 0
        page.screenshot(path=str(ARTIFACTS / "1-upload-results.png"), full_page=True)

        # draw a box on the query photo: region results with their match boxes
        b = page.locator("#canvas").bounding_box()
        page.mouse.move(b["x"] + b["width"] * 0.15, b["y"] + b["height"] * 0.2)
        page.mouse.down()
        page.mouse.move(b["x"] + b["width"] * 0.6, b["y"] + b["height"] * 0.7, steps=8)
        page.mouse.up()
        page.wait_for_function("document.getElementById('mode').textContent.includes('region')")
        page.wait_for_selector("#results .match")
        assert page.locator("#results .match").count() == 12
        assert len(page.input_value("#box").split(",")) == 4
        first = page.locator("#results .meta span:first-child").first.text_content()
        assert first == query.name
        page.screenshot(path=str(ARTIFACTS / "2-region-results.png"), full_page=True)

        # the photo's parts drawn over it
        with page.expect_response(lambda r: "/parts" in r.url and r.status == 200):
            page.check("#show-parts")
        page.screenshot(path=str(ARTIFACTS / "3-parts.png"))

        # click a result: it becomes the query (by id)
        with page.expect_response(lambda r: "/similar" in r.url and r.status == 200):
            page.locator("#results button.hit").nth(1).click()

        # phone width: one column, nothing overflowing sideways
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
        page.screenshot(path=str(ARTIFACTS / "4-phone.png"), full_page=True)

        # a broken upload shows the server's message, and the page keeps working
        bad = photos / "bad.jpg"
        bad.write_text("not a photo")
        page.set_input_files("#file", str(bad))
        page.wait_for_function("document.getElementById('message').textContent.includes('not an image')")
        browser.close()


def test_a_stalled_upload_gets_408_and_does_not_hold_the_server(photos, embedder, tiny_model, tmp_path):
    """Over a real socket: half an upload, then silence. Others are served meanwhile; the stalled one is dropped."""
    import urllib.request

    idx = tmp_path / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    app = create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0, upload_timeout=2.0))
    with live_server(app) as (_, port):
        stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(8)]
        for s in stalled:
            s.sendall(b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                      b"Content-Length: 100000\r\n\r\n--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\"\r\n\r\n\xff\xd8")
        t0 = time.time()
        for _ in range(5):  # answered while 8 uploads hang
            assert urllib.request.urlopen(f"http://127.0.0.1:{port}/photos/1/similar?k=3", timeout=5).status == 200
        assert time.time() - t0 < 2
        for s in stalled:
            s.settimeout(10)
            reply = ""
            while "stalled" not in reply and (chunk := s.recv(4096)):
                reply += chunk.decode(errors="replace")
            assert reply.startswith("HTTP/1.1 408") and "stalled" in reply, reply[:200]
            s.close()


def test_objects_click_and_box_in_the_browser(photos, embedder, tiny_model, tmp_path):
    """Index with (tiny, random) SAM objects; on the page, tick objects, click the photo, then drag a box."""
    import torch
    from playwright.sync_api import sync_playwright

    from indexer.objects import Segmenter, SegmenterConfig
    from indexer.testing import save_random_sam

    require_chromium()
    folder = tmp_path / "few"
    folder.mkdir()
    for p in sorted(photos.rglob("*.jpg"))[:8]:
        shutil.copy(p, folder / p.name)
    sam = save_random_sam(tmp_path / "sam", "tiny")
    seg = Segmenter(SegmenterConfig(model=str(sam), min_iou=-1e9, min_stability=0, min_area=0, nms_iou=1.0,
                                    points_per_side=2, max_masks=3), device=torch.device("cpu"))
    idx = tmp_path / "idx"
    index_folder(folder, idx, embedder, IndexConfig(workers=0, progress=False), segmenter=seg)
    app = create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0))
    ARTIFACTS.mkdir(exist_ok=True)
    with live_server(app) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_function("document.getElementById('stats').textContent.includes('objects')")
        assert page.is_enabled("#objects")
        page.set_input_files("#file", str(sorted(folder.glob("*.jpg"))[1]))
        page.wait_for_selector("#results li.result img")
        page.check("#objects")
        page.wait_for_function("document.getElementById('mode').textContent.includes('object')")
        assert page.locator("#results canvas.mask").count() == page.locator("#results li.result").count() == 8
        b = page.locator("#canvas").bounding_box()
        with page.expect_response(lambda r: "point=" in r.url and r.status == 200):
            page.mouse.click(b["x"] + b["width"] * 0.4, b["y"] + b["height"] * 0.5)
        page.wait_for_function("document.querySelectorAll('#results canvas.mask').length === 8")
        page.screenshot(path=str(ARTIFACTS / "5-object-click.png"), full_page=True)
        with page.expect_response(lambda r: "box=" in r.url and "objects=true" in r.url and r.status == 200):
            page.mouse.move(b["x"] + b["width"] * 0.1, b["y"] + b["height"] * 0.1)
            page.mouse.down()
            page.mouse.move(b["x"] + b["width"] * 0.7, b["y"] + b["height"] * 0.8, steps=6)
            page.mouse.up()
        page.wait_for_function("document.querySelectorAll('#results canvas.mask').length === 8")
        page.screenshot(path=str(ARTIFACTS / "6-object-box.png"), full_page=True)
        browser.close()
