#!/usr/bin/env python3
"""A 1,000-device fleet on one machine: ack latency, CPU and memory, exactly-once, 1 -> 3 workers.

    python bench/fleet.py                                   # 1000 devices; rates 1,5,20,50; 1,2,3 workers
    python bench/fleet.py --quick                           # 200 devices, rates 1,5, workers 1,2, 4 s each
    python bench/fleet.py --devices 500 --workers 1,3 --rates 1,10 --duration 20
    python bench/fleet.py --devices 20 --procs 1 --workers 1 --rates 1 --duration 2   # the smoke test

Setup: one Mosquitto running the project's mosquitto.conf, ACL and users (lepton.testing.MosquittoBroker;
every simulated device is a user of its own with the device grants of broker/add-user.sh). ``--procs``
simulator processes carry the devices, one paho client per device, all of a process's clients driven
by one thread through one epoll loop (paho's external-loop API). Every device speaks protocol v1
(docs/protocol.md) as the reference device does: client id = username = device id, clean_session
false (a persistent session: acks queue while it is away), a Last Will (retained ``online: false``
status, QoS 1), a retained ``online: true`` status on connect, and at ``--rates R`` samples per second
one real samples envelope (lepton.protocol.encode_samples, one 1 KiB float32 tensor, a label) per
sample on its samples topic at QoS 1, spread evenly over the second and over the fleet. It subscribes
to its acks topic and measures publish -> ack latency per sample (the ack comes once the worker has
fsynced the sample and committed its index). Unlike the reference device it has no spool and never
resends: the bench measures one pass.

Each rate runs one phase per sink, with a fresh dataset folder and the same devices and offered load:

* ``bare``: a bare paho subscriber (a worker user, QoS 1, auto-ack, never opens a payload) that only
  counts: what the broker can deliver to one client at this load (the baseline);
* ``N workers``: N real ``lepton worker`` processes, ``--group`` (a ``$share`` subscription) splitting
  the stream, on one dataset folder and its SQLite index.

Figures per phase:

* target / offered / ingested samples/s: the load asked for, what the simulators managed to publish in
  ``--duration`` s, and what the sink took: samples acked (workers) or received (bare) divided by the
  longer of ``--duration`` and first publish -> last ack or receipt (so a sink that falls behind is
  charged for the backlog it drains afterwards, and one that keeps up shows the offered rate);
* ack latency p50 / p99 / max over every acked sample;
* exactly-once, checked afterwards: the dataset read back (lepton.cloud.Dataset) holds every acked
  (device, seq) exactly once, no duplicate and nothing never published; published samples still
  unacked when ``--drain`` ran out are counted as ``undrained`` (queued in the broker, not lost: a
  real device keeps them in its spool and resends);
* CPU in cores (CPU seconds / wall seconds over the publishing window) and max RSS of the broker, the
  workers (summed), the simulators (summed) and the bare subscriber (psutil), the busiest single thread
  (a Python process or Mosquitto at ~1.0 is a core at 100 %: saturated), and the whole machine's busy
  cores (other users of the machine included: read it with the load average that is recorded).

At the end, a viewer reads the retained statuses: every device's is ``online: false``, the clean
stop's for most, and the Last Will's (``"reason": "connection lost"``) for the devices of one simulator
process that vanishes without DISCONNECT in the last phase.

What saturated, per phase (``limit`` column): ``simulator`` when it published < 95 % of the target
(the bench itself could not offer the load: on 2 cores this comes early), ``sink`` when the sink took
< 95 % of what was offered, else ``-``; with the process whose busiest thread was nearest a full core.
Writes bench/results/fleet.json (``--out``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import multiprocessing as mp
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lepton import exitcodes  # noqa: E402

FLEET = "fleet"
PIPELINE = "fleetbench000000"
FLOATS = 256  # 1 KiB of float32


# -- simulator process: many devices, one thread, one epoll loop ------------------------------------
class _Device:
    """One simulated device's state; owned by its simulator's single thread."""

    __slots__ = ("id", "client", "sent", "latencies", "published", "acked", "last_ack", "connected")

    def __init__(self, device_id: str) -> None:
        self.id = device_id
        self.client = None
        self.sent: dict[int, float] = {}
        self.latencies: list[float] = []
        self.published = 0
        self.acked = 0
        self.last_ack = 0.0
        self.connected = False


def simulate(ids: list[str], host: str, port: int, password: str, rate: float, seq_base: int,
             duration: float, expect_acks: bool, drain: float, vanish: bool, ready, go, start_at,
             results) -> None:  # noqa: ANN001
    """Connect every device of ``ids``, wait for ``go``, publish ``rate`` samples/s per device for
    ``duration`` s, wait up to ``drain`` s for the acks, stop cleanly (or vanish), put a report."""
    import numpy as np

    from lepton.protocol import (
        BrokerURL,
        Sample,
        Topics,
        decode_acks,
        encode_json,
        encode_samples,
        new_client,
    )

    topics = Topics(fleet=FLEET)
    sel = selectors.DefaultSelector()
    devices = [_Device(d) for d in ids]
    x = np.random.default_rng(0).standard_normal(FLOATS).astype(np.float32)
    wants_write: set = set()

    def on_connect(client, dev, flags, reason_code, properties):  # noqa: ANN001
        if reason_code.is_failure:
            raise RuntimeError(f"device {dev.id}: broker refused: {reason_code}")
        dev.connected = True
        client.subscribe(topics.acks(dev.id), qos=1)
        client.publish(topics.status(dev.id), encode_json({"device": dev.id, "online": True,
                                                           "pipeline": PIPELINE, "source": "fleet-bench"}),
                       qos=1, retain=True)

    def on_message(client, dev, msg):  # noqa: ANN001
        now = time.monotonic()
        for first, last in decode_acks(msg.payload):
            for seq in range(first, last + 1):
                t = dev.sent.pop(seq, None)
                if t is not None:
                    dev.latencies.append(now - t)
                    dev.acked += 1
        dev.last_ack = time.time()

    for dev in devices:
        url = BrokerURL.parse(f"mqtt://{dev.id}:{password}@{host}:{port}")
        c = new_client(url, client_id=dev.id, clean_session=False, max_inflight=1000)
        c.user_data_set(dev)
        c.will_set(topics.status(dev.id), encode_json({"device": dev.id, "online": False,
                                                       "reason": "connection lost"}), qos=1, retain=True)
        c.on_connect = on_connect
        c.on_message = on_message
        c.connect(host, port, keepalive=60)  # TCP connect; CONNECT is written at once (no paho thread)
        dev.client = c
        sel.register(c.socket(), selectors.EVENT_READ, dev)
        wants_write.add(dev)

    def pump(timeout: float) -> None:
        for key, mask in sel.select(timeout):
            dev = key.data
            if mask & selectors.EVENT_READ:
                dev.client.loop_read(64)
            if mask & selectors.EVENT_WRITE:
                dev.client.loop_write()
            wants_write.add(dev)
        for dev in list(wants_write):
            sock = dev.client.socket()
            if sock is None:
                wants_write.discard(dev)
                continue
            if dev.client.want_write():
                dev.client.loop_write()
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if dev.client.want_write() else 0)
            if sel.get_key(sock).events != events:
                sel.modify(sock, events, dev)
            if not events & selectors.EVENT_WRITE:
                wants_write.discard(dev)

    last_misc = time.monotonic()

    def misc() -> None:
        nonlocal last_misc
        if time.monotonic() - last_misc >= 1.0:
            last_misc = time.monotonic()
            for dev in devices:
                dev.client.loop_misc()

    deadline = time.monotonic() + 60
    while not all(d.connected for d in devices):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{sum(not d.connected for d in devices)} devices got no CONNACK in 60 s")
        pump(0.05)
    ready.put(os.getpid())
    while not go.is_set():
        pump(0.05)
        misc()

    # Slot j is due at start + j / (n * rate): device j % n, its (j // n)-th sample of the phase.
    n = len(devices)
    start_wall = start_at.value
    start = time.monotonic() - (time.time() - start_wall)
    end = start + duration
    total = int(n * rate * duration)
    j = 0
    behind_max = 0.0
    while True:
        now = time.monotonic()
        if now >= end or j >= total:
            break
        burst = 0
        while j < total and start + j / (n * rate) <= now and burst < 200:
            dev = devices[j % n]
            seq = seq_base + j // n
            payload = encode_samples(dev.id, [Sample(seq=seq, ts=time.time(), x=x, y=seq % 10)],
                                     pipeline=PIPELINE)
            dev.sent[seq] = time.monotonic()
            dev.client.publish(topics.samples(dev.id), payload, qos=1)
            dev.published += 1
            if dev.client.want_write():
                wants_write.add(dev)
            j += 1
            burst += 1
        behind_max = max(behind_max, now - (start + j / (n * rate)))
        pump(max(0.0, min(0.02, start + j / (n * rate) - time.monotonic())))
        misc()
    publish_end = time.time()
    drain_deadline = time.monotonic() + (drain if expect_acks else 0.5)
    while time.monotonic() < drain_deadline and (not expect_acks or any(d.sent for d in devices)):
        pump(0.05)
        misc()
    lat = sorted(v for d in devices for v in d.latencies)
    report = {
        "pid": os.getpid(), "devices": n, "published": sum(d.published for d in devices),
        "acked": sum(d.acked for d in devices), "unacked": sum(len(d.sent) for d in devices),
        "published_by_device": {d.id: d.published for d in devices},
        "unacked_by_device": {d.id: sorted(d.sent) for d in devices if d.sent},
        "last_ack": max((d.last_ack for d in devices), default=0.0), "publish_end": publish_end,
        "behind_max_s": round(behind_max, 3),
        "latencies": np.asarray(lat, dtype=np.float64).tobytes(),
    }
    if vanish:
        # The Last Will's turn: gone without DISCONNECT (as a device that loses power).
        results.put(report)
        results.close()
        results.join_thread()
        os._exit(0)
    for dev in devices:
        offline = encode_json({"device": dev.id, "online": False, "pipeline": PIPELINE,
                               "source": "fleet-bench"})
        dev.client.publish(topics.status(dev.id), offline, qos=1, retain=True)
    flush_deadline = time.monotonic() + 10
    while time.monotonic() < flush_deadline and any(
            d.client.want_write() or d.client._out_messages for d in devices):  # statuses PUBACKed
        pump(0.05)
    for dev in devices:
        dev.client.disconnect()
        with contextlib.suppress(Exception):  # a socket the broker already closed: nothing to flush
            dev.client.loop_write()
    results.put(report)


# -- bare paho subscriber process: counts -----------------------------------------------------------
def bare_subscriber(url: str, ready, stop, count, last) -> None:  # noqa: ANN001
    from lepton.protocol import BrokerURL, Topics, connect, new_client

    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=parsed.username, clean_session=True, max_inflight=1000)
    topic = Topics(fleet=FLEET).all_devices("samples")

    def on_message(c, u, msg):  # noqa: ANN001
        count.value += 1
        last.value = time.time()

    client.on_message = on_message
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
    connect(client, parsed)
    time.sleep(0.5)  # SUBACK
    ready.put(os.getpid())
    stop.wait()
    client.disconnect()
    client.loop_stop()


# -- measuring processes ----------------------------------------------------------------------------
class Meter:
    """CPU seconds (whole process and per thread) and max RSS of a set of processes over a window."""

    def __init__(self, procs: dict[str, list[int]]) -> None:
        import psutil

        self.procs = {role: [psutil.Process(p) for p in pids] for role, pids in procs.items()}
        self.rss: dict[str, int] = {role: 0 for role in procs}
        self._t0 = time.monotonic()
        self._cpu0 = {role: [self._cpu(p) for p in ps] for role, ps in self.procs.items()}
        self._threads0 = {p.pid: self._threads(p) for ps in self.procs.values() for p in ps}
        self._machine0 = psutil.cpu_times()

    @staticmethod
    def _cpu(p) -> float:  # noqa: ANN001
        import psutil

        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:  # a process that vanished (the Last Will's simulator)
            return 0.0

    @staticmethod
    def _threads(p) -> dict[int, float]:  # noqa: ANN001
        import psutil

        try:
            return {t.id: t.user_time + t.system_time for t in p.threads()}
        except psutil.Error:
            return {}

    def sample_rss(self) -> None:
        import psutil

        for role, ps in self.procs.items():
            total = 0
            for p in ps:
                with contextlib.suppress(psutil.Error):  # it exited: its earlier samples stand
                    total += p.memory_info().rss
            self.rss[role] = max(self.rss[role], total)

    def finish(self) -> dict:
        import psutil

        wall = time.monotonic() - self._t0
        self.sample_rss()
        out: dict = {"wall_s": round(wall, 2), "roles": {}}
        hottest = ("-", 0.0)
        for role, ps in self.procs.items():
            cores = sum(self._cpu(p) - c0 for p, c0 in zip(ps, self._cpu0[role], strict=True)) / wall
            per_proc = [(self._cpu(p) - c0) / wall for p, c0 in zip(ps, self._cpu0[role], strict=True)]
            thread_max = 0.0
            for p in ps:
                before = self._threads0.get(p.pid, {})
                for tid, t in self._threads(p).items():
                    thread_max = max(thread_max, (t - before.get(tid, 0.0)) / wall)
            out["roles"][role] = {"cores": round(cores, 3), "cores_per_process_max": round(max(per_proc), 3),
                                  "busiest_thread_cores": round(thread_max, 3),
                                  "rss_mib_max": round(self.rss[role] / 2**20, 1), "processes": len(ps)}
            if thread_max > hottest[1]:
                hottest = (role, thread_max)
        m1 = psutil.cpu_times()
        busy = sum(getattr(m1, f) - getattr(self._machine0, f) for f in ("user", "system", "nice", "irq",
                                                                          "softirq", "steal"))
        out["machine_busy_cores"] = round(busy / wall, 3)
        out["load_average"] = [round(v, 2) for v in os.getloadavg()]
        out["hottest"] = {"role": hottest[0], "busiest_thread_cores": round(hottest[1], 3)}
        return out


# -- one phase --------------------------------------------------------------------------------------
def run_phase(broker, ctx, *, sink: str, workers: int, rate: float, ids: list[str], procs: int,  # noqa: ANN001, C901
              password: str, seq_base: int, duration: float, drain: float, data: Path, vanish: bool,
              phase: int, viewer_url: str) -> dict:
    from lepton.protocol import BrokerURL, connect, new_client

    chunks = [ids[i::procs] for i in range(procs)]
    ready, results = ctx.Queue(), ctx.Queue()
    go = ctx.Event()
    start_at = ctx.Value("d", 0.0)
    expect_acks = sink == "worker"
    sims = [ctx.Process(target=simulate, name=f"sim{i}",
                        args=(c, broker.host, broker.port, password, rate, seq_base, duration, expect_acks,
                              drain, vanish and i == 0, ready, go, start_at, results))
            for i, c in enumerate(chunks)]
    worker_procs: list[subprocess.Popen] = []
    bare = None
    bare_stop = ctx.Event()
    bare_count, bare_last = ctx.Value("q", 0), ctx.Value("d", 0.0)
    names = [f"p{phase}w{i + 1}" for i in range(workers)]
    try:
        if sink == "worker":
            data.mkdir(parents=True)
            for name in names:
                env = dict(os.environ, LEPTON_BROKER=broker.url("worker", name, fleet=FLEET),
                           PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                log = open(data / f"{name}.log", "wb")  # noqa: SIM115
                worker_procs.append(subprocess.Popen(
                    [sys.executable, "-m", "lepton", "worker", "--fleet", FLEET, "--data", str(data),
                     "--name", name, "--group", f"p{phase}", "--status-interval", "1", "--quiet"],
                    env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
            _wait_workers_online(viewer_url, names, worker_procs, data)
        else:
            bare_ready = ctx.Queue()
            bare = ctx.Process(target=bare_subscriber, name="bare",
                               args=(broker.url("worker", f"bare{phase}", fleet=FLEET), bare_ready, bare_stop,
                                     bare_count, bare_last))
            bare.start()
            bare_ready.get(timeout=60)
        for s in sims:
            s.start()
        sim_pids = [ready.get(timeout=120) for _ in sims]
        pids = {"broker": [broker._proc.pid], "simulators": sim_pids}
        if worker_procs:
            pids["workers"] = [w.pid for w in worker_procs]
        if bare is not None:
            pids["bare"] = [bare.pid]
        start_at.value = time.time() + 0.3
        while time.time() < start_at.value:
            time.sleep(0.01)
        go.set()
        meter = Meter(pids)
        window_end = start_at.value + duration
        while time.time() < window_end:
            time.sleep(min(0.5, max(0.0, window_end - time.time())))
            meter.sample_rss()
        usage = meter.finish()
        reports = [results.get(timeout=drain + 120) for _ in sims]
        for s in sims:
            s.join(30)
        published = sum(r["published"] for r in reports)
        if bare is not None:
            # Until the subscriber has them all, or nothing came for 3 s.
            idle_since, seen = time.monotonic(), -1
            while bare_count.value < published and time.monotonic() - idle_since < 3:
                if bare_count.value != seen:
                    seen, idle_since = bare_count.value, time.monotonic()
                time.sleep(0.1)
            taken, last = bare_count.value, bare_last.value
        else:
            taken, last = sum(r["acked"] for r in reports), max(r["last_ack"] for r in reports)
    finally:
        go.set()
        bare_stop.set()
        for w in worker_procs:
            if w.poll() is None:
                w.send_signal(signal.SIGTERM)
        for w in worker_procs:
            try:
                w.wait(60)
            except subprocess.TimeoutExpired:
                w.kill()
        if bare is not None:
            bare.join(10)
        for s in sims:
            if s.is_alive():
                s.kill()
    for name in names:  # forget the workers' persistent sessions: nobody queues for them any more
        url = BrokerURL.parse(broker.url("worker", name, fleet=FLEET))
        c = new_client(url, client_id=name, clean_session=True)
        connect(c, url)
        c.disconnect()
        c.loop_stop()

    lat = sorted(v for r in reports for v in _floats(r["latencies"]))
    row: dict = {
        "rate_per_device": rate,
        "sink": "bare" if sink == "bare" else f"{workers} worker" + "s" * (workers > 1),
        "workers": workers if sink == "worker" else 0, "devices": len(ids),
        "target_per_s": round(len(ids) * rate, 1), "offered_per_s": round(published / duration, 1),
        "published": published, "taken": taken,
        "ingested_per_s": round(taken / max(duration, last - start_at.value), 1) if taken else 0.0,
        "simulator_behind_max_s": max(r["behind_max_s"] for r in reports), "usage": usage,
    }
    if sink == "worker":
        row["acked"] = taken
        row["unacked"] = sum(r["unacked"] for r in reports)
        row["ack_latency_ms"] = {"p50": _pct(lat, 0.50), "p99": _pct(lat, 0.99),
                                 "max": round(lat[-1] * 1000, 1) if lat else None, "samples": len(lat)}
        expected = {d: n for r in reports for d, n in r["published_by_device"].items()}
        unacked = {(d, s) for r in reports for d, seqs in r["unacked_by_device"].items() for s in seqs}
        row["exactly_once"] = exactly_once(data, expected, seq_base, unacked)
        statuses = _worker_statuses(viewer_url, names)
        row["worker_stored"] = {n: statuses.get(n, {}).get("stored") for n in names}
        row["worker_duplicates"] = sum(statuses.get(n, {}).get("duplicates") or 0 for n in names)
        row["worker_dead_letters"] = sum(statuses.get(n, {}).get("dead_letters") or 0 for n in names)
    return row


def _floats(raw: bytes) -> list[float]:
    import numpy as np

    return np.frombuffer(raw, dtype=np.float64).tolist()


def _pct(values: list[float], q: float) -> float | None:
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1) if values else None


def exactly_once(data: Path, expected: dict[str, int], seq_base: int, unacked: set) -> dict:
    """Read the dataset back: every acked (device, seq) stored exactly once, nothing stored twice, nothing
    stored that was not published. ``missing`` counts published samples not stored; when the phase
    ended before the sink drained its backlog (``--drain``) they are the unacked ones (``undrained``),
    still queued in the broker, which is no breach (a real device would still hold them in its spool);
    a missing sample that *was* acked is a breach (``acked_missing``)."""
    from lepton.cloud import Dataset

    table = Dataset(data, FLEET).read_table(columns=["device", "seq"])
    counts = collections.Counter(zip(table.column("device").to_pylist(), table.column("seq").to_pylist(),
                                     strict=True))
    want = {(d, seq_base + i) for d, n in expected.items() for i in range(n)}
    duplicates = sum(1 for k, c in counts.items() if c > 1)
    absent = want - counts.keys()
    acked_missing = len(absent - unacked)
    strangers = len(counts.keys() - want)
    return {"ok": duplicates == 0 and acked_missing == 0 and strangers == 0, "expected": len(want),
            "rows": table.num_rows, "duplicates": duplicates, "missing": len(absent),
            "acked_missing": acked_missing,
            "undrained": len(absent & unacked), "unexpected": strangers}


def _viewer_collect(viewer_url: str, topic: str, seconds: float, until=None) -> dict[str, dict]:  # noqa: ANN001
    """Retained/live JSON reports on ``topic`` (a filter) for ``seconds`` or until ``until(got)``."""
    from lepton.protocol import BrokerURL, connect, decode_json, new_client

    url = BrokerURL.parse(viewer_url)
    got: dict[str, dict] = {}
    client = new_client(url, client_id=f"{url.username}/collect-{time.time_ns()}")
    client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)

    def on_message(c, u, msg):  # noqa: ANN001
        got[msg.topic] = decode_json(msg.payload)

    client.on_message = on_message
    connect(client, url)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until(got)):
        time.sleep(0.05)
    client.disconnect()
    client.loop_stop()
    return got


def _wait_login(url: str, timeout: float = 60.0) -> None:
    """Until the broker accepts ``url``'s user: a reload of 1,000+ users is not instant on a busy machine."""
    from lepton.errors import BrokerConnectionError
    from lepton.protocol import BrokerURL, connect, new_client

    parsed = BrokerURL.parse(url)
    deadline = time.monotonic() + timeout
    while True:
        client = new_client(parsed, client_id=f"{parsed.username}/login-{time.time_ns()}")
        try:
            connect(client, parsed)
        except BrokerConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
            continue
        client.disconnect()
        client.loop_stop()
        return


