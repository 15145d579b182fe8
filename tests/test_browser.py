"""Against a live server on loopback: the web page in a real browser (Debian's headless chromium driven by
Playwright), and raw-socket behaviour.

One server (on a 50-photo index of the tiny model) and one browser serve the page tests of this module; each test
opens its own page (desktop, phone with touch). Screenshots of each view go to test-artifacts/.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from pathlib import Path

import pytest
from conftest import REPO, live_server, sample_photos
from PIL import Image

from api.app import create_app
from api.settings import Settings
from indexer.runner import IndexConfig, index_folder

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "test-artifacts"
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
TOKEN = "page-test-token-0123456789"
MAX_K = 40  # the server's own limit, below the page's old hard-coded 200: the page must read it from /stats
PHONE = {"viewport": {"width": 390, "height": 844}, "has_touch": True, "is_mobile": True, "device_scale_factor": 2}


def require_chromium() -> None:
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run installs Debian's chromium")
        pytest.skip("Debian's chromium is not installed here (`make browser` installs it; CI always does)")


@pytest.fixture(scope="module")
def site(embedder, tiny_model, tmp_path_factory):
    """(base url, photo folder, a spare folder for an index job) of one live server for the module: 50 photos, one
    group of duplicates among them."""
    require_chromium()
    tmp = tmp_path_factory.mktemp("page")
    photos = tmp / "photos"
    (photos / "sub").mkdir(parents=True)
    for i, p in enumerate(sample_photos(2)):
        shutil.copy(p, photos / ("sub" if i % 3 == 0 else "") / p.name)
    src = sorted(photos.glob("*.jpg"))[4]  # a duplicate group: the photo, an exact copy and a mirrored one
    shutil.copy(src, photos / "copy_of_it.jpg")
    Image.open(src).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "mirrored.jpg", quality=80)
    spare = tmp / "spare"
    spare.mkdir()
    for p in sample_photos(3)[2::3][:6]:  # six photos the index does not hold yet
        shutil.copy(p, spare / p.name)
    idx = tmp / "idx"
    index_folder(photos, idx, embedder, IndexConfig(workers=0, progress=False))
    app = create_app(Settings(index=idx, model=str(tiny_model), device="cpu", workers=0, token=TOKEN, max_k=MAX_K))
    with live_server(app) as (url, _):
        yield url, photos, spare


@pytest.fixture(scope="module")
def browser(site):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


def open_page(browser, url, **context):
    ctx = browser.new_context(**(context or {"viewport": {"width": 1280, "height": 900}}))
    page = ctx.new_page()
    page.goto(url)
    page.wait_for_function("document.querySelectorAll('#results li.result').length > 0")  # the collection, on load
    return page


def names(page) -> list[str]:
    return page.locator("#results .meta .name").all_text_contents()


def audit(page, view: str) -> None:
    """axe-core (bundled by axe-playwright-python) on the page as it is: no serious or critical violation."""
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page).response["violations"]
    bad = [(v["id"], v["impact"], [n["target"] for n in v["nodes"]][:3]) for v in found if v["impact"] in ("serious", "critical")]
    assert not bad, f"{view}: {bad}"


def wait_results(page, mode: str) -> None:
    page.wait_for_function(f"document.getElementById('mode').textContent.includes('{mode}') && "
                           "document.getElementById('results-section').getAttribute('aria-busy') === 'false'")


def test_browse_then_upload_then_draw_a_box(site, browser):
    url, photos, _ = site
    query = sorted(photos.rglob("*.jpg"))[9]
    page = open_page(browser, url)
    page.wait_for_function("document.getElementById('stats').textContent.includes('50 photos')")
    # keyboard: Tab from the top of the page reaches the file input first (after the header's API link)
    page.keyboard.press("Tab")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.id") == "file"
    page.wait_for_function("[...document.querySelectorAll('#results img')].slice(0, 12).every(i => i.complete && i.naturalWidth > 0)")
    assert page.locator("#results li.result").count() == 40 and "(50)" in page.text_content("#mode")  # a page of 40
    first_page = names(page)
    page.click("#more")
    page.wait_for_function("document.querySelectorAll('#results li.result').length === 50")
    assert names(page)[:40] == first_page and len(set(names(page))) == 50 and page.is_hidden("#more")
    # justified rows: every full row fills the list's width (tiles grow with their photo's aspect), none overflows
    rows = page.evaluate("""() => {
      const ol = document.getElementById('results').getBoundingClientRect(), rows = {};
      for (const li of document.querySelectorAll('#results li')) {
        const r = li.getBoundingClientRect(); (rows[Math.round(r.top)] ||= []).push([r.left, r.right, r.width / r.height]);
      }
      return {right: ol.right, rows: Object.entries(rows).sort((a, b) => a[0] - b[0]).map(e => e[1])};
    }""")
    assert len(rows["rows"]) >= 3
    for row in rows["rows"][:-1]:
        assert rows["right"] - 20 < max(r[1] for r in row) <= rows["right"] + 1, [[round(x) for x in r] for r in row]
    audit(page, "browse")
    page.screenshot(path=str(ARTIFACTS / "1-browse.png"), full_page=True)

    # sort by folder (path): the order changes, and a filter narrows the view
    with page.expect_response(lambda r: "/photos?" in r.url and "sort=path" in r.url):
        page.select_option("#sort", "path")
    wait_results(page, "(50)")
    want = page.evaluate("fetch('/photos?sort=path&order=desc&limit=40').then(r => r.json()).then(p => p.photos.map(x => x.path))")
    assert names(page) == want != sorted(want)  # newest first = folder path descending (sub/ first)
    in_sub = sorted(p.name for p in (photos / "sub").iterdir())
    with page.expect_response(lambda r: "folder=" in r.url):
        page.fill("#folder-filter", str(photos / "sub"))
        page.press("#folder-filter", "Enter")
    wait_results(page, f"({len(in_sub)})")
    assert sorted(names(page)) == in_sub
    page.fill("#folder-filter", "")
    page.press("#folder-filter", "Enter")
    wait_results(page, "(50)")

    page.set_input_files("#file", str(query))
    wait_results(page, "similar")
    page.wait_for_function("[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)")
    got = names(page)
    assert len(got) == 12 and got[0] == query.name
    assert page.locator("#results .match").count() == 0
    # full file names are reachable: the tile's title and its accessible name hold the whole name
    assert page.get_attribute("#results button.hit >> nth=0", "title") == query.name
    assert page.text_content("#query-name") == query.name
    audit(page, "results")
    page.screenshot(path=str(ARTIFACTS / "2-upload-results.png"), full_page=True)

    # draw a box on the query photo: region results with their match boxes
    b = page.locator("#canvas").bounding_box()
    page.mouse.move(b["x"] + b["width"] * 0.15, b["y"] + b["height"] * 0.2)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] * 0.6, b["y"] + b["height"] * 0.7, steps=8)
    page.mouse.up()
    wait_results(page, "region")
    assert page.locator("#results .match").count() == 12
    assert len(page.input_value("#box").split(",")) == 4
    assert names(page)[0] == query.name
    page.screenshot(path=str(ARTIFACTS / "3-region-results.png"), full_page=True)

    # the photo's parts drawn over it
    with page.expect_response(lambda r: "/parts" in r.url and r.status == 200):
        page.check("#show-parts")
    page.screenshot(path=str(ARTIFACTS / "4-parts.png"))

    # click a result: it becomes the query (by id); "Back to all photos" returns to the collection
    with page.expect_response(lambda r: "/similar" in r.url and r.status == 200):
        page.locator("#results button.hit").nth(1).click()
    page.click("#browse-all")
    wait_results(page, "(50)")
    page.close()


def test_detail_view_parts_match_heat_map_and_steering(site, browser):
    url, _, _ = site
    page = open_page(browser, url)
    first = page.locator("#results li").first
    name, pid = first.locator("button.hit").get_attribute("title"), first.locator("button.hit").get_attribute("data-id")
    first.locator("button.info").click()
    page.wait_for_selector("#detail[open]")
    page.wait_for_function("document.getElementById('detail-meta').textContent.includes('pixels')")
    assert page.text_content("#detail-name") == name
    meta = dict(zip(page.locator("#detail-meta dt").all_text_contents(), page.locator("#detail-meta dd").all_text_contents()))
    assert meta["File"] == name and meta["Size"].endswith("pixels") and "Taken" in meta
    page.wait_for_function("document.getElementById('detail-dups').textContent !== ''")
    assert not page.is_visible("#detail-match-label")  # a browsed photo has no match to show
    audit(page, "detail")
    # parts: drawn over the photo, each a button; one becomes a region query on this photo
    page.check("#detail-parts")
    page.wait_for_function("document.querySelectorAll('#detail-part-list button').length === 5")
    page.screenshot(path=str(ARTIFACTS / "detail-parts.png"))
    with page.expect_response(lambda r: f"/photos/{pid}/similar" in r.url and "part=1" in r.url and r.status == 200):
        page.locator("#detail-part-list button").nth(1).click()
    assert not page.is_visible("#detail")
    wait_results(page, "region")

    # a region result's detail: its match box and heat map over the photo, toggleable, and its score
    second = page.locator("#results li").nth(1)
    second.locator("button.info").click()
    page.wait_for_selector("#detail[open]")
    assert page.text_content("#detail-score").startswith("Score 0.")
    drawn = "(() => { const c = document.getElementById('detail-overlay'); if (!c.width) return -1; " \
            "const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data; let n = 0; " \
            "for (let i = 3; i < d.length; i += 4) n += d[i] > 0; return n / (c.width * c.height); })()"
    page.wait_for_function(f"{drawn} > 0.2")  # the heat map covers the photo
    page.wait_for_function("document.getElementById('detail-meta').textContent.includes('pixels')")
    page.screenshot(path=str(ARTIFACTS / "detail-match.png"))
    page.uncheck("#detail-match")
    assert page.evaluate(drawn) == 0
    steered = second.locator("button.hit").get_attribute("title")
    sid = second.locator("button.hit").get_attribute("data-id")

    # steering: "less like this" puts it in the tray, and the results follow without it on top
    with page.expect_response(lambda r: f"unlike={sid}" in r.url and r.status == 200):
        page.click("#detail-unlike")
    wait_results(page, "steered")
    assert page.is_visible("#tray") and steered in page.text_content("#tray-unlike")
    assert steered not in names(page)[:3]
    audit(page, "steering")
    page.screenshot(path=str(ARTIFACTS / "steering.png"), full_page=True)
    with page.expect_response(lambda r: "/similar" in r.url and "unlike" not in r.url and r.status == 200):
        page.locator("#tray-unlike button").first.click()
    assert not page.is_visible("#tray")
    # "more like this" on another result: a wanted example beside the query
    third = page.locator("#results li").nth(3)
    wanted, wid = third.locator("button.hit").get_attribute("title"), third.locator("button.hit").get_attribute("data-id")
    third.locator("button.info").click()
    with page.expect_response(lambda r: f"like={wid}" in r.url and "unlike" not in r.url and r.status == 200):
        page.click("#detail-like")
    wait_results(page, "steered")
    assert wanted in page.text_content("#tray-like") and wanted in names(page)[:3]
    page.close()


def test_duplicates_review_choose_a_keeper_and_export(site, browser):
    import json

    url, photos, _ = site
    page = open_page(browser, url)
    page.click("#review-dups")
    wait_results(page, "groups")
    group = page.locator("#groups li.group", has_text="copy_of_it.jpg")
    members = group.locator("figure.member")
    assert members.count() == 3 and group.locator("h3").text_content().endswith(("exact copies", "edited copies"))
    kept = group.locator("figure.member.kept")
    assert kept.count() == 1 and "suggested keeper" in kept.text_content()
    mirrored = group.locator("figure.member", has_text="mirrored.jpg")
    assert "edited" in mirrored.text_content() and "score" in mirrored.text_content()
    audit(page, "duplicates")
    page.screenshot(path=str(ARTIFACTS / "duplicates.png"), full_page=True)
    # choose another keeper with the keyboard, then export: the old keeper is now a copy
    old_keeper = kept.locator("figcaption span").first.text_content()
    mirrored.locator("input[type=radio]").focus()
    page.keyboard.press("Space")
    assert "mirrored.jpg" in group.locator("figure.member.kept").text_content()
    with page.expect_download() as dl:
        page.click("#dup-export")
    groups = json.loads(Path(dl.value.path()).read_text())
    mine = next(g for g in groups if any(c["path"] == "copy_of_it.jpg" for c in g["copies"]) or g["keep"]["path"] == "copy_of_it.jpg")
    assert mine["keep"]["path"] == "mirrored.jpg"
    assert sorted(c["path"] for c in mine["copies"]) == sorted(["copy_of_it.jpg", old_keeper])

    # move the copies through the API (token): a preview first, then the files really move (put back afterwards)
    from search.duplicates import undo_moves

    out = photos.parent / "moved"
    out.mkdir()
    page.fill("#dup-folder", str(out))
    page.fill("#dup-token", TOKEN)
    assert page.is_disabled("#dup-move")
    page.click("#dup-preview")
    page.wait_for_function("document.getElementById('dup-status').textContent.includes('would move')")
    assert "copy_of_it.jpg → group-" in page.text_content("#dup-status") and not list(out.iterdir())
    page.click("#dup-move")
    page.wait_for_function("document.getElementById('dup-status').textContent.startsWith('Moved')")
    moved = sorted(p.name for p in out.glob("group-*/*"))
    assert not (photos / "copy_of_it.jpg").exists() and (photos / "mirrored.jpg").exists()
    assert {"copy_of_it.jpg", old_keeper} <= set(moved) and "mirrored.jpg" not in moved  # every shown group's copies
    assert len(undo_moves(next(out.glob("dinosearch-moves-*.jsonl"))).moved) == len(moved)
    assert (photos / "copy_of_it.jpg").exists()
    page.click("#browse-all")
    wait_results(page, "(50)")
    assert page.is_hidden("#groups") and page.is_visible("#results")
    page.close()


def test_a_slow_old_reply_never_replaces_a_newer_one(site, browser):
    """The first search's reply is held back until the second one has been shown: the page keeps the second."""
    url, _, _ = site
    page = open_page(browser, url)
    held = []

    def hold_first(route):
        if not held:
            held.append(route)  # not answered until released below
        else:
            route.continue_()

    page.route("**/photos/*/similar*", hold_first)
    tiles = page.locator("#results button.hit")
    first_name, second_name = tiles.nth(0).get_attribute("title"), tiles.nth(5).get_attribute("title")
    tiles.nth(0).click()
    page.wait_for_function("document.getElementById('results-section').getAttribute('aria-busy') === 'true'")
    assert len(held) == 1
    tiles.nth(5).click()
    wait_results(page, "similar")
    assert names(page)[0] == second_name
    try:
        held[0].continue_()  # the old reply arrives late (the page aborted it: continuing may fail, and that is fine)
    except Exception:
        pass
    time.sleep(1.0)
    assert names(page)[0] == second_name != first_name
    assert page.text_content("#query-name") == second_name
    page.close()


