"""The quarantine is bounded and de-duplicated (issue 10, item 6): before, 200 replays of one junk
payload wrote 200 copies (105 MB in our try) and nothing bounded a device's share of the disk."""

from __future__ import annotations

import os
import time

from lepton.cloud import IngestWorker, WorkerConfig
from lepton.cloud._quarantine import QuarantineBudget, QuarantineLimits
from lepton.protocol import Topics
from tests.cloud.test_ingest_poison import _DeadLetters


def test_budget_decisions():
    b = QuarantineBudget(QuarantineLimits(device_bytes=100, total_bytes=150, total_entries=3))
    assert b.admit("a1", "a", 60) == "new"
    assert b.admit("a1", "a", 60) == "duplicate"
    assert b.admit("a2", "a", 60) == "device quota"
    assert b.admit("b1", "b", 60) == "new"
    assert b.admit("b2", "b", 35) == "total quota"
    assert b.admit("c1", "c", 10) == "new"
    assert b.admit("c2", "c", 1) == "entry limit"
    assert (b.total, b.refused, len(b.names)) == (130, 3, 3)


def _flood(url: str, topic: str, payloads: list[bytes]):
    """Publish and wait for the PUBACKs; the client stays connected (returned): amqtt 0.12 PUBACKs a
    message before processing it and drops what it has not processed when its sender disconnects."""
    from lepton.protocol import BrokerURL, connect, new_client

    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=f"flood-{time.time_ns()}", max_inflight=20)
    connect(client, parsed)
    infos = [client.publish(topic, p, qos=1) for p in payloads]
    for info in infos:
        info.wait_for_publish(20)
    return client


def test_replays_are_kept_once_and_a_device_cannot_fill_the_disk(broker, fleet, tmp_path):
    topics = Topics(fleet=fleet)
    worker = IngestWorker(
        WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet, data=tmp_path, name="w1",
                     batch_ms=20, quarantine_device_bytes=120_000, quarantine_bytes=10_000_000)
    )
    replay = b"\xc1junk" * 2500  # 12.5 KB, not msgpack
    distinct = [os.urandom(10_000) for _ in range(40)]
    with _DeadLetters(broker.url("viewer", "v1", fleet=fleet), fleet) as dead:
        worker.start()
        try:
            floods = [
                _flood(broker.url("device", "junk-1", fleet=fleet), topics.samples("junk-1"), [replay] * 200),
                _flood(broker.url("device", "junk-2", fleet=fleet), topics.samples("junk-2"), distinct),
                _flood(broker.url("device", "cam-1", fleet=fleet), topics.samples("cam-1"), [b"\xc1other"]),
            ]
            deadline = time.monotonic() + 60
            while len(dead.reports) < 241 and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(0.5)
            status = worker.status()
        finally:
            for client in floods if "floods" in locals() else []:
                client.disconnect()
                client.loop_stop()
            worker.stop()
        reports = list(dead.reports)
    # Every message is still dead-lettered (reported, acked): never silent.
    assert len(reports) == 241 and status["dead_letters"] == 241
    qdir = tmp_path / fleet / "quarantine"
    bins = sorted(p.name for p in qdir.glob("*.bin"))
    assert sum(n.startswith("junk-1-") for n in bins) == 1  # 200 replays, one copy
    kept_2 = [n for n in bins if n.startswith("junk-2-")]
    assert 1 <= len(kept_2) < 40
    kept_bytes = sum((qdir / n).stat().st_size + (qdir / (n[:-4] + ".json")).stat().st_size for n in kept_2)
    assert kept_bytes <= 120_000
    assert sum(n.startswith("cam-1-") for n in bins) == 1  # another device is not crowded out
    refused = [r for r in reports if r["quarantine"] is None]
    assert len(refused) == 40 - len(kept_2) and {r["quarantine_refused"] for r in refused} == {"device quota"}
    assert {r["device"] for r in refused} == {"junk-2"}
    assert status["quarantine"]["refused"] == len(refused)
    # A restarted worker counts what is on disk: junk-2 stays over its quota.
    again = IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet,
                                      data=tmp_path, name="w1", quarantine_device_bytes=120_000))
    assert again.quarantine.admit("junk-2", os.urandom(10_000))[1] == "device quota"
    again.index.close()