def _wait_workers_online(viewer_url: str, names: list[str], procs: list[subprocess.Popen],
                         data: Path) -> None:
    from lepton.protocol import Topics

    topics = Topics(fleet=FLEET)
    want = {topics.worker_status(n) for n in names}
    got = _viewer_collect(viewer_url, f"{topics.root}/workers/+/status", 120,
                          until=lambda g: all(g.get(t, {}).get("online") for t in want))
    if not all(got.get(t, {}).get("online") for t in want):
        logs = "".join((data / f"{n}.log").read_text(errors="replace")[-1500:] for n in names)
        codes = [p.poll() for p in procs]
        raise RuntimeError(f"workers not online after 120 s (exit codes {codes}):\n{logs}")
    time.sleep(0.3)  # their $share subscriptions precede their first status


def _worker_statuses(viewer_url: str, names: list[str]) -> dict[str, dict]:
    from lepton.protocol import Topics

    topics = Topics(fleet=FLEET)
    got = _viewer_collect(viewer_url, f"{topics.root}/workers/+/status", 3,
                          until=lambda g: all(topics.worker_status(n) in g and not g[topics.worker_status(n)]
                                              .get("online", True) for n in names))
    return {n: got.get(topics.worker_status(n), {}) for n in names}


def retained_statuses(viewer_url: str, ids: list[str]) -> dict:
    from lepton.protocol import Topics

    topics = Topics(fleet=FLEET)
    want = {topics.status(d) for d in ids}
    got = _viewer_collect(viewer_url, topics.all_devices("status"), 30,
                          until=lambda g: want <= g.keys())
    bodies = [got[t] for t in want if t in got]
    return {"devices": len(ids), "retained": len(bodies),
            "online": sum(1 for b in bodies if b.get("online")),
            "offline_clean_stop": sum(1 for b in bodies if not b.get("online") and "reason" not in b),
            "offline_last_will": sum(1 for b in bodies if not b.get("online")
                                     and b.get("reason") == "connection lost")}