def test_busy_at_once_and_errors_as_one_sentence(site, browser):
    url, photos, _ = site
    page = open_page(browser, url)
    held = []
    page.route("**/search?*", lambda route: held.append(route) if not held else route.continue_())
    # the busy state comes within 100 ms of choosing the file (measured inside the page)
    page.evaluate("""() => {
      window.t = {};
      document.getElementById('file').addEventListener('change', () => { window.t.change = performance.now(); }, true);
      new MutationObserver(() => { if (!window.t.busy) window.t.busy = performance.now(); })
        .observe(document.getElementById('results-section'), {attributes: true, attributeFilter: ['aria-busy']});
    }""")
    page.set_input_files("#file", str(sorted(photos.rglob("*.jpg"))[3]))
    page.wait_for_function("window.t.busy !== undefined")
    t = page.evaluate("window.t")
    assert t["busy"] - t["change"] < 100
    assert len(held) == 1  # the reply is held back: the page is busy meanwhile
    assert page.get_attribute("#go", "aria-disabled") == "true" and page.is_visible("#spinner")
    assert float(page.evaluate("getComputedStyle(document.getElementById('results')).opacity")) < 1
    held[0].continue_()
    wait_results(page, "similar")
    assert page.get_attribute("#go", "aria-disabled") == "false" and not page.is_visible("#spinner")

    # too many results asked for: the page clamps k to the server's own limit (read from /stats)
    page.fill("#k", "100000")
    with page.expect_response(lambda r: "/search?" in r.url) as reply:
        page.click("#go")
    assert reply.value.status == 200 and f"k={MAX_K}" in reply.value.url
    assert page.input_value("#k") == str(MAX_K)
    wait_results(page, "similar")
    assert len(names(page)) == MAX_K

    # an inverted box: one sentence in place of the results, nothing sent, nothing drawn
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/search" in r.url else None)
    page.fill("#box", "300,200,100,50")
    page.click("#go")
    assert page.is_visible("#error") and "x1 must be right of x0" in page.text_content("#error")
    assert page.locator("#results li").count() == 0 and not sent

    # a broken upload: the server's reason as a sentence, the old photo and results gone
    bad = photos.parent / "bad.jpg"
    bad.write_text("not a photo")
    page.set_input_files("#file", str(bad))
    page.wait_for_function("!document.getElementById('error').hidden && !document.getElementById('error').textContent.includes('box')")
    text = page.text_content("#error")
    assert "not an image" in text.lower() and text[0].isupper() and text.endswith(".") and "{" not in text
    assert page.locator("#results li").count() == 0
    assert page.text_content("#query-name") == "bad.jpg"
    audit(page, "error")
    page.screenshot(path=str(ARTIFACTS / "5-error.png"))
    page.close()


