"""The playground page (`/`) in a real browser: Debian's chromium driven by Playwright, against a
real `reelserve serve` process (the fake runner in its worker: what is tested is the page and the
API around the model, so a video takes a fraction of a second plus the sleeps scripted below).

What the browser shows is checked against the API's own answers (httpx on the same server): the
form's bounds and defaults are the server's, progress ends at 100, the `<video>` plays for
frames / fps (within one frame), a cancelled job is gone from the API, the download is the MP4
`/content` serves byte for byte. The page must load with no console error, no uncaught exception
and no CSP violation (its CSP forbids inline code, so one would show here)."""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from serve.api.playground import CONTENT_SECURITY_POLICY
from tests.jobs.server_process import ROOT, ServerProcess

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium; .ci/run does)"),
]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = ROOT / "test-artifacts" / "playground"  # ignored by git; CI keeps what is there
KEY = "playground-test-key-0123456789abcdef"
MAX_WIDTH = 320  # a server limit the form must show (not the default 1280)
# Generous guards against hangs (a loaded 2-core machine); nothing here asserts on time.
WAIT_MS = 180_000
expect.set_options(timeout=WAIT_MS)

# Installed before the page's own script (Playwright's init scripts run outside the page's CSP):
# records each state of the job panel, and every CSP violation the browser reports.
RECORDER = """
window.__snapshots = [];
window.__violations = [];
document.addEventListener("securitypolicyviolation", (e) => {
  window.__violations.push(`${e.violatedDirective} ${e.blockedURI}`);
});
document.addEventListener("DOMContentLoaded", () => {
  const view = document.getElementById("job-view");
  const text = (id) => document.getElementById(id).textContent;
  new MutationObserver(() => {
    window.__snapshots.push({
      id: text("job-id"), status: text("job-status"), progress: document.getElementById("job-progress").value,
      queue: text("job-queue"), eta: text("job-eta"),
    });
  }).observe(view, { subtree: true, childList: true, characterData: true, attributes: true });
});
"""
# Waits run in Playwright's injected script (page.wait_for_function would eval a string, which
# the page's CSP forbids); evaluate runs over the DevTools protocol, outside the page's CSP.
VIDEO_DURATION = """() => new Promise((resolve) => {
  const video = document.getElementById("player");
  if (video.readyState >= 1) resolve(video.duration);
  else video.addEventListener("loadedmetadata", () => resolve(video.duration), { once: true });
})"""

# The control for the CSP checks: an inline script, which the page's CSP must block and report.
INLINE_SCRIPT = """() => new Promise((resolve) => {
  document.addEventListener("securitypolicyviolation", (e) => resolve(e.violatedDirective), { once: true });
  const script = document.createElement("script");
  script.textContent = "window.__inlineRan = true";
  document.body.append(script);
})"""


@pytest.fixture(scope="module")
def browser() -> Iterator:
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def serve(tiny_model_dir: Path, tmp: Path, *flags: str) -> ServerProcess:
    # One job on the worker at a time, so a second job waits in the queue (its position shows).
    flags = ("--output-dir", str(tmp / "out"), "--max-width", str(MAX_WIDTH), "--max-running-per-worker", "1", *flags)
    return ServerProcess(tiny_model_dir, *flags, log=tmp / "server.log")


@pytest.fixture(scope="module")
def open_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(tiny_model_dir, tmp_path_factory.mktemp("playground_open")) as server:
        yield server


@pytest.fixture(scope="module")
def keyed_server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with serve(tiny_model_dir, tmp_path_factory.mktemp("playground_keyed"), "--api-key", KEY) as server:
        yield server


