"""The demo page in headless Chromium: upload a real image file, pick task and language, read the answer."""

from __future__ import annotations

import base64
import os
import shutil

import pytest
import requests
from serve_testlib import png_bytes

pytestmark = pytest.mark.slow

CHROMIUM = next((p for p in (os.environ.get("CHROMIUM"), shutil.which("chromium"), shutil.which("chromium-browser"),
                             "/usr/bin/chromium") if p and os.path.exists(p)), None)
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")
def test_demo_page_upload_gives_the_api_answer(serve_url, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    image = tmp_path / "shapes.png"
    image.write_bytes(png_bytes(42))
    want = requests.post(serve_url + "/v1/generate", timeout=60, json={
        "image": base64.b64encode(image.read_bytes()).decode(), "task": "ocr", "lang": "ko"}).json()
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        try:
            page = browser.new_page()
            page.goto(serve_url + "/", timeout=60_000)
            page.wait_for_selector("#lang option[value='ko']", state="attached", timeout=30_000)
            page.set_input_files("#file", str(image))
            page.select_option("#task", "ocr")
            page.select_option("#lang", "ko")
            page.click("#submit")
            page.wait_for_function("document.querySelector('#answer').dataset.tokens !== undefined",
                                   timeout=60_000)
            tokens = page.eval_on_selector("#answer", "el => JSON.parse(el.dataset.tokens)")
            shown = page.inner_text("#answer")
            assert page.inner_text("#error") == ""
            # bad input shows the API's error message on the page
            page.select_option("#task", "vqa")
            page.click("#submit")
            page.wait_for_function("document.querySelector('#error').textContent.length > 0", timeout=60_000)
            error = page.inner_text("#error")
        finally:
            browser.close()
    assert tokens == want["tokens"]
    assert shown.strip()  # the page shows the decoded text (or "(empty answer)")
    assert "needs the question" in error