def test_phone_swipes_scroll_box_mode_draws(site, browser):
    url, photos, _ = site
    page = open_page(browser, url, **PHONE)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1")
    # touch targets: every button, field and checkbox label is at least 44 px high
    small = page.evaluate("""() => [...document.querySelectorAll('button, input:not([type=file]), select, a, label:has(input[type=checkbox])')]
      .filter(e => e.offsetParent !== null && !(e.type === 'checkbox') && !e.closest('#results'))
      .map(e => [e.id || e.textContent.trim().slice(0, 20), e.getBoundingClientRect().height])
      .filter(([, h]) => h < 44)""")
    assert not small, small
    assert page.evaluate("document.querySelector('#results button.hit').getBoundingClientRect().height") >= 44

    # a portrait query does not fill the screen
    portrait = photos.parent / "portrait.jpg"
    Image.open(sorted(photos.rglob("*.jpg"))[2]).convert("RGB").resize((300, 600)).save(portrait)
    page.set_input_files("#file", str(portrait))
    wait_results(page, "similar")
    page.wait_for_function("document.getElementById('canvas').width === 300")
    assert page.locator("#canvas").bounding_box()["height"] <= 0.6 * 844

    # a swipe over the photo scrolls the page: no box, no search
    cdp = page.context.new_cdp_session(page)
    sent = []
    page.on("request", lambda r: sent.append(r.url) if "/search" in r.url else None)

    def swipe(x0, y0, x1, y1):
        cdp.send("Input.dispatchTouchEvent", {"type": "touchStart", "touchPoints": [{"x": x0, "y": y0}]})
        for i in range(1, 11):
            cdp.send("Input.dispatchTouchEvent", {"type": "touchMove", "touchPoints": [
                {"x": x0 + (x1 - x0) * i / 10, "y": y0 + (y1 - y0) * i / 10}]})
            time.sleep(0.02)
        cdp.send("Input.dispatchTouchEvent", {"type": "touchEnd", "touchPoints": []})

    page.evaluate("window.scrollTo(0, 0)")
    b = page.locator("#canvas").bounding_box()
    swipe(b["x"] + b["width"] * 0.3, b["y"] + b["height"] * 0.8, b["x"] + b["width"] * 0.6, b["y"] + b["height"] * 0.2)
    time.sleep(0.5)
    assert page.input_value("#box") == "" and not sent
    assert page.evaluate("window.scrollY") > 0

    # box mode on: the same swipe draws a box and searches the region
    page.evaluate("window.scrollTo(0, 0)")
    page.tap("#box-mode")
    assert page.get_attribute("#box-mode", "aria-pressed") == "true"
    page.evaluate("window.scrollTo(0, 0)")
    b = page.locator("#canvas").bounding_box()
    swipe(b["x"] + b["width"] * 0.2, b["y"] + b["height"] * 0.2, b["x"] + b["width"] * 0.7, b["y"] + b["height"] * 0.6)
    wait_results(page, "region")
    assert len(page.input_value("#box").split(",")) == 4
    page.screenshot(path=str(ARTIFACTS / "6-phone-region.png"), full_page=True)
    audit(page, "phone")

    # tapping a result far down: the new query comes into view
    page.locator("#results button.hit").last.scroll_into_view_if_needed()
    assert page.locator("#query").bounding_box()["y"] < 0
    with page.expect_response(lambda r: "/similar" in r.url and r.status == 200):
        page.locator("#results button.hit").last.tap()
    top = page.evaluate("document.getElementById('query').getBoundingClientRect().top")
    assert -2 <= top < 100
    page.screenshot(path=str(ARTIFACTS / "7-phone-query.png"))
    page.close()


