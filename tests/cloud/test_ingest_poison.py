"""Poison pills: one message that the decoder used to accept but the dataset writer could not store
(issue 10, item 1). Before the fix each of them made the writer fail on every retry, so the broker
redelivered it forever and no sample from any other device was stored or acked again.

Each test runs against both brokers, with real traffic from three devices around the poison.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter

import msgpack
import pytest

from lepton.cloud import Dataset, IngestWorker, WorkerConfig
from lepton.protocol import BrokerURL, Topics, connect, decode_json, encode_samples, new_client
from tests.cloud._ingest_support import ResendPublisher, make_samples


def _envelope(device: str, sample_map_tail: bytes) -> bytes:
    """A samples envelope with one sample whose map is ``seq, ts`` plus hand-encoded entries
    (msgpack-python refuses to pack some of these, e.g. 1,000 levels of nesting)."""
    head = msgpack.packb({"v": 1, "device": device})[1:]  # the two entries, without the map header
    n_tail = sample_map_tail[0] & 0x0F
    sample = bytes((0x80 | (2 + n_tail),)) + msgpack.packb("seq") + msgpack.packb(7) + msgpack.packb("ts")
    sample += msgpack.packb(1.7e9) + sample_map_tail[1:]
    return bytes((0x83,)) + head + msgpack.packb("samples") + b"\x91" + sample


def _tensor(shape: list[int], data: bytes = b"") -> bytes:
    return msgpack.packb({"dtype": "float32", "shape": shape, "data": data}, use_bin_type=True)


def poison_payloads(device: str) -> dict[str, bytes]:
    x = msgpack.packb("x") + _tensor([2], b"\0" * 8)
    return {
        # meta map with a non-string (binary) key: json.dumps of meta raised TypeError in the writer
        "meta-bin-key": _envelope(device, b"\x82" + x + msgpack.packb("meta") + b"\x81\xc4\x01k\x01"),
        # meta nested 1,000 deep: RecursionError in json.dumps
        "meta-deep": _envelope(device, b"\x82" + x + msgpack.packb("meta") + b"\x81\xa1k" * 1000 + b"\xc0"),
        # shape [0, 2**31]: 0 bytes, so the size check passed, but the int32 shape column overflowed
        "shape-2^31": _envelope(device, b"\x81" + msgpack.packb("x") + _tensor([0, 2**31])),
        # a meta value that is not JSON: a NaN float, and binary data
        "meta-nan": _envelope(device, b"\x82" + x + msgpack.packb("meta")
                              + msgpack.packb({"a": float("nan")})),
    }


class _DeadLetters:
    """Collects the fleet's dead-letter reports (viewer credentials)."""

    def __init__(self, url: str, fleet: str) -> None:
        self.url = BrokerURL.parse(url)
        self.reports: list[dict] = []
        self.lock = threading.Lock()
        self.client = new_client(self.url, client_id=f"dl-{time.time_ns()}")
        topic = Topics(fleet=fleet).deadletter()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.on_message = self._on_message

    def _on_message(self, client, userdata, msg) -> None:  # noqa: ANN001
        with self.lock:
            self.reports.append(decode_json(msg.payload))

    def __enter__(self) -> _DeadLetters:
        connect(self.client, self.url)
        time.sleep(0.3)  # the subscription is in place
        return self

    def __exit__(self, *exc: object) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _publish(url: str, topic: str, payload: bytes, *, retain: bool = False) -> None:
    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=f"evil-{time.time_ns()}")
    connect(client, parsed)
    client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(10)
    client.disconnect()
    client.loop_stop()


