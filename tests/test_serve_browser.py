"""The web page at ``/``, in a real headless browser (Debian's chromium driven by Playwright): pick
a photo and see its faces boxed and named, enrol a face under a name and find it, and see the
service's error when the key is wrong. Skips, saying why, where chromium or Playwright is absent
(``apt-get install chromium``; ``pip install playwright``: no browser download is needed)."""

from __future__ import annotations

import os
import shutil

import pytest
from test_serve_support import Running, jpeg, make_gallery

from facefuse.serve import ServeSettings
from facefuse.serve.keys import add_key

CHROMIUM = os.environ.get("FACEFUSE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
# as this machine's probe ran it: no background networking (the network is closed), no sandbox as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

if CHROMIUM is None:
    pytest.skip("no chromium on this machine (Debian: apt-get install chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install playwright)")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-page")
    model, index, photos = make_gallery(root)
    key = add_key(root / "keys.json", "page", "write")
    with Running(ServeSettings(model=model, index=index, align="none", keys=root / "keys.json")) as svc:
        yield svc, key, photos, root


@pytest.fixture(scope="module")
def page(world):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1000, "height": 900})
        finally:
            browser.close()


def _search(page, path):
    page.set_input_files("#photo", str(path))
    page.click("#search")
    page.wait_for_function("() => /face\\(s\\)|error|API key/.test(document.getElementById('status').textContent) "
                           "&& !/searching/.test(document.getElementById('status').textContent)", timeout=20_000)


def test_search_draws_boxes_and_names(world, page):
    svc, key, photos, root = world
    page.goto(svc.url + "/")
    page.fill("#key", key)
    page.select_option("#align", "none")
    _search(page, photos["bob"][1])
    assert page.text_content("#status").startswith("1 face(s)")
    assert page.text_content("#results tbody td.identity") == "bob"
    size = page.evaluate("() => [document.getElementById('canvas').width, document.getElementById('canvas').height]")
    assert size == [72, 72]
    # the box's edge is drawn in the 'known' colour (#1a7f37) over the photo
    r, g, b, _ = page.evaluate("() => Array.from(document.getElementById('canvas').getContext('2d')"
                               ".getImageData(0, 40, 1, 1).data)")
    assert (r, g, b) == (0x1A, 0x7F, 0x37)
    page.screenshot(path=str(root / "search.png"), full_page=True)


def test_enrol_then_find_the_new_name(world, page, tmp_path):
    svc, key, _, root = world
    photo = tmp_path / "carol.jpg"
    photo.write_bytes(jpeg(77))
    page.goto(svc.url + "/")
    page.fill("#key", key)
    page.select_option("#align", "none")
    page.fill("#name", "Carol")
    page.set_input_files("#enrol-photo", str(photo))
    page.click("#enrol")
    page.wait_for_function("() => document.getElementById('enrol-status').textContent.length > 0", timeout=20_000)
    assert page.text_content("#enrol-status").startswith("enrolled Carol")
    _search(page, photo)
    assert page.text_content("#results tbody td.identity") == "Carol"
    with svc.client(key) as c:
        assert "Carol" in c.get("/v1/identities").json()["identities"]
        c.delete("/v1/identities/Carol")


def test_a_wrong_key_shows_the_services_error(world, page):
    svc, _, photos, _ = world
    page.goto(svc.url + "/")
    page.fill("#key", "not-a-key")
    _search(page, photos["ann"][0])
    assert "API key not recognised" in page.text_content("#status")
    assert page.get_attribute("#status", "class") == "error"
