"""End to end with the real device agent: a device (lepton device, digits source, OpenCV pipeline,
SQLite spool) and the ingest worker (lepton worker) on Mosquitto, the broker restarted mid-run. The
device's spool drains to 0 only through the worker's end-to-end acks, and the dataset holds every
sample exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from lepton.cli import _exit
from lepton.cloud import Dataset
from tests.cloud._ingest_support import start_worker_process, stop_process, wait_status


@pytest.mark.mosquitto
@pytest.mark.slow
def test_device_and_worker_survive_a_broker_restart(mosquitto_broker, fleet, tmp_path):
    b = mosquitto_broker
    data = tmp_path / "data"
    data.mkdir()
    worker = start_worker_process(b.url("worker", "w1", fleet=fleet), fleet, data, name="w1")
    wait_status(b.url("viewer", "v1", fleet=fleet), fleet, "w1", lambda s: s.get("online") is True)
    device = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lepton",
            "device",
            "--broker",
            b.url("device", "cam-1", fleet=fleet),
            "--fleet",
            fleet,
            "--id",
            "cam-1",
            "--spool",
            str(tmp_path / "spool"),
            "--source",
            "digits",
            "--rate",
            "250",
            "--limit",
            "2000",
            "--ack-timeout",
            "3",
            "--json",
            "--quiet",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ds = Dataset(data, fleet)
        deadline = time.monotonic() + 60
        while ds.count() < 300 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ds.count() >= 300
        b.stop()  # broker down while the device keeps capturing into its spool
        time.sleep(3)
        b.start()
        out, err = device.communicate(timeout=150)
    finally:
        if device.poll() is None:
            device.kill()
        rc = stop_process(worker)

    summary = json.loads(out)
    assert device.returncode == _exit.OK, err
    assert summary["captured"] == summary["acked"] == 2000 and summary["spool_depth"] == 0
    assert rc == 0
    t = Dataset(data, fleet).read_table(columns=["device", "seq", "label", "pipeline"])
    pairs = list(zip(t.column("device").to_pylist(), t.column("seq").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 2000
    assert {s for _, s in pairs} == set(range(2000)) and {d for d, _ in pairs} == {"cam-1"}
    assert t.column("label").null_count == 0 and len(set(t.column("pipeline").to_pylist())) == 1
