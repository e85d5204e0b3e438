"""The firmware-style programs in devices/ run as subprocesses against a broker with an acking cloud."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from lepton.testing import PROJECT_ROOT
from tests.device._acker import Acker

DEVICES = PROJECT_ROOT / "devices"


def node(name: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(DEVICES / f"{name}.py"), *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("name", ["camera_node", "folder_node", "sensor_node"])
def test_help(name):
    r = node(name, "--help")
    assert r.returncode == 0 and "--broker" in r.stdout and "usage:" in r.stdout


def run_node(broker, fleet, tmp_path, name, device, *args):
    with Acker(broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        r = node(
            name,
            "--broker",
            broker.url("device", device, fleet=fleet),
            "--fleet",
            fleet,
            "--id",
            device,
            "--spool",
            str(tmp_path / "spool"),
            "--json",
            *args,
        )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), acker


def test_camera_node_on_a_recorded_video(amqtt_broker, fleet, tmp_path):
    video = tmp_path / "rec.avi"
    w = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (80, 60))
    for i in range(6):
        w.write(np.full((60, 80, 3), 30 * i, np.uint8))
    w.release()
    summary, acker = run_node(
        amqtt_broker, fleet, tmp_path, "camera_node", "cam-1", "--video", str(video), "--limit", "10"
    )
    assert summary["captured"] == summary["acked"] == 10  # 6 frames, replayed
    assert acker.seqs("cam-1") == set(range(10)) and acker.shapes == {("float32", (1, 32, 32))}


def test_folder_node_publishes_labelled_images_once(amqtt_broker, fleet, tmp_path):
    for label in ("ok", "scratch"):
        (tmp_path / "imgs" / label).mkdir(parents=True)
        for i in range(3):
            cv2.imwrite(str(tmp_path / "imgs" / label / f"{i}.png"), np.full((40, 40, 3), 50 * i, np.uint8))
    summary, acker = run_node(
        amqtt_broker, fleet, tmp_path, "folder_node", "seed-1", "--folder", str(tmp_path / "imgs")
    )
    assert summary["captured"] == summary["acked"] == 6 and summary["stopped_by"] == "source ended"
    assert sorted(acker.labels["seed-1"].values()) == ["ok"] * 3 + ["scratch"] * 3


@pytest.mark.mosquitto
def test_sensor_node_fft_features_separate_faults(mosquitto_broker, fleet, tmp_path):
    summary, acker = run_node(mosquitto_broker, fleet, tmp_path, "sensor_node", "vib-1", "--limit", "40")
    assert summary["captured"] == summary["acked"] == 40
    assert acker.shapes == {("float32", (1, 64))}
    assert set(acker.labels["vib-1"].values()) == {"ok", "fault"}
    sys.path.insert(0, str(DEVICES))
    try:
        from sensor_node import BINS, RATE_HZ, WINDOW, vibration_source
    finally:
        sys.path.remove(str(DEVICES))
    # The features carry the physics: the 157 Hz bin is clearly louder in fault windows.
    k = int(157 / (RATE_HZ / WINDOW) / 2)
    gen = vibration_source(seed=3)
    pairs = [next(gen) for _ in range(200)]
    fault = np.mean([x[0, k] for x, y in pairs if y == "fault"])
    ok = np.mean([x[0, k] for x, y in pairs if y == "ok"])
    assert k < BINS and fault > ok + 0.5
