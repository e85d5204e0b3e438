"""Issue 11 item 3, across the rooms: on the topic prefix ``acme/site-3/lepton`` a real device agent, the
ingest worker, its training child (train + publish), ``lepton serve`` and ``lepton status`` work together on one broker
(Mosquitto with the project's config and ``broker/add-user.sh --prefix``): the device's samples are
stored once and acknowledged, a signed model is published and served by the device, and status lists it.

The prefix reaches each process a different way, as deployments do: the worker reads ``$LEPTON_PREFIX``,
the device and status get ``--prefix``, the training child gets it from the worker. Every user's ACL
grants cover only ``acme/site-3/lepton/FLEET/...``, so a process on the default prefix would get nothing.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lepton.cli import _exit
from lepton.cloud import Dataset, Registry
from lepton.protocol import generate_keypair
from lepton.testing import PROJECT_ROOT

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]

PREFIX = "acme/site-3/lepton"
LEPTON = [sys.executable, "-m", "lepton"]


def _status(url: str, fleet: str) -> dict:
    out = subprocess.run([*LEPTON, "status", "--prefix", PREFIX, "--fleet", fleet, "--json",
                          "--timeout", "2"], env=dict(os.environ, LEPTON_BROKER=url), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == _exit.OK, out.stderr
    return json.loads(out.stdout)


def _wait_status(url: str, fleet: str, predicate, what: str, timeout: float) -> dict:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while True:
        snapshot = _status(url, fleet)
        if predicate(snapshot):
            return snapshot
        if time.monotonic() > deadline:
            raise AssertionError(f"lepton status never showed {what} within {timeout:.0f}s: {snapshot}")
        time.sleep(0.5)


def _wait_training_done(url: str, fleet: str, worker: str, timeout: float = 180) -> None:
    def runs(snapshot: dict) -> int | None:
        row = next((w["summary"] for w in snapshot["workers"] if w["worker"] == worker), {})
        return row.get("train_runs") if row.get("train_running") is False else None

    deadline = time.monotonic() + timeout
    before = None
    while time.monotonic() < deadline:
        now = runs(_status(url, fleet))
        if now is not None and now == before:
            return
        before = now
        time.sleep(2)
    raise AssertionError(f"worker {worker} kept training for {timeout:.0f}s")


def _device(snapshot: dict, name: str) -> dict:
    return next((d for d in snapshot["devices"] if d["device"] == name), {})


def test_device_worker_training_and_status_work_on_a_custom_prefix(mosquitto_broker, fleet, tmp_path):
    b = mosquitto_broker
    data = tmp_path / "data"
    data.mkdir()
    private, public = generate_keypair(tmp_path / "keys")
    viewer = b.url("viewer", "v1", fleet=fleet, prefix=PREFIX)
    worker_log = open(tmp_path / "worker.log", "wb")  # noqa: SIM115 - closed below
    worker = subprocess.Popen(
        [*LEPTON, "worker", "--fleet", fleet, "--data", str(data), "--name", "w1", "--quiet",
         "--model", "digits", "--key", str(private), "--train-every", "300", "--train-publish",
         "--train-broker", b.url("trainer", "t1", fleet=fleet, prefix=PREFIX), "--train-arg=--epochs=2"],
        env=dict(os.environ, LEPTON_BROKER=b.url("worker", "w1", fleet=fleet, prefix=PREFIX),
                 LEPTON_PREFIX=PREFIX, OMP_NUM_THREADS="1"),
        stdout=worker_log, stderr=subprocess.STDOUT, cwd=PROJECT_ROOT)
    device_cmd = [*LEPTON, "device", "--prefix", PREFIX, "--fleet", fleet, "--id", "cam-1",
                  "--spool", str(tmp_path / "spool"), "--source", "digits", "--ack-timeout", "3", "--json",
                  "--quiet"]
    device_env = dict(os.environ, LEPTON_BROKER=b.url("device", "cam-1", fleet=fleet, prefix=PREFIX))
    device = serve = None
    try:
        _wait_status(viewer, fleet, lambda s: any(w.get("worker") == "w1" and w.get("online")
                                                  for w in s["workers"]), "worker w1 online", 30)
        # 1. samples: exactly --train-every of them, stored and acknowledged; the worker starts training
        first = subprocess.run([*device_cmd, "--limit", "300"], env=device_env, capture_output=True,
                               text=True, timeout=120)
        # 2. the model: the device runs again, slowly (no second training), until status shows it serving;
        # it escalates half its samples to a `lepton serve` worker on the same prefix.
        serve = subprocess.Popen(
            [*LEPTON, "serve", "--prefix", PREFIX, "--fleet", fleet, "--model", "digits", "--name", "s1",
             "--public-key", str(public), "--quiet"],
            env=dict(os.environ, LEPTON_BROKER=b.url("worker", "s1", fleet=fleet, prefix=PREFIX)),
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        device = subprocess.Popen(
            [*device_cmd, "--rate", "5", "--model", "digits", "--public-key", str(public),
             "--telemetry-interval", "1", "--escalate-rate", "0.5", "--answer-timeout-ms", "2000"],
            env=device_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        served = _wait_status(viewer, fleet, lambda s: (_device(s, "cam-1").get("model_version") or 0) >= 1,
                              "cam-1 serving a model", 180)
        time.sleep(4)  # a few escalations answered by the serve worker
        device.send_signal(signal.SIGINT)
        out, err = device.communicate(timeout=60)
        # A retrain started meanwhile finishes before the worker stops: idle twice, 2 s apart, same runs.
        _wait_training_done(viewer, fleet, "w1")
    finally:
        for proc in (device, serve, worker):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
        worker_log.close()

    assert first.returncode == _exit.OK, first.stderr
    before = json.loads(first.stdout)
    assert before["captured"] == before["acked"] == 300 and before["spool_depth"] == 0
    summary = json.loads(out)
    registry = Registry(data)
    published = [v for v in registry.list("digits") if v.status == "published"]
    table = Dataset(data, fleet).read_table(columns=["device", "seq"])
    pairs = list(zip(table.column("device").to_pylist(), table.column("seq").to_pylist(), strict=True))

    # the device: every captured sample acknowledged, the published model served
    assert device.returncode == _exit.OK, err
    assert summary["captured"] == summary["acked"] and summary["spool_depth"] == 0
    assert summary["model_version"] in {v.version for v in published}
    # serve, on the same prefix, answered the device's escalations
    assert summary["collaboration"]["answered_by_cloud"] >= 1, summary["collaboration"]
    # the worker: each acknowledged sample stored exactly once, no more
    acked = before["acked"] + summary["acked"]
    assert len(pairs) == len(set(pairs)) == acked
    assert set(pairs) == {("cam-1", seq) for seq in range(acked)}
    # training + publishing went to the custom prefix (what the registry recorded)
    assert published and all(v.report["publication"]["prefix"] == PREFIX for v in published)
    assert registry.deployments("digits")[fleet]["prefix"] == PREFIX
    # status, on the same prefix, listed the device with a published model
    assert _device(served, "cam-1")["model_version"] in {v.version for v in published}
    assert worker.returncode == _exit.OK