class Page:
    """A browser tab on the playground, with what its console said."""

    def __init__(self, browser, url: str) -> None:
        self.context = browser.new_context(accept_downloads=True, viewport={"width": 1200, "height": 1000})
        self.context.set_default_timeout(WAIT_MS)
        self.page = self.context.new_page()
        self.console_errors: list[str] = []
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.page.add_init_script(RECORDER)
        self.page.goto(url)

    def wait_ready(self) -> None:
        """The server's settings are in the form (its fieldset, and so each field, is enabled only then)."""
        expect(self.page.locator("#prompt")).to_be_enabled()

    def submit(self, prompt: str, **fields: int) -> str:
        """Fill the form, press Generate; the id of the job the panel then shows."""
        before = self.page.locator("#job-id").text_content()
        self.page.fill("#prompt", prompt)
        for name, value in fields.items():
            self.page.fill(f"#{name}", str(value))
        self.page.click("#submit")
        expect(self.page.locator("#job-id")).not_to_have_text(before)
        return self.page.locator("#job-id").text_content()

    def wait_status(self, status: str) -> None:
        """Until the panel shows `status`, or a final one (a failed job fails here at once, with its error)."""
        shown = self.page.locator("#job-status")
        expect(shown).to_have_text(re.compile(f"^({status}|completed|failed|cancelled)$"))
        assert shown.text_content() == status, self.page.locator("#job-error").text_content()

    def snapshots(self, job_id: str) -> list[dict]:
        return [s for s in self.page.evaluate("window.__snapshots") if s["id"] == job_id]

    def video_duration(self) -> float:
        """The player's duration once its metadata has loaded."""
        self.page.locator("#player").wait_for(state="visible")  # shown once the MP4 is downloaded
        return self.page.evaluate(VIDEO_DURATION)

    def violations(self) -> list[str]:
        return self.page.evaluate("window.__violations")

    def screenshot(self, name: str) -> None:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=ARTIFACTS / name, full_page=True)

    def close(self) -> None:
        self.context.close()


def api(server: ServerProcess, key: str | None = None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=server.url, timeout=60, headers=headers)


def check_video(tab: Page, server: ServerProcess, job_id: str, frames: int, fps: int, key: str | None = None) -> None:
    """The player plays frames / fps seconds (within one frame), and the download link saves the
    very MP4 that `/content` serves."""
    assert tab.video_duration() == pytest.approx(frames / fps, abs=1 / fps)
    with api(server, key) as client:
        job = client.get(f"/v1/videos/{job_id}").json()
        mp4 = client.get(f"/v1/videos/{job_id}/content").content
    assert job["status"] == "completed" and job["progress"] == 100
    assert job["seconds"] == f"{frames / fps:g}"
    with tab.page.expect_download() as download:
        tab.page.click("#download")
    assert download.value.suggested_filename == f"{job_id}.mp4"
    assert Path(download.value.path()).read_bytes() == mp4


def test_page_headers_and_markup(open_server: ServerProcess) -> None:
    """The page and its files carry the strict CSP; the markup holds no inline script or style
    (the CSP would block it: the browser tests below would see the violation)."""
    with api(open_server) as client:
        page = client.get("/")
        assets = [client.get(f"/playground/playground.{ext}") for ext in ("js", "css")]
    for response in (page, *assets):
        assert response.status_code == 200
        assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["x-content-type-options"] == "nosniff"
    assert "unsafe-inline" not in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    assert page.headers["content-type"].startswith("text/html")
    assert [a.headers["content-type"].split(";")[0] for a in assets] == ["text/javascript", "text/css"]
    html = page.text
    assert re.search(r"<script(?![^>]*\bsrc=)", html) is None  # every script is a file of this origin
    assert "<style" not in html and re.search(r"\sstyle=", html) is None
    assert re.search(r"\son[a-z]+=", html) is None  # no inline event handlers


