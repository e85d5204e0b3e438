"""Fault injection against Mosquitto (the project's config, persistence on): the worker killed with
SIGKILL mid-stream, Mosquitto stopped and restarted mid-stream, two workers of a group splitting one
stream. Each time: 20,000 (or 10,000) unique samples, none twice."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from lepton.cloud import Dataset
from tests.cloud._ingest_support import ResendPublisher, start_worker_process, stop_process, wait_status

pytestmark = [pytest.mark.mosquitto, pytest.mark.slow]


def _pairs(root, fleet):  # noqa: ANN001
    t = Dataset(root, fleet).read_table(columns=["device", "seq"])
    return list(zip(t.column("device").to_pylist(), t.column("seq").to_pylist(), strict=True))


def _wait_count(root, fleet, n: int, timeout: float = 60.0) -> int:  # noqa: ANN001
    ds = Dataset(root, fleet)
    deadline = time.monotonic() + timeout
    while (count := ds.count()) < n and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def test_worker_kill_9_mid_stream_then_restart(mosquitto_broker, fleet, tmp_path):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    proc = start_worker_process(url, fleet, tmp_path, name="w1")
    wait_status(viewer, fleet, "w1", lambda s: s.get("online") is True)
    pub = ResendPublisher(
        mosquitto_broker.url("device", "cam-1", fleet=fleet),
        fleet,
        "cam-1",
        total=20_000,
        per_message=100,
        resend_after=4.0,
    )
    pub.start()
    killed = {}

    def on_progress(i: int) -> None:
        if i == 80:  # 8,000 samples out: make sure some were written, then SIGKILL mid-write
            _wait_count(tmp_path, fleet, 1, timeout=20)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed["stored_before"] = Dataset(tmp_path, fleet).count()
        if i == 120:  # restart while the stream goes on (the broker queued for the persistent session)
            # ...with the deployable program this time: same API, same session, same index.
            killed["proc"] = start_worker_process(url, fleet, tmp_path, name="w1", program="cloud_workers")

    try:
        pub.run(pace=0.01, on_progress=on_progress, timeout=120)
    finally:
        pub.stop()
        rc = stop_process(killed["proc"]) if "proc" in killed else None

    assert proc.returncode == -signal.SIGKILL and 0 < killed["stored_before"] < 20_000
    assert rc == 0
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 20_000  # 20,000 unique, 0 duplicates
    assert set(pairs) == {("cam-1", s) for s in range(20_000)}


def test_mosquitto_restart_mid_stream(mosquitto_broker, fleet, tmp_path):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    proc = start_worker_process(url, fleet, tmp_path, name="w1")
    wait_status(viewer, fleet, "w1", lambda s: s.get("online") is True)
    pubs = [
        ResendPublisher(
            mosquitto_broker.url("device", d, fleet=fleet),
            fleet,
            d,
            total=10_000,
            per_message=100,
            resend_after=4.0,
        )
        for d in ("cam-1", "cam-2")
    ]
    for p in pubs:
        p.start()
    restarted = threading.Event()

    def on_progress(i: int) -> None:
        if i == 40 and not restarted.is_set():
            restarted.set()
            mosquitto_broker.stop()  # graceful: Mosquitto saves sessions and queues
            time.sleep(1.0)
            mosquitto_broker.start()

    threads = [
        threading.Thread(
            target=pubs[0].run, kwargs={"pace": 0.01, "on_progress": on_progress, "timeout": 150}
        ),
        threading.Thread(target=pubs[1].run, kwargs={"pace": 0.01, "timeout": 150}),
    ]
    errors = []
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        for p in pubs:
            errors.append(p.unacked())
        assert proc.poll() is None  # the worker rode out the restart
    finally:
        for p in pubs:
            p.stop()
        rc = stop_process(proc)

    assert restarted.is_set() and errors == [[], []] and rc == 0
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 20_000
    assert set(pairs) == {(d, s) for d in ("cam-1", "cam-2") for s in range(10_000)}


def test_two_workers_in_a_group_split_the_stream_exactly_once(mosquitto_broker, fleet, tmp_path):
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    procs = [
        start_worker_process(
            mosquitto_broker.url("worker", n, fleet=fleet), fleet, tmp_path, name=n, group="ingest"
        )
        for n in ("wa", "wb")
    ]
    for n in ("wa", "wb"):
        wait_status(viewer, fleet, n, lambda s: s.get("online") is True)
    devices = ("cam-1", "cam-2", "cam-3", "cam-4")
    pubs = [
        ResendPublisher(
            mosquitto_broker.url("device", d, fleet=fleet),
            fleet,
            d,
            total=5_000,
            per_message=50,
            resend_after=1.0,
        )
        for d in devices
    ]  # short: resends cross workers
    for p in pubs:
        p.start()
    threads = [threading.Thread(target=p.run, kwargs={"pace": 0.002, "timeout": 120}) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pubs:
        p.stop()
    codes = [stop_process(p) for p in procs]

    assert codes == [0, 0] and all(not p.unacked() for p in pubs)
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 20_000
    assert set(pairs) == {(d, s) for d in devices for s in range(5_000)}
    # Both workers took a share (file names carry the writer's name).
    per_worker = Counter()
    for f in Dataset(tmp_path, fleet).files():
        import pyarrow.parquet as pq

        per_worker[f.name.split("-")[2]] += pq.read_metadata(f).num_rows
    assert per_worker["wa"] > 0 and per_worker["wb"] > 0 and sum(per_worker.values()) == 20_000


def test_compaction_while_the_worker_writes(mosquitto_broker, fleet, tmp_path):
    """`lepton dataset compact` runs again and again during ingest: no sample lost or doubled, and a
    reader going through Dataset never counts a sample twice, even mid-compaction."""
    from lepton.cloud import compact

    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    proc = start_worker_process(
        url, fleet, tmp_path, name="w1", extra=["--batch-ms", "10", "--max-pending", "5"]
    )
    wait_status(
        mosquitto_broker.url("viewer", "v1", fleet=fleet), fleet, "w1", lambda s: s.get("online") is True
    )
    pub = ResendPublisher(
        mosquitto_broker.url("device", "cam-1", fleet=fleet),
        fleet,
        "cam-1",
        total=10_000,
        per_message=20,
        resend_after=3.0,
    )
    pub.start()
    stop = threading.Event()
    seen_counts: list[int] = []
    runs = Counter()

    def compactor() -> None:
        while not stop.is_set():
            r = compact(tmp_path / fleet, small_rows=5_000, max_rows=20_000)
            runs["merged"] += r["files_merged"]
            seen_counts.append(Dataset(tmp_path, fleet).count())
            time.sleep(0.05)

    t = threading.Thread(target=compactor)
    t.start()
    try:
        pub.run(pace=0.003, timeout=120)
    finally:
        stop.set()
        t.join()
        pub.stop()
        rc = stop_process(proc)

    assert rc == 0 and runs["merged"] > 0
    assert max(seen_counts) <= 10_000
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 10_000
    compact(tmp_path / fleet, small_rows=5_000, max_rows=20_000)
    files = Dataset(tmp_path, fleet).files()
    assert len(files) <= 3 and sorted(s for _, s in _pairs(tmp_path, fleet)) == list(range(10_000))
