"""The worker's store child and the MQTT process live and die together (real processes, Mosquitto).

A store child that dies makes the worker exit loudly (nothing unfinished was acked: the broker
redelivers; the crash tests of test_ingest_faults.py kill the child mid-write and check exactly-once
after the restart). A worker killed with -9 leaves no orphan store child behind.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.cloud._ingest_support import start_worker_process, stop_process, wait_status


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        out += [int(c) for c in text]
    return out


def _store_child(pid: int, timeout: float = 30.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        children = _children(pid)  # a worker without --train-every has one child: its store
        if children:
            return children[0]
        time.sleep(0.05)
    raise AssertionError(f"worker {pid} has no store child")


def _gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")  # exited (a zombie waits for whoever adopted it to reap it)


def test_store_child_killed_makes_the_worker_exit_loudly(mosquitto_broker, fleet, tmp_path):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    proc = start_worker_process(url, fleet, tmp_path, name="w1")
    try:
        wait_status(mosquitto_broker.url("viewer", "v1", fleet=fleet), fleet, "w1",
                    lambda s: s.get("online") is True)
        child = _store_child(proc.pid)
        os.kill(child, signal.SIGKILL)
        rc = proc.wait(30)
    finally:
        if proc.poll() is None:
            stop_process(proc)
    assert rc == 128 + signal.SIGKILL
    logs = b"".join(p.read_bytes() for p in tmp_path.glob("w1-*.log"))
    assert b"store child" in logs and b"died" in logs, logs[-2000:]
    # The Last Will says so.
    wait_status(mosquitto_broker.url("viewer", "v2", fleet=fleet), fleet, "w1", lambda s: s.get("online") is False)


def test_worker_killed_leaves_no_orphan_store_child(mosquitto_broker, fleet, tmp_path):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    proc = start_worker_process(url, fleet, tmp_path, name="w1")
    wait_status(mosquitto_broker.url("viewer", "v1", fleet=fleet), fleet, "w1", lambda s: s.get("online") is True)
    child = _store_child(proc.pid)
    assert not _gone(child)
    proc.kill()
    assert proc.wait(30) == -signal.SIGKILL
    deadline = time.monotonic() + 30
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child), f"store child {child} outlived its worker"