def test_generate_watch_and_cancel(browser, open_server: ServerProcess) -> None:
    tab = Page(browser, open_server.url)
    try:
        tab.wait_ready()
        # The form holds the server's bounds and the checkpoint's defaults (tiny: 64x64, 9 frames, 16 fps).
        with api(open_server) as client:
            settings = client.get("/playground/settings").json()
        assert tab.page.get_attribute("#width", "max") == str(MAX_WIDTH) == str(settings["bounds"]["width"][1])
        assert tab.page.input_value("#num_frames") == str(settings["defaults"]["num_frames"]) == "9"
        assert tab.page.input_value("#fps") == "16"

        # 1. A job that takes a few seconds: progress climbs to 100, then the video plays.
        frames, fps = 17, 8
        done_id = tab.submit("sleep:3", width=48, height=32, num_frames=frames, fps=fps, num_inference_steps=6)
        tab.wait_status("completed")
        progress = [s["progress"] for s in tab.snapshots(done_id)]
        assert progress[-1] == 100 and progress == sorted(progress), progress
        assert any(0 < p < 100 for p in progress), f"no progress seen between 0 and 100: {progress}"
        assert any(s["eta"].startswith("About ") for s in tab.snapshots(done_id) if s["status"] == "in_progress")
        check_video(tab, open_server, done_id, frames, fps)
        tab.screenshot("completed.png")

        # 2. A long job runs; a second one waits behind it (its queue position shows) and is cancelled.
        running_id = tab.submit("sleep:120", width=32, height=32, num_frames=5, num_inference_steps=40)
        tab.wait_status("in_progress")
        queued_id = tab.submit("sleep:120", width=32, height=32, num_frames=5, num_inference_steps=40)
        expect(tab.page.locator("#job-queue")).to_have_text(re.compile(r"^Queue position 1 "))
        assert tab.page.locator("#job-status").text_content() == "queued"
        with api(open_server) as client:  # what the page shows is what the API says: none ahead
            assert client.get(f"/v1/videos/{queued_id}").json()["queue_position"] == 0
        tab.screenshot("queued.png")
        tab.page.click("#cancel")
        tab.wait_status("cancelled")

        # 3. The recent-jobs list: the completed job and the running one; the running one is cancelled from there.
        row = tab.page.locator(f"#jobs-body tr[data-id='{running_id}']")
        row.wait_for()
        assert tab.page.locator(f"#jobs-body tr[data-id='{done_id}'] td").nth(4).text_content() == "completed"
        row.get_by_role("button", name="Cancel").click()
        row.wait_for(state="detached")
        assert tab.page.locator(f"#jobs-body tr[data-id='{queued_id}']").count() == 0
        with api(open_server) as client:
            for gone in (queued_id, running_id):
                assert client.get(f"/v1/videos/{gone}").status_code == 404
            listed = [j["id"] for j in client.get("/v1/videos").json()["data"]]
        assert listed == [done_id]
        assert tab.console_errors == [] and tab.violations() == []
    finally:
        tab.close()


def test_with_an_api_key(browser, keyed_server: ServerProcess) -> None:
    """The page loads without a key, asks for one, and with it typed in works as without keys."""
    with httpx.Client(base_url=keyed_server.url) as anonymous:
        assert anonymous.get("/").status_code == 200
        assert anonymous.get("/playground/settings").status_code == 401
    tab = Page(browser, keyed_server.url)
    try:
        tab.page.locator("#notice").wait_for()
        assert "API key" in tab.page.locator("#notice").text_content()
        assert tab.page.locator("#prompt").is_disabled() and tab.page.locator("#submit").is_disabled()
        # The page's one failed call so far: its settings, refused without a key.
        assert len(tab.console_errors) == 1 and "401" in tab.console_errors[0], tab.console_errors
        tab.console_errors.clear()

        tab.page.fill("#api-key", KEY)
        tab.page.click("#key-form button[type=submit]")
        tab.wait_ready()
        assert tab.page.evaluate("sessionStorage.getItem('reelserve.apiKey')") == KEY
        assert tab.page.locator("#notice").is_hidden()
        frames, fps = 9, 16
        job_id = tab.submit("keyed", width=32, height=32, num_frames=frames, fps=fps, num_inference_steps=2)
        tab.wait_status("completed")
        check_video(tab, keyed_server, job_id, frames, fps, key=KEY)
        tab.page.locator(f"#jobs-body tr[data-id='{job_id}']").wait_for()
        tab.screenshot("keyed.png")
        assert tab.console_errors == [] and tab.violations() == []
        # The checks above can fail: an inline script is blocked, and reported where they look.
        assert tab.page.evaluate(INLINE_SCRIPT).startswith("script-src")
        assert tab.page.evaluate("window.__inlineRan") is None
        assert len(tab.violations()) == 1 and any("Content Security Policy" in e for e in tab.console_errors)
    finally:
        tab.close()
