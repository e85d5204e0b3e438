"""Multi-process training: Lightning DDP, 2 processes on CPU (gloo), publishing to a real broker.

Each run is ``python -m lepton train --devices 2 --strategy ddp`` in a subprocess, exactly the README's
command: Lightning starts the second rank with the same command line, so the test process itself
never joins a process group.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lepton.cloud import Registry, fetch_model
from lepton.protocol import BrokerURL, Topics, connect, new_client, parse_manifest

pytestmark = [pytest.mark.slow, pytest.mark.mosquitto]

ROOT = Path(__file__).resolve().parents[2]
EPOCHS = 2
TIMEOUT_S = 300  # a hang (a rank waiting for rank zero forever) fails the test instead of blocking CI


def _ddp_train(
    data: Path, fleet: str, *extra: str, env: dict[str, str], epochs: int = EPOCHS
) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "lepton", "train",
        "--data", str(data), "--fleet", fleet, "--model", "digits",
        "--epochs", str(epochs), "--devices", "2", "--strategy", "ddp", "--accelerator", "cpu",
        "--json", *extra,
    ]
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    child_env = {**os.environ, **env, "PYTHONPATH": path}
    # No torch thread pool per rank bigger than the machine: 2 ranks x 1 thread on a 2-core box.
    child_env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=TIMEOUT_S, cwd=ROOT)


class _ManifestCounter:
    """Counts every manifest PUBLISH the broker forwards for one model, live, during the run."""

    def __init__(self, url: str, fleet: str) -> None:
        self.topic = Topics(fleet=fleet).model("digits")
        self.versions: list[int] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._url = BrokerURL.parse(url)
        self._client = new_client(self._url, client_id="probe-manifests")
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *a: self._subscribed.set()

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        if msg.topic == self.topic and msg.payload:
            with self._lock:
                self.versions.append(parse_manifest(bytes(msg.payload))[0].version)

    def __enter__(self) -> _ManifestCounter:
        connect(self._client, self._url)
        self._client.subscribe(self.topic, qos=1)
        assert self._subscribed.wait(10), "no SUBACK for the manifest probe"
        return self

    def __exit__(self, *exc: object) -> None:
        self._client.disconnect()
        self._client.loop_stop()


def test_two_ddp_processes_train_and_publish_exactly_one_version(
    mosquitto_broker, fleet, digits_dir, keypair
):
    private, public = keypair
    url = mosquitto_broker.url("worker", "trainer", fleet=fleet)
    probe_url = mosquitto_broker.url("device", "dev-probe", fleet=fleet)

    with _ManifestCounter(probe_url, fleet) as manifests:
        run = _ddp_train(digits_dir, fleet, "--publish", "--key", str(private), env={"LEPTON_BROKER": url})
        # every rank has exited; a late subscriber's round trip also lets the probe drain its queue
        late = mosquitto_broker.url("device", "dev-late", fleet=fleet)
        fetched = fetch_model(late, fleet, "digits", public)

    assert run.returncode == 0, run.stderr[-3000:]
    # one report on stdout: only rank zero prints
    report = json.loads(run.stdout)
    assert report["status"] == "published" and report["version"] == 1
    assert report["training"]["world_size"] == 2
    assert report["training"]["strategy"] == "ddp"
    # both ranks trained (Lightning logs each one joining), only rank zero printed the epoch lines
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in run.stderr and "GLOBAL_RANK: 1, MEMBER: 2/2" in run.stderr
    assert run.stderr.count(f"lepton train: epoch 1/{EPOCHS}") == 1
    # exactly one version directory in the registry, and it is what rank zero reported
    version_dirs = sorted(p.name for p in (digits_dir / "models" / "digits").iterdir() if p.is_dir())
    assert version_dirs == ["1"]
    stored = Registry(digits_dir).get("digits", 1)
    assert stored.report["training"]["world_size"] == 2
    # exactly one manifest published, and the retained one is that version, signed, with its bytes
    assert manifests.versions == [1]
    assert fetched.manifest.version == 1 and fetched.signed_by is not None
    assert fetched.data == stored.data()


def test_a_failure_on_rank_zero_stops_every_rank(mosquitto_broker, fleet, digits_dir, keypair):
    from lepton.broker import free_port

    # rank zero trains, exports and stores the version, then cannot reach the broker to publish
    dead = BrokerURL.parse(mosquitto_broker.url("worker", "trainer", fleet=fleet))
    unreachable = f"mqtt://{dead.username}:{dead.password}@127.0.0.1:{free_port()}"

    # one epoch and fp32 only: what matters here is what happens after training
    run = _ddp_train(
        digits_dir, fleet, "--no-quantize", "--publish", "--key", str(keypair[0]),
        env={"LEPTON_BROKER": unreachable}, epochs=1,
    )

    assert run.returncode == 3, run.stderr[-3000:]  # rank zero's own error: broker unreachable
    assert "cannot reach broker" in run.stderr
    # rank 1 did not wait for a broadcast that never comes: it was told, and says so in one line
    assert "gate, registry and publish failed on global rank 0 (this is rank 1)" in run.stderr
    assert "BrokerConnectionError" in run.stderr
    # the version stays on disk once, marked, for `lepton models publish`
    version_dirs = sorted(p.name for p in (digits_dir / "models" / "digits").iterdir() if p.is_dir())
    assert version_dirs == ["1"]
    assert Registry(digits_dir).get("digits", 1).report["status"] == "publish_failed"
