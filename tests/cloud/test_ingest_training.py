"""The worker's training trigger: after N new labelled samples it starts the real `lepton train` as a
separate process (one at a time), keeps ingesting, logs and reports the exit code, and the published
model can be fetched and verified from the broker."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import psutil
import pytest

from lepton.cloud import Dataset, IngestWorker, WorkerConfig
from lepton.cloud._delivery import fetch_model
from lepton.protocol import Sample, generate_keypair, load_public_key
from tests.cloud._ingest_support import ResendPublisher


def _learnable(first: int, n: int) -> list[Sample]:
    rng = np.random.default_rng(first)
    out = []
    for s in range(first, first + n):
        x = rng.normal(0, 0.1, 16).astype(np.float32)
        x[(s % 4) * 4 : (s % 4 + 1) * 4] += 1.0
        out.append(Sample(seq=s, ts=1.7e9 + s, x=x, y=s % 4))
    return out


@pytest.mark.mosquitto
@pytest.mark.slow
def test_train_every_starts_real_training_and_publishes(mosquitto_broker, fleet, tmp_path, monkeypatch):
    import tests.cloud._ingest_support as support

    monkeypatch.setattr(support, "make_samples", lambda first, count, **kw: _learnable(first, count))
    private, public = generate_keypair(tmp_path / "keys")
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    worker = IngestWorker(
        WorkerConfig(
            broker=url,
            fleet=fleet,
            data=tmp_path / "data",
            name="w1",
            batch_ms=20,
            train_every=400,
            model="m1",
            key=str(private),
            train_publish=True,
            # a user of its own: mosquitto.conf binds client ids to usernames (use_username_as_clientid)
            train_broker=mosquitto_broker.url("trainer", "t1", fleet=fleet),
            train_args=("--epochs", "3", "--quiet"),
        )
    )
    worker.start()
    pub = ResendPublisher(
        mosquitto_broker.url("device", "cam-1", fleet=fleet), fleet, "cam-1", total=1200, per_message=40
    )
    try:
        pub.start()
        pub.run()  # ingest goes on while training runs in its own process
        assert worker.wait_stored(1200, timeout=30)
        deadline = time.monotonic() + 120
        while (worker.stats.train_runs == 0 or worker.stats.train_running) and time.monotonic() < deadline:
            time.sleep(0.2)
        status = worker.status()
    finally:
        pub.stop()
        worker.stop()

    assert status["train_runs"] >= 1 and status["train_last_exit"] == 0, (
        tmp_path / "data" / fleet / "train.log"
    )
    assert Dataset(tmp_path / "data", fleet).count() == 1200
    log = (tmp_path / "data" / fleet / "train.log").read_text()
    assert "m1 v1" in log
    package = fetch_model(url, fleet, "m1", load_public_key(public), timeout=15)
    assert package.manifest.version >= 1


def test_train_command_is_built_from_the_flags(tmp_path):
    cfg = WorkerConfig(
        broker="mqtt://w:pw@127.0.0.1:1883",
        fleet="f1",
        prefix="acme/site-3/lepton",
        data=tmp_path,
        train_every=10,
        model="m1",
        key="k.pem",
        train_publish=True,
        train_args=("--epochs", "2"),
    )
    worker = IngestWorker(cfg)
    cmd = worker.train_command()
    assert cmd[1:5] == ["-m", "lepton", "train", "--data"]
    assert cmd[5:] == [
        str(tmp_path),
        "--fleet",
        "f1",
        "--prefix",
        "acme/site-3/lepton",
        "--model",
        "m1",
        "--publish",
        "--key",
        "k.pem",
        "--epochs",
        "2",
    ]
    # the password never goes in argv (world-readable /proc/PID/cmdline): the child reads its environment
    assert worker.train_environment()["LEPTON_BROKER"] == "mqtt://w:pw@127.0.0.1:1883"
    own = IngestWorker(WorkerConfig(**{**cfg.__dict__, "train_broker": "mqtt://t1:tp@127.0.0.1:1883"}))
    assert own.train_environment()["LEPTON_BROKER"] == "mqtt://t1:tp@127.0.0.1:1883"
    assert "t1" not in " ".join(own.train_command())


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_the_worker_stops_and_reaps_its_trainer(amqtt_broker, fleet, tmp_path, signum):
    """`lepton worker --train-every`: the signal goes to the worker alone (what a supervisor or
    `kill PID` does); the real `lepton train` child it started must not outlive it."""
    from tests.cloud._ingest_support import start_worker_process

    url = amqtt_broker.url("worker", "w1", fleet=fleet)
    data = tmp_path / "data"
    data.mkdir()
    worker = start_worker_process(url, fleet, data, extra=[
        "--train-every", "20", "--model", "m", "--train-arg=--epochs=500"])
    pub = ResendPublisher(amqtt_broker.url("device", "cam-1", fleet=fleet), fleet, "cam-1", total=200,
                          per_message=20)
    trainers: list[psutil.Process] = []
    try:
        pub.start()
        pub.run(timeout=60)
        deadline = time.monotonic() + 30
        while not trainers and time.monotonic() < deadline:
            trainers = [c for c in psutil.Process(worker.pid).children(recursive=True)
                        if "train" in c.cmdline()]
            time.sleep(0.1)
        assert trainers, "the worker never started lepton train"
        assert trainers[0].is_running() and trainers[0].status() != psutil.STATUS_ZOMBIE
        os.kill(worker.pid, signum)  # the worker only, not its process group
        code = worker.wait(60)
    finally:
        pub.stop()
        if worker.poll() is None:
            worker.kill()
            worker.wait()
        survivors = [t for t in trainers if _alive(t)]
        for t in survivors:
            t.kill()
    assert code == 0
    assert survivors == [], [t.cmdline() for t in survivors]


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
