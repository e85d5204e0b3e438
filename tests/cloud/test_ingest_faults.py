"""Fault injection against Mosquitto (the project's config, persistence on): the worker killed with
SIGKILL mid-stream, Mosquitto stopped and restarted mid-stream, two workers of a group splitting one
stream. Each time: 20,000 (or 10,000) unique samples, none twice.

The exactly-once cases (kill -9, a crash at each step of a write, two workers of a group) run against
both index backends (``index_url``: SQLite in the folder, and a real PostgreSQL server)."""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter

import pytest

from lepton.cloud import Dataset
from tests.cloud._ingest_support import (
    ResendPublisher,
    index_environment,
    start_worker_process,
    stop_process,
    wait_status,
)

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


def _index_holds(root, fleet, index_url, n: int) -> None:  # noqa: ANN001
    """The backend under test is the one that was used, it counts ``n`` samples, and every file it
    lists as not yet visible is in place (a worker's last file is marked in its next transaction)."""
    from lepton.cloud._index import open_index

    assert (root / fleet / "index.sqlite").exists() == (index_url is None)
    index = open_index(root / fleet, index_url)
    try:
        with index.transaction():
            assert index.count() == n
            assert all((root / fleet / "data" / name).is_file() for name in index.invisible_files())
    finally:
        index.close()


def test_worker_kill_9_mid_stream_then_restart(mosquitto_broker, fleet, tmp_path, index_url):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    proc = start_worker_process(url, fleet, tmp_path, name="w1", index=index_url)
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
            killed["proc"] = start_worker_process(url, fleet, tmp_path, name="w1", program="cloud_workers",
                                                  index=index_url)

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
    _index_holds(tmp_path, fleet, index_url, 20_000)


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


