"""The evaluation report's plots render in the Prefect UI: a real `prefect server start` (with its UI),
the report artifact published the way the evaluate flow publishes it, and headless Chromium (Debian's
package, driven through chromedriver by selenium) opening the artifact's page and checking that every
image loaded (``naturalWidth > 0``). A report with relative image paths — what the UI used to get —
is the control: its images must not load, or the check could not fail.

Run it alone with ``tools/ui_check.sh``; it is skipped where chromium, chromedriver or selenium is missing.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    import selenium  # noqa: F401
    HAVE_SELENIUM = True
except ImportError:
    HAVE_SELENIUM = False

pytestmark = [pytest.mark.ui, pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER and HAVE_SELENIUM),
                                                 reason="needs chromium, chromedriver (Debian: apt-get install chromium "
                                                        "chromium-driver) and selenium")]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1400,2400"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """``prefect server start`` with the UI, its own database, on a free port; yields the base URL."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_SERVER_UI_ENABLED": "true", "PREFECT_UI_API_URL": f"http://127.0.0.1:{port}/api"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port),
                             "--no-services", "--analytics-off"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode(errors="replace")[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/api/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prefect server did not start"
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def _report_files(tmp_path):
    """The report's PNGs, drawn by train/report.py from a small metrics log, on a dataset root."""
    from shardflow.storage import Storage
    from shardflow.train import report

    storage = Storage(str(tmp_path / "root"))
    recs = [{"step": s, "loss": 6 - s / 10, "lr": 1e-3 * min(1, s / 5), "tokens": 512 * s} for s in range(1, 31)]
    pngs = {"loss": report.plot_loss(report.loss_curves(recs)), "lr": report.plot_lr(report.lr_curve(recs)),
            "expert_load": report.plot_expert_load([[10, 30, 20, 40], [25, 25, 25, 25]], [0, 1])}
    files = []
    for key, png in pngs.items():
        ref = f"runs/ui/eval/{report.PLOT_FILES[key]}"
        storage.write_bytes(ref, png)
        files.append(ref)
    md = "# Evaluation of run `ui`\n\n## Plots\n\n" + "\n\n".join(
        f"![{title}]({report.PLOT_FILES[key]})" for title, key in (("Loss", "loss"), ("Learning rate", "lr"),
                                                                   ("Expert load", "expert_load"))) + "\n"
    return storage, md, files


def _artifact_id(api: str, key: str) -> str:
    """The id of the artifact with ``key`` (its page is /artifacts/artifact/<id>)."""
    import json

    body = json.dumps({"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1, "offset": 0}).encode()
    req = urllib.request.Request(f"{api}/artifacts/filter", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        (art,) = json.loads(r.read())
    return art["id"]


def _images_on_page(url: str, expect: int) -> list[dict]:
    """naturalWidth/complete/src-scheme of each image in the artifact's rendered markdown, once it settled."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="shardflow-chromium-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(url)
        deadline = time.monotonic() + 60
        found: list[dict] = []
        while time.monotonic() < deadline:
            # the report's images: the UI's own come from /assets or are inline SVG
            found = driver.execute_script(
                "return Array.from(document.querySelectorAll('img'))"
                ".filter(i => !/^(\\/|https?:)/.test(i.getAttribute('src') || '/'))"
                ".map(i => ({alt: i.getAttribute('alt'), complete: i.complete, w: i.naturalWidth,"
                " scheme: (i.getAttribute('src') || '').split(':')[0]}))")
            if len(found) >= expect and all(i["complete"] for i in found):
                break
            time.sleep(0.5)
        return found
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_report_images_load_in_headless_chromium(ui_server, tmp_path, monkeypatch):
    from shardflow.flows import artifacts

    api = f"{ui_server}/api"
    monkeypatch.setenv("PREFECT_API_URL", api)
    storage, md, files = _report_files(tmp_path)
    pipeline = f"ui{uuid.uuid4().hex[:6]}"
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from prefect import flow

    @flow(name="ui-report")
    def publish():
        artifacts.publish_eval({"report_md": md, "files": files}, "ui", pipeline=pipeline, storage=storage)  # as evaluate does
        artifacts.publish_markdown(f"{pipeline}-relative-paths", md, "control: the report as it is on disk")

    with temporary_settings({PREFECT_API_URL: api}):
        state = publish(return_state=True)
    assert state.is_completed(), state
    inlined = _images_on_page(f"{ui_server}/artifacts/artifact/{_artifact_id(api, f'{pipeline}-eval-report-ui')}", 3)
    assert len(inlined) == 3, inlined
    assert all(i["scheme"] == "data" and i["w"] > 0 for i in inlined), inlined
    control = _images_on_page(f"{ui_server}/artifacts/artifact/{_artifact_id(api, f'{pipeline}-relative-paths')}", 3)
    assert control and all(i["w"] == 0 for i in control), control  # relative paths: broken, as the issue saw
