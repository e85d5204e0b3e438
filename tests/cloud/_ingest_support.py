"""Test-side helpers for the ingest tests: a resend-until-acked publisher (the device agent's contract,
built here from paho + encode_samples so these tests do not depend on lepton.device) and worker
processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from lepton.errors import ProtocolError
from lepton.protocol import BrokerURL, Sample, Topics, connect, decode_acks, encode_samples, new_client

REPO = Path(__file__).resolve().parents[2]


def make_samples(first: int, count: int, *, size: int = 16, labelled: bool = True) -> list[Sample]:
    return [
        Sample(seq=s, ts=1.7e9 + s, x=np.full(size, s % 251, np.float32), y=(s % 10) if labelled else None)
        for s in range(first, first + count)
    ]


class ResendPublisher:
    """Publishes seqs [0, total) of one device in envelopes of ``per_message`` samples (QoS 1) and
    resends every envelope whose seqs are not all acked within ``resend_after`` seconds, until every
    seq is acked: what a device agent's spool does."""

    def __init__(
        self,
        url: str,
        fleet: str,
        device: str,
        *,
        total: int,
        per_message: int = 100,
        resend_after: float = 3.0,
        pipeline: str | None = "p0",
        first: int = 0,
    ) -> None:
        self.url = BrokerURL.parse(url)
        self.topics = Topics(fleet=fleet)
        self.device = device
        self.per_message = per_message
        self.resend_after = resend_after
        self.pipeline = pipeline
        self.seqs = list(range(first, first + total))
        self.acked: set[int] = set()
        self.lock = threading.Lock()
        self.sent_messages = 0
        self.client = new_client(self.url, client_id=f"pub-{device}", clean_session=False, max_inflight=100)
        self.client.on_connect = lambda c, *a: c.subscribe(self.topics.acks(device), qos=1)
        self.client.on_message = self._on_ack

    def _on_ack(self, client, userdata, msg) -> None:  # noqa: ANN001
        # What a device does: anything that is not an acks payload on its own acks topic is ignored
        # (an exception here would keep paho from sending the PUBACK, and the broker would stall).
        if msg.topic != self.topics.acks(self.device):
            return
        try:
            ranges = decode_acks(msg.payload)
        except ProtocolError:
            return
        with self.lock:
            for a, b in ranges:
                self.acked.update(range(a, b + 1))

    def start(self) -> None:
        connect(self.client, self.url)

    def unacked(self) -> list[int]:
        with self.lock:
            return [s for s in self.seqs if s not in self.acked]

    def publish(self, seqs: list[int]) -> None:
        for i in range(0, len(seqs), self.per_message):
            chunk = seqs[i : i + self.per_message]
            payload = encode_samples(
                self.device, [make_samples(s, 1)[0] for s in chunk], pipeline=self.pipeline
            )
            self.client.publish(self.topics.samples(self.device), payload, qos=1)
            self.sent_messages += 1

    def run(self, *, pace: float = 0.0, timeout: float = 120.0, on_progress=None) -> None:  # noqa: ANN001
        """Publish everything once (``on_progress(i)`` after message i), then resend until all acked."""
        for i in range(0, len(self.seqs), self.per_message):
            self.publish(self.seqs[i : i + self.per_message])
            if on_progress is not None:
                on_progress(i // self.per_message)
            if pace:
                time.sleep(pace)
        deadline = time.monotonic() + timeout
        last_send = time.monotonic()
        while time.monotonic() < deadline:
            left = self.unacked()
            if not left:
                return
            time.sleep(0.05)
            if time.monotonic() - last_send >= self.resend_after and self.client.is_connected():
                self.publish(self.unacked())
                last_send = time.monotonic()
        raise AssertionError(f"{len(self.unacked())} samples never acked")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def start_worker_process(
    url: str,
    fleet: str,
    data: Path,
    *,
    name: str = "w1",
    group: str | None = None,
    extra: list[str] | None = None,
    program: str = "cli",
    index: str | None = None,
) -> subprocess.Popen:
    """A worker process; ``index`` a PostgreSQL URL (``None``: SQLite). Its password goes in
    $PGPASSWORD, the URL without it in ``--index`` (cli) or $LEPTON_INDEX (cloud_workers)."""
    env = dict(os.environ, LEPTON_BROKER=url, LEPTON_FLEET=fleet, LEPTON_DATA=str(data))
    index_args: list[str] = []
    if index is not None:
        env.update(index_environment(index))
        if program == "cli":
            index_args = ["--index", env.pop("LEPTON_INDEX")]
    if program == "cli":
        cmd = [
            sys.executable,
            "-m",
            "lepton",
            "--log-level",
            "INFO",
            "worker",
            "--broker",
            url,
            "--fleet",
            fleet,
            "--data",
            str(data),
            "--name",
            name,
            "--quiet",
        ]
        if group:
            cmd += ["--group", group]
    else:
        cmd = [sys.executable, str(REPO / "cloud_workers" / "ingest_worker.py"), "--name", name]
        if group:
            cmd += ["--group", group]
    cmd += index_args
    log = open(Path(data) / f"{name}-{time.time_ns()}.log", "wb")  # noqa: SIM115
    return subprocess.Popen(cmd + (extra or []), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)


def wait_status(url: str, fleet: str, name: str, predicate, timeout: float = 30.0) -> dict:  # noqa: ANN001
    """Wait for a retained/live worker status matching ``predicate``; return it."""
    from lepton.protocol import decode_json

    topics = Topics(fleet=fleet)
    got: dict = {}
    event = threading.Event()
    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=f"watch-{time.time_ns()}")

    def on_message(c, u, msg):  # noqa: ANN001
        body = decode_json(msg.payload)
        if predicate(body):
            got.update(body)
            event.set()

    client.on_connect = lambda c, *a: c.subscribe(topics.worker_status(name), qos=1)
    client.on_message = on_message
    connect(client, parsed)
    try:
        if not event.wait(timeout):
            raise AssertionError(f"no worker status of {name} matching the predicate in {timeout}s")
        return got
    finally:
        client.disconnect()
        client.loop_stop()


def stop_process(proc: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(sig)
    return proc.wait(timeout)


def index_environment(index: str) -> dict[str, str]:
    """``LEPTON_INDEX`` (the URL without its password) and ``PGPASSWORD``, as a deployment would set."""
    from urllib.parse import urlsplit

    from lepton.cloud._index_pg import redact_url

    password = urlsplit(index).password
    return {"LEPTON_INDEX": redact_url(index), **({"PGPASSWORD": password} if password else {})}