def test_two_workers_in_a_group_split_the_stream_exactly_once(mosquitto_broker, fleet, tmp_path, index_url):
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    procs = [
        start_worker_process(
            mosquitto_broker.url("worker", n, fleet=fleet), fleet, tmp_path, name=n, group="ingest",
            index=index_url,
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
    _index_holds(tmp_path, fleet, index_url, 20_000)


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


_CRASHING_WORKER = """
import os, sys
from lepton.cloud import IngestWorker, WorkerConfig, _dataset
point, nth = sys.argv[1], int(sys.argv[2])
calls = [0]
def hit():
    calls[0] += 1
    if calls[0] == nth:
        os._exit(9)
if point == "before_commit":  # the .tmp is written and fsynced, the index transaction not committed
    real_write = _dataset.write_parquet_synced
    def write(*a, **k):
        size = real_write(*a, **k)
        hit()
        return size
    _dataset.write_parquet_synced = write
elif point == "before_rename":  # committed in the index, still .tmp on disk
    real_replace = os.replace
    def replace(src, dst, *a, **k):
        if str(dst).endswith(".parquet"):
            hit()
        return real_replace(src, dst, *a, **k)
    os.replace = replace
elif point == "before_ack":  # renamed and committed, device acks published, no PUBACK yet
    from lepton.protocol import _mqtt
    real_ack = _mqtt.ack_many
    def ack_many(client, mids):
        hit()
        return real_ack(client, mids)
    _mqtt.ack_many = ack_many
env = os.environ
w = IngestWorker(WorkerConfig(broker=env["LEPTON_BROKER"], fleet=env["LEPTON_FLEET"], data=env["LEPTON_DATA"],
                              name=env.get("CRASH_NAME", "w1"), group=env.get("CRASH_GROUP"), batch_ms=20,
                              index=env.get("LEPTON_INDEX")))
w.start()
w.run_forever()
"""


@pytest.mark.parametrize("point", ["before_commit", "before_rename", "before_ack"])
def test_crash_at_each_step_of_a_write_then_restart(mosquitto_broker, fleet, tmp_path, point, index_url):
    """The worker dies (os._exit) at a chosen step of its 3rd write; a restarted worker recovers the
    folder (deletes the uncommitted .tmp, or finishes the committed rename) and the stream ends up
    stored exactly once."""
    import os
    import subprocess
    import sys

    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    env = dict(os.environ, LEPTON_BROKER=url, LEPTON_FLEET=fleet, LEPTON_DATA=str(tmp_path),
               **(index_environment(index_url) if index_url else {}))
    crashing = subprocess.Popen([sys.executable, "-c", _CRASHING_WORKER, point, "3"], env=env)
    wait_status(viewer, fleet, "w1", lambda s: s.get("online") is True)
    pub = ResendPublisher(
        mosquitto_broker.url("device", "cam-1", fleet=fleet),
        fleet,
        "cam-1",
        total=3000,
        per_message=50,
        resend_after=2.0,
    )
    pub.start()
    state = {}

    def on_progress(i: int) -> None:
        if i == 40:
            state["crash_rc"] = crashing.wait(30)  # it died at the chosen step...
            state["proc"] = start_worker_process(url, fleet, tmp_path, name="w1", index=index_url)  # ...back

    try:
        pub.run(pace=0.01, on_progress=on_progress, timeout=90)
    finally:
        pub.stop()
        if crashing.poll() is None:
            crashing.kill()
        rc = stop_process(state["proc"]) if "proc" in state else None

    assert state["crash_rc"] == 9 and rc == 0
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 3000
    assert sorted(s for _, s in pairs) == list(range(3000))
    assert not [p for p in (tmp_path / fleet / "data").iterdir() if p.name.endswith(".tmp")]
    _index_holds(tmp_path, fleet, index_url, 3000)


def test_group_member_dies_between_commit_and_rename_the_other_finishes(mosquitto_broker, fleet, tmp_path,
                                                                        index_url):
    """Two workers of a group share one folder; one dies after committing a file but before renaming
    it, and never comes back. The survivor's next write finishes that file, the devices' resends reach
    the survivor, and the union is exactly once with no .tmp left behind."""
    import os
    import subprocess
    import sys

    viewer = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    env = dict(
        os.environ,
        LEPTON_BROKER=mosquitto_broker.url("worker", "wa", fleet=fleet),
        LEPTON_FLEET=fleet,
        LEPTON_DATA=str(tmp_path),
        CRASH_NAME="wa",
        CRASH_GROUP="ingest",
        **(index_environment(index_url) if index_url else {}),
    )
    crashing = subprocess.Popen([sys.executable, "-c", _CRASHING_WORKER, "before_rename", "2"], env=env)
    survivor = start_worker_process(
        mosquitto_broker.url("worker", "wb", fleet=fleet), fleet, tmp_path, name="wb", group="ingest",
        index=index_url,
    )
    for n in ("wa", "wb"):
        wait_status(viewer, fleet, n, lambda s: s.get("online") is True)
    pubs = [
        ResendPublisher(
            mosquitto_broker.url("device", d, fleet=fleet),
            fleet,
            d,
            total=2_000,
            per_message=20,
            resend_after=1.0,
        )
        for d in ("cam-1", "cam-2")
    ]
    for p in pubs:
        p.start()
    threads = [threading.Thread(target=p.run, kwargs={"pace": 0.005, "timeout": 120}) for p in pubs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for p in pubs:
        p.stop()
    crash_rc = crashing.wait(30)
    rc = stop_process(survivor)

    assert crash_rc == 9 and rc == 0
    pairs = _pairs(tmp_path, fleet)
    assert len(pairs) == len(set(pairs)) == 4_000
    assert not [p for p in (tmp_path / fleet / "data").iterdir() if p.name.endswith(".tmp")]
    names = {f.name.split("-")[2] for f in Dataset(tmp_path, fleet).files()}
    assert names == {"wa", "wb"}  # the dead worker's committed file was made visible by the survivor
    _index_holds(tmp_path, fleet, index_url, 4_000)