def test_keyboard_only(site, browser):
    url, _, _ = site
    page = open_page(browser, url)
    # Tab to the first photo of the collection, Enter: it becomes the query, and focus stays on it
    for _ in range(60):
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.classList.contains('hit')"):
            break
    chosen = page.evaluate("document.activeElement.dataset.id")
    assert chosen
    page.keyboard.press("Enter")
    wait_results(page, "similar")
    assert page.evaluate("document.activeElement.classList.contains('hit') && document.activeElement.dataset.id") == chosen
    # the focus ring is drawn and no ancestor clips it
    ring = page.evaluate("""() => {
      const e = document.activeElement, s = getComputedStyle(e);
      let clipped = false;
      for (let a = e.parentElement; a && a.id !== 'results-section'; a = a.parentElement)
        if (getComputedStyle(a).overflow !== 'visible') clipped = true;
      return {style: s.outlineStyle, width: parseFloat(s.outlineWidth), clipped};
    }""")
    assert ring == {"style": "solid", "width": 3, "clipped": False}
    page.screenshot(path=str(ARTIFACTS / "8-keyboard-focus.png"))
    # its details with the keyboard: Tab reaches its "i" button, Enter opens the detail view, Escape closes it
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('info')")
    page.keyboard.press("Enter")
    page.wait_for_selector("#detail[open]")
    page.keyboard.press("Escape")
    page.wait_for_selector("#detail:not([open])", state="attached")
    assert page.evaluate("document.activeElement.classList.contains('info')")  # focus back where it was
    # Enter on the next photo: the same, and a box typed with the keyboard searches the region
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.classList.contains('hit')")
    page.keyboard.press("Enter")
    wait_results(page, "similar")
    assert page.evaluate("document.activeElement.classList.contains('hit')")
    page.focus("#box")
    page.keyboard.type("10,10,120,90")
    page.keyboard.press("Enter")
    wait_results(page, "region")
    assert page.evaluate("document.activeElement.id") == "box"
    page.close()