def test_poison_messages_never_stall_ingest(broker, fleet, tmp_path):
    topics = Topics(fleet=fleet)
    # The retained poison is there before the worker subscribes: every new worker used to stall on it.
    # It is a well-formed samples message: retained samples are not part of the protocol.
    retained = encode_samples("evil-r", make_samples(0, 2))
    _publish(broker.url("device", "evil-r", fleet=fleet), topics.samples("evil-r"), retained, retain=True)
    worker = IngestWorker(
        WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet, data=tmp_path, name="w1",
                     batch_ms=20, status_interval=0.3)
    )
    devices = ("cam-1", "cam-2", "cam-3")
    pubs = [
        ResendPublisher(broker.url("device", d, fleet=fleet), fleet, d, total=600, per_message=10,
                        resend_after=2.0)
        for d in devices
    ]
    poison = poison_payloads("evil-1")
    with _DeadLetters(broker.url("viewer", "v1", fleet=fleet), fleet) as dead:
        worker.start()
        try:
            for p in pubs:
                p.start()
            threads = [threading.Thread(target=p.run, kwargs={"pace": 0.005, "timeout": 60}) for p in pubs]
            for t in threads:
                t.start()
            time.sleep(0.2)
            evil = broker.url("device", "evil-1", fleet=fleet)
            for payload in poison.values():  # amid the valid traffic
                _publish(evil, topics.samples("evil-1"), payload)
            started = time.monotonic()
            for t in threads:
                t.join()
            drained_in = time.monotonic() - started
            time.sleep(1.5)  # would a poison message come back (redelivered, retried)?
            status = worker.status()
        finally:
            for p in pubs:
                p.stop()
            worker.stop()
        with dead.lock:
            reports = list(dead.reports)

    assert all(not p.unacked() for p in pubs)
    assert drained_in < 45, drained_in
    t = Dataset(tmp_path, fleet).read_table(columns=["device", "seq"])
    pairs = list(zip(t.column("device").to_pylist(), t.column("seq").to_pylist(), strict=True))
    assert len(pairs) == len(set(pairs)) == 1800
    assert set(pairs) == {(d, s) for d in devices for s in range(600)}  # no poison and no retained row
    # Each poison message dead-lettered exactly once, the retained one too.
    by_device = Counter(r["device"] for r in reports)
    assert by_device == {"evil-1": len(poison), "evil-r": 1}, reports
    fields = sorted(str(r["field"]) for r in reports if r["device"] == "evil-1")
    assert fields == sorted(["samples[0].meta"] * 3 + ["samples[0].x.shape"]), fields
    (ret,) = [r for r in reports if r["device"] == "evil-r"]
    assert ret["field"] == "retain" and "retained" in ret["reason"]
    assert status["dead_letters"] == len(poison) + 1 and status["errors"] == 0, status
    # Every dead letter is in quarantine: the raw payload and its report.
    quarantined = {p.name for p in (tmp_path / fleet / "quarantine").iterdir()}
    for r in reports:
        assert r["quarantine"] in quarantined
        assert json.loads((tmp_path / fleet / "quarantine" / (r["quarantine"][:-4] + ".json")).read_text())


def test_poison_survives_a_restart_on_the_persistent_session(mosquitto_broker, fleet, tmp_path):
    """The poison is queued for the worker's persistent session while it is away; the restarted worker
    dead-letters it once and stores the honest device's samples queued beside it."""
    topics = Topics(fleet=fleet)
    wurl = mosquitto_broker.url("worker", "w1", fleet=fleet)
    cfg = WorkerConfig(broker=wurl, fleet=fleet, data=tmp_path, name="w1", batch_ms=20)
    first = IngestWorker(cfg)
    first.start()
    first.stop()  # the session now queues for w1
    evil = mosquitto_broker.url("device", "evil-1", fleet=fleet)
    for payload in poison_payloads("evil-1").values():
        _publish(evil, topics.samples("evil-1"), payload)
    honest = mosquitto_broker.url("device", "cam-1", fleet=fleet)
    _publish(honest, topics.samples("cam-1"), encode_samples("cam-1", make_samples(0, 50)))
    second = IngestWorker(cfg)
    second.start()
    try:
        assert second.wait_stored(50, timeout=20)
        time.sleep(1.0)
        status = second.status()
    finally:
        second.stop()
    assert Dataset(tmp_path, fleet).count() == 50
    assert status["dead_letters"] == 4 and status["errors"] == 0, status


@pytest.mark.parametrize("kind", sorted(poison_payloads("d")))
def test_protocol_rejects_what_the_writer_cannot_store(kind):
    """The one rule set refuses each poison, naming the field, so nothing downstream ever sees it."""
    from lepton.protocol import decode_samples_raw

    device, _pipeline, good, bad = decode_samples_raw(poison_payloads("d")[kind])
    assert device == "d" and not good
    ((index, _raw, err),) = bad
    assert index == 0 and err.field in ("samples[0].meta", "samples[0].x.shape"), err
