"""cloud_workers/trainer.py, run as the deployable program it is (a separate process)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lepton.cloud import Registry, fetch_model
from lepton.testing import PROJECT_ROOT


@pytest.mark.slow
def test_trainer_worker_retrains_once_enough_new_samples_arrived(amqtt_broker, fleet, digits_dir, keypair):
    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    cmd = [
        sys.executable,
        str(PROJECT_ROOT / "cloud_workers" / "trainer.py"),
        "--data",
        str(digits_dir),
        "--fleet",
        fleet,
        "--model",
        "digits",
        "--broker",
        url,
        "--key",
        str(keypair[0]),
        "--epochs",
        "5",
        "--min-new",
        "500",
        "--trusted-devices",
        "dev-0,dev-1",
        "--once",
    ]

    first = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
    second = subprocess.run(cmd, capture_output=True, text=True, timeout=180)  # nothing new: no retrain

    assert first.returncode == 0, first.stderr[-2000:]
    assert second.returncode == 0, second.stderr[-2000:]
    assert "nothing to do" in second.stderr
    assert "on trusted-devices" in first.stderr and "UNTRUSTED" not in first.stderr
    assert Registry(digits_dir).versions("digits") == [1]
    package = fetch_model(url, fleet, "digits", keypair[1])
    assert package.manifest.version == 1 and package.manifest.metrics["val_accuracy"] >= 0.95
