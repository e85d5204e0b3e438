"""The dashboard in a real browser: Debian's chromium driven by Playwright, against real components.

Mosquitto, an ingest worker process (`lepton worker`), two device processes (`lepton device`, digits
source, signed-model hot-swap) and the dashboard. The page must show both devices, the new model
version on each after a hot-swap, a dead letter after a bad payload, a device's `<script>` model
error as text, and a device going offline by its Last Will (its process killed). The screenshot is
saved in the test's tmp dir; set LEPTON_DASHBOARD_SCREENSHOT=PATH to copy it there as well (the
README's picture is made that way: docs/dashboard.png).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lepton.protocol import BrokerURL, Topics, build_package, connect, encode_json, new_client
from tests.conftest import missing_component
from tests.cloud._ingest_support import start_worker_process, stop_process
from tests.device.test_hotswap_agent import linear_onnx
from tests.device.test_runtime import Publisher, make_keys

CHROMIUM = "/usr/bin/chromium"
MODEL = "digits"

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


@pytest.fixture
def browser():
    """Chromium via Playwright: skipped without them, a failure in CI (LEPTON_REQUIRE_MOSQUITTO=1)."""
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing.append("playwright (pip install playwright; never `playwright install`)")
    if not os.path.exists(CHROMIUM):
        missing.append(f"{CHROMIUM} (apt-get install -y chromium)")
    if missing:
        missing_component("the browser test needs " + " and ".join(missing))
    pytest.importorskip("aiohttp")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _device(broker, fleet: str, name: str, spool: Path, pub_key: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lepton", "device", "--fleet", fleet, "--id", name, "--source", "digits",
           "--rate", "25", "--spool", str(spool), "--telemetry-interval", "0.5", "--model", MODEL,
           "--public-key", str(pub_key), "--quiet"]
    env = dict(os.environ, LEPTON_BROKER=broker.url("device", name, fleet=fleet))
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _client(url: str, name: str):
    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=name)
    connect(client, parsed)
    return client


def test_dashboard_in_chromium(browser, mosquitto_broker, fleet, tmp_path):
    from lepton.dashboard import DashboardServer
    from lepton.device import Pipeline

    b = mosquitto_broker
    private, _public, _other, pub_path = make_keys(tmp_path)
    pipeline = Pipeline.from_preset("digits")
    spec = {"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"}
    rng = np.random.default_rng(0)

    def pkg(version: int):
        onnx = linear_onnx(rng.normal(0, 0.1, (64, 10)), np.zeros(10))
        return build_package(fleet=fleet, name=MODEL, version=version, data=onnx, input_spec=spec,
                             labels=[str(i) for i in range(10)], metrics={"val_accuracy": 0.5 + version / 10},
                             pipeline={"hash": pipeline.hash, "spec": pipeline.spec}, private_key=private,
                             chunk_size=4096, parent=version - 1 if version > 1 else None)

    publisher = Publisher(b.url("worker", "cloud", fleet=fleet), fleet)
    publisher.publish(1, *pkg(1))  # retained before the devices start: they serve v1 at once
    data = tmp_path / "data"
    data.mkdir()
    worker = start_worker_process(b.url("worker", "w1", fleet=fleet), fleet, data, name="w1")
    devices = {name: _device(b, fleet, name, tmp_path / name, pub_path) for name in ("cam-1", "cam-2")}
    server = DashboardServer(b.url("viewer", "viewer", fleet=fleet), fleet, port=0, push_s=0.2, sample_s=0.5)
    server.start()
    page = browser.new_page(viewport={"width": 1400, "height": 1100})
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        page.goto(server.url)
        row = {name: page.locator(f'#devices tr[data-device="{name}"]') for name in devices}

        # both devices, online, serving v1
        for name in devices:
            page.wait_for_selector(f'#devices tr[data-device="{name}"][data-version="1"][data-online="true"]',
                                   timeout=60_000)
            assert row[name].locator("td").nth(1).inner_text() == "yes"
        page.wait_for_selector('#workers tr[data-worker="w1"]', timeout=30_000)

        # hot-swap: v2 on each device, and the rollout bar counts both on v2
        publisher.publish(2, *pkg(2))
        for name in devices:
            page.wait_for_selector(f'#devices tr[data-device="{name}"][data-version="2"]', timeout=60_000)
            assert f"{MODEL} v2" in row[name].inner_text()
        page.wait_for_function(
            "() => document.querySelector('#models tr[data-model=\"digits\"]')?.innerText.includes('v2: 2')",
            timeout=10_000)

        # a bad payload: the worker dead-letters it, the page lists it with its device
        bad = _client(b.url("device", "bad-1", fleet=fleet), "bad-1")
        bad.publish(Topics(fleet=fleet).samples("bad-1"), b"\x00 not msgpack", qos=1).wait_for_publish(10)
        page.wait_for_function("() => [...document.querySelectorAll('#dead tbody tr')]"
                               ".some(tr => tr.innerText.includes('bad-1'))", timeout=30_000)

        # untrusted text: a <script> in a device's model_error is shown, never run
        evil = _client(b.url("device", "evil-1", fleet=fleet), "evil-1")
        script = "<script>window.pwned = 1</script><img src=x onerror=\"window.pwned = 2\">"
        evil.publish(Topics(fleet=fleet).status("evil-1"), encode_json(
            {"device": "evil-1", "online": True, "model": MODEL, "model_version": None,
             "model_error": {"reason": "bad_signature", "message": script}}), qos=1, retain=True
        ).wait_for_publish(10)
        cell = page.locator('#devices tr[data-device="evil-1"] td.error')
        cell.wait_for(timeout=10_000)
        page.wait_for_function("() => document.querySelector('#devices tr[data-device=\"evil-1\"] td.error')"
                               ".innerText.includes('pwned')", timeout=10_000)
        assert cell.inner_text() == f"bad_signature: {script}"
        assert page.evaluate("() => window.pwned") is None
        assert page.locator("#devices script, #devices img").count() == 0

        # the Last Will: cam-2's process dies without a DISCONNECT, the broker says it is offline
        devices["cam-2"].kill()
        devices["cam-2"].wait(10)
        page.wait_for_selector('#devices tr[data-device="cam-2"][data-online="false"]', timeout=30_000)
        assert row["cam-2"].locator("td").nth(1).inner_text() == "no"
        assert row["cam-1"].locator("td").nth(1).inner_text() == "yes"

        # the worker's row follows its retained status: stored samples and the dead letter it counted
        stored = page.locator('#workers tr[data-worker="w1"] td').nth(4)
        page.wait_for_function("() => Number(document.querySelectorAll('#workers tr[data-worker=\"w1\"] td')[4]"
                               ".innerText) > 0", timeout=20_000)
        assert int(stored.inner_text()) > 0
        page.wait_for_function("() => document.querySelectorAll('#c-acc polyline').length > 0", timeout=20_000)
        assert errors == [] and page.evaluate("() => window.leptonPage.updates") > 0
        shot = tmp_path / "dashboard.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        if os.environ.get("LEPTON_DASHBOARD_SCREENSHOT"):
            shutil.copyfile(shot, os.environ["LEPTON_DASHBOARD_SCREENSHOT"])
        print(f"screenshot: {shot}")
        bad.disconnect()
        evil.disconnect()
    finally:
        page.close()
        server.stop()
        for proc in devices.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in devices.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop_process(worker)
        publisher.close()