# -- verdicts, table, main --------------------------------------------------------------------------
def limit_of(row: dict) -> str:
    hot = row["usage"]["hottest"]
    where = f"{hot['role']} {hot['busiest_thread_cores']:.2f}"
    busy, cpus = row["usage"]["machine_busy_cores"], os.cpu_count() or 1
    if hot["busiest_thread_cores"] < 0.85 and busy >= 0.9 * cpus:
        where = f"machine {busy:.2f} of {cpus} cores busy; busiest thread {where}"
    if row["offered_per_s"] < 0.95 * row["target_per_s"]:
        return f"simulator ({where})"
    if row["taken"] < 0.95 * row["published"] or row["ingested_per_s"] < 0.95 * row["offered_per_s"]:
        return f"sink ({where})"
    return f"- ({where})"


def print_table(rows: list[dict], statuses: dict) -> None:
    head = ["rate/dev", "sink", "target/s", "offered/s", "ingest/s", "vs bare", "ack p50 ms", "ack p99 ms",
            "exactly-once", "broker", "workers", "sims", "machine", "RSS b/w/s MiB", "limit (busiest thread)"]
    lines = []
    bare = {r["rate_per_device"]: r["ingested_per_s"] for r in rows if r["sink"] == "bare"}
    for r in rows:
        u = r["usage"]["roles"]
        b = bare.get(r["rate_per_device"])
        eo = r.get("exactly_once")
        lat = r.get("ack_latency_ms") or {}
        lines.append([
            f"{r['rate_per_device']:g}", r["sink"], f"{r['target_per_s']:.0f}", f"{r['offered_per_s']:.0f}",
            f"{r['ingested_per_s']:.0f}", f"{r['ingested_per_s'] / b:.2f}" if b else "-",
            f"{lat['p50']}" if lat.get("p50") is not None else "-",
            f"{lat['p99']}" if lat.get("p99") is not None else "-",
            (("ok" if not eo["undrained"] else f"ok, {eo['undrained']} undrained") if eo["ok"] else
             f"FAIL dup {eo['duplicates']} lost {eo['acked_missing']}") if eo else "-",
            f"{u['broker']['cores']:.2f}", f"{u['workers']['cores']:.2f}" if "workers" in u else
            f"bare {u['bare']['cores']:.2f}", f"{u['simulators']['cores']:.2f}",
            f"{r['usage']['machine_busy_cores']:.2f}",
            f"{u['broker']['rss_mib_max']:.0f}"
            f"/{u['workers' if 'workers' in u else 'bare']['rss_mib_max']:.0f}"
            f"/{u['simulators']['rss_mib_max']:.0f}",
            limit_of(r)])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)))
    for line in lines:
        print("  ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)))
    print(f"retained statuses: {statuses['retained']} of {statuses['devices']} devices, "
          f"{statuses['online']} online, {statuses['offline_clean_stop']} offline by clean stop, "
          f"{statuses['offline_last_will']} by Last Will")


def _counts(text: str, flag: str, kind=int) -> list:  # noqa: ANN001
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        values = []
    if not values or any(v <= 0 for v in values):
        raise SystemExit(f"fleet.py: error: {flag} {text!r}: give positive numbers separated by commas, "
                         f"e.g. {flag} {'1,2,3' if kind is int else '1,5,20'}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=None, help="simulated devices (default 1000; --quick 200)")
    p.add_argument("--procs", type=int, default=4, help="simulator processes the devices are spread over (4)")
    p.add_argument("--workers", default=None, help="worker counts to run, e.g. 1,2,3 (default; --quick 1,2)")
    p.add_argument("--rates", default=None,
                   help="samples/s per device, e.g. 1,5,20,50 (default; --quick 1,5)")
    p.add_argument("--duration", type=float, default=None,
                   help="publishing seconds per phase (10; --quick 4)")
    p.add_argument("--drain", type=float, default=60.0,
                   help="seconds a phase waits after publishing for the last acks (60)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare paho subscriber baseline")
    p.add_argument("--quick", action="store_true", help="200 devices, rates 1,5, workers 1,2, 4 s per phase")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "fleet.json"))
    try:
        args = p.parse_args(argv)
        devices = args.devices if args.devices is not None else (200 if args.quick else 1000)
        workers = _counts(args.workers or ("1,2" if args.quick else "1,2,3"), "--workers")
        rates = _counts(args.rates or ("1,5" if args.quick else "1,5,20,50"), "--rates", float)
        duration = args.duration if args.duration is not None else (4.0 if args.quick else 10.0)
        if devices < 1 or args.procs < 1 or duration <= 0 or args.drain < 0:
            raise SystemExit("fleet.py: error: --devices, --procs and --duration must be positive, "
                             "e.g. --devices 200 --procs 4 --duration 5")
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
            return exitcodes.USAGE
        return exc.code if isinstance(exc.code, int) else exitcodes.USAGE
    procs = min(args.procs, devices)

    from lepton.testing import MosquittoBroker

    ctx = mp.get_context("spawn")
    ids = [f"d{i:05d}" for i in range(devices)]
    rows: list[dict] = []
    sinks = ([("bare", 0)] if not args.no_bare else []) + [("worker", w) for w in workers]
    phases = [(r, s, w) for r in rates for s, w in sinks]
    t0 = time.monotonic()
    with MosquittoBroker() as broker, tempfile.TemporaryDirectory(prefix="lepton-fleet-") as tmp:
        password = broker.add_users("device", ids, fleet=FLEET)
        # Every worker and bare-subscriber user of the run at once: one reload, not one per phase.
        sink_users = [f"p{k}w{i + 1}" for k, (_, _, w) in enumerate(phases) for i in range(w)]
        sink_users += [f"bare{k}" for k, (_, sink, _) in enumerate(phases) if sink == "bare"]
        broker.add_users("worker", sink_users, fleet=FLEET)
        viewer_url = broker.url("viewer", "fleetview", fleet=FLEET)
        _wait_login(broker.url("viewer", "fleetview", fleet=FLEET))
        print(f"{devices} devices in {procs} simulator processes on Mosquitto (project config) port "
              f"{broker.port}; {len(phases)} phases of {duration:g} s", file=sys.stderr, flush=True)
        for k, (rate, sink, w) in enumerate(phases):
            started = time.monotonic()
            row = run_phase(broker, ctx, sink=sink, workers=w, rate=rate, ids=ids, procs=procs,
                            password=password, seq_base=k * 10**9, duration=duration, drain=args.drain,
                            data=Path(tmp) / f"phase{k}", vanish=k == len(phases) - 1, phase=k,
                            viewer_url=viewer_url)
            rows.append(row)
            eo = row.get("exactly_once")
            print(f"phase {k + 1}/{len(phases)}: {rate:g}/s per device, {row['sink']}: offered "
                  f"{row['offered_per_s']:.0f}/s, took {row['ingested_per_s']:.0f}/s"
                  + (f", exactly-once {'ok' if eo['ok'] else 'FAILED'}" if eo else "")
                  + f" ({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        statuses = retained_statuses(viewer_url, ids)
        broker_log_errors = [line for line in broker.log().splitlines() if "rror" in line][-5:]

    exact = all(r["exactly_once"]["ok"] for r in rows if "exactly_once" in r)
    status_ok = (statuses["retained"] == devices and statuses["online"] == 0
                 and statuses["offline_last_will"] > 0)
    print_table(rows, statuses)
    result = {
        "benchmark": "fleet", "broker": "mosquitto (project mosquitto.conf, ACL, one user per device)",
        "devices": devices, "simulator_processes": procs, "duration_s": duration, "tensor_bytes": FLOATS * 4,
        "samples_per_message": 1, "rates": rates, "workers": workers, "rows": rows,
        "retained_statuses": statuses, "exactly_once": exact, "statuses_ok": status_ok,
        "broker_log_errors": broker_log_errors,
        "command": "python bench/fleet.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"), "wall_s": round(time.monotonic() - t0, 1),
    }
    for r in rows:
        r["limit"] = limit_of(r)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    if not exact:
        print("fleet.py: exactly-once FAILED: see rows[].exactly_once in the JSON", file=sys.stderr)
    if not status_ok:
        print(f"fleet.py: retained statuses wrong: {statuses}", file=sys.stderr)
    return exitcodes.OK if exact and status_ok else exitcodes.FAILURE


if __name__ == "__main__":
    sys.exit(main())