def test_index_job_one_at_a_time_with_its_stages(site, browser):
    url, _, spare = site
    page = open_page(browser, url)
    page.fill("#folder", str(spare))
    page.fill("#token", TOKEN)
    page.click("#index-go")
    assert page.is_disabled("#index-go")
    page.locator("#job-form").evaluate("f => f.requestSubmit()")  # a second submit while one runs starts nothing
    page.wait_for_function("document.getElementById('job-status').textContent.startsWith('Done')", timeout=120_000)
    assert page.text_content("#job-status") == "Done: 6 photos indexed."
    assert page.evaluate("fetch('/index/jobs').then(r => r.json()).then(j => j.length)") == 1
    assert page.is_enabled("#index-go") and not page.is_visible("#job-cancel")
    page.wait_for_function("document.getElementById('stats').textContent.includes('56 photos')")
    page.wait_for_function("document.getElementById('mode').textContent.includes('(56)')")
    page.screenshot(path=str(ARTIFACTS / "9-job-done.png"))
    page.close()


def test_docs_and_redoc_work_offline(site, browser):
    """Swagger UI and ReDoc render with every request off this server refused."""
    url, _, _ = site
    page = browser.new_page()
    outside = []

    def only_local(route):
        if route.request.url.startswith(url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto(f"{url}/docs")
    page.wait_for_selector(".swagger-ui .opblock", timeout=30_000)
    assert page.locator(".swagger-ui .opblock").count() > 10
    page.goto(f"{url}/redoc")
    page.wait_for_selector("text='/photos/{photo_id}/similar'", timeout=30_000)
    # all that is asked of the network is ReDoc's "API docs by Redocly" footer logo, a decoration that stays blank
    assert [u for u in outside if u != "https://cdn.redoc.ly/redoc/logo-mini.svg"] == [], outside
    page.close()


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


def test_objects_click_and_box_in_the_browser(photos, embedder, tiny_model, tmp_path, browser):
    """Index with (tiny, random) SAM objects; on the page, tick objects, click the photo, then drag a box."""
    import torch

    from indexer.objects import Segmenter, SegmenterConfig
    from indexer.testing import save_random_sam

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
    with live_server(app) as (url, _):
        page = open_page(browser, url)
        page.wait_for_function("document.getElementById('stats').textContent.includes('objects')")
        assert page.is_enabled("#objects")
        page.set_input_files("#file", str(sorted(folder.glob("*.jpg"))[1]))
        wait_results(page, "similar")
        page.check("#objects")
        wait_results(page, "object")
        assert page.locator("#results canvas.mask").count() == page.locator("#results li.result").count() == 8
        b = page.locator("#canvas").bounding_box()
        with page.expect_response(lambda r: "point=" in r.url and r.status == 200):
            page.mouse.click(b["x"] + b["width"] * 0.4, b["y"] + b["height"] * 0.5)
        page.wait_for_function("document.querySelectorAll('#results canvas.mask').length === 8")
        page.screenshot(path=str(ARTIFACTS / "10-object-click.png"), full_page=True)
        with page.expect_response(lambda r: "box=" in r.url and "objects=true" in r.url and r.status == 200):
            page.mouse.move(b["x"] + b["width"] * 0.1, b["y"] + b["height"] * 0.1)
            page.mouse.down()
            page.mouse.move(b["x"] + b["width"] * 0.7, b["y"] + b["height"] * 0.8, steps=6)
            page.mouse.up()
        page.wait_for_function("document.querySelectorAll('#results canvas.mask').length === 8")
        page.screenshot(path=str(ARTIFACTS / "11-object-box.png"), full_page=True)
        # without a mouse: a result's detail view lists its stored objects as buttons; Enter on one searches by it
        page.locator("#results button.info").nth(2).focus()
        page.keyboard.press("Enter")
        page.wait_for_function("document.querySelectorAll('#detail-objects button').length > 0")
        page.locator("#detail-objects button").first.focus()
        with page.expect_response(lambda r: "objects=true" in r.url and "box=" in r.url and r.status == 200):
            page.keyboard.press("Enter")
        assert not page.is_visible("#detail")
        wait_results(page, "object")
        page.close()
