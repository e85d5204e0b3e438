#!/usr/bin/env python3
"""Ingest throughput: durable samples/s stored by the worker vs a bare paho subscriber (the ratio).

    python bench/ingest.py                 # default: 1 and 32 samples per message, 1 KiB tensors
    python bench/ingest.py --messages 20000 --profile

Method, for each shape (samples per message): the messages are queued in Mosquitto (project config,
persistence on) for a persistent session while its client is offline, then the client connects and
drains them; we time connect -> last sample. Queueing first takes the publisher (and its share of the
two cores) out of the measurement, so both sides see the same broker delivering the same bytes:

- baseline: a bare paho subscriber (QoS 1, clean_session=False, auto-ack on receipt, no decoding);
- worker:   lepton's IngestWorker (decode, dedupe in the SQLite index, Parquet write + fsync + rename,
            commit, end-to-end acks to the device, PUBACK after durability).

ratio = median worker samples/s / median baseline samples/s over --repeat runs. With --profile, one
extra worker run per shape (not counted in the figures) runs its store in-process (``store_process=False``)
under cProfile; the top functions (cumulative time) are printed and saved.

Where the time goes: each run records the CPU seconds of every thread during the drain, and of the
worker's store child (``cpu_s_by_thread`` in bench/results/ingest.json, printed below the table; the
child's key is ``store-child``). The worker's MQTT process runs paho's network thread, the batching
thread (``lepton-ingest-NAME``) and the result thread (``lepton-ingest-NAME-acks``: device acks,
PUBACKs in bulk); they share one GIL, so that process's ratio is roughly bare paho CPU / (their sum).
The store child (msgpack decode, the protocol's rules checked per envelope, Arrow columns, Parquet +
fsync, the SQLite index) runs on the other core; whichever of the two is slower sets the rate.
With --profile, the store's cumulative profile (run in-process for it) shows which step dominates.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import logging
import os
import pstats
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from lepton.cloud import Dataset, IngestWorker, WorkerConfig  # noqa: E402
from lepton.protocol import BrokerURL, Sample, Topics, connect, encode_samples, new_client  # noqa: E402
from lepton.testing import MosquittoBroker  # noqa: E402


def thread_cpu() -> dict[str, float]:
    """CPU seconds (user + system) used so far by each live thread of this process, by thread name
    (Linux ``/proc/self/task``; empty elsewhere). Diffed around a drain, it says which thread the GIL
    spent the time in."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for t in threading.enumerate():
        try:
            fields = Path(f"/proc/self/task/{t.native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        name = "paho" if t.name.startswith("paho-mqtt-client") else t.name
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def _cpu_diff(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: round(v - before.get(k, 0.0), 3) for k, v in after.items() if v - before.get(k, 0.0) > 0}


def payloads(device: str, messages: int, per_message: int, floats: int) -> list[bytes]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(floats).astype(np.float32)
    out, seq = [], 0
    for _ in range(messages):
        batch = [Sample(seq=seq + i, ts=1.7e9 + seq + i, x=x, y=(seq + i) % 10) for i in range(per_message)]
        seq += per_message
        out.append(encode_samples(device, batch, pipeline="bench"))
    return out


def queue_messages(broker: MosquittoBroker, fleet: str, device: str, data: list[bytes]) -> None:
    url = BrokerURL.parse(broker.url("device", device, fleet=fleet))
    client = new_client(url, client_id=f"bench-pub-{uuid.uuid4().hex[:6]}", max_inflight=1000)
    connect(client, url)
    topic = Topics(fleet=fleet).samples(device)
    infos = [client.publish(topic, p, qos=1) for p in data]
    for info in infos:
        info.wait_for_publish(60)
    client.disconnect()
    client.loop_stop()


def bare_subscriber(
    broker: MosquittoBroker, fleet: str, device: str, data: list[bytes], per_message: int
) -> float:
    url = BrokerURL.parse(broker.url("worker", f"bare-{fleet}", fleet=fleet))
    topics = Topics(fleet=fleet)
    client_id = f"bench-bare-{fleet}"
    # 1. create the persistent session, 2. queue while offline, 3. drain and time it.
    c = new_client(url, client_id=client_id, clean_session=False)
    connect(c, url)
    c.subscribe(topics.all_devices("samples"), qos=1)
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()
    queue_messages(broker, fleet, device, data)
    done = threading.Event()
    got = [0]

    def on_message(client, userdata, msg):  # noqa: ANN001
        got[0] += 1
        if got[0] == len(data):
            done.set()

    c = new_client(url, client_id=client_id, clean_session=False)
    c.on_message = on_message
    cpu0 = thread_cpu()
    t0 = time.perf_counter()
    connect(c, url)
    if not done.wait(120):
        raise RuntimeError(f"bare subscriber got {got[0]} of {len(data)} messages")
    elapsed = time.perf_counter() - t0
    cpu = _cpu_diff(cpu0, thread_cpu())
    c.disconnect()
    c.loop_stop()
    return len(data) * per_message / elapsed, cpu


def worker_run(
    broker: MosquittoBroker,
    fleet: str,
    device: str,
    data: list[bytes],
    per_message: int,
    root: Path,
    profile: bool,
    max_pending: int = 1000,
) -> tuple[float, dict, str]:
    cfg = WorkerConfig(
        broker=broker.url("worker", f"wk-{fleet}", fleet=fleet),
        fleet=fleet,
        data=root,
        name="wk",
        status_interval=60,
        max_pending=max_pending,
    )
    w = IngestWorker(cfg)
    w.start()  # creates the persistent session and subscription
    w.stop()
    queue_messages(broker, fleet, device, data)
    prof = cProfile.Profile() if profile else None
    if prof is not None:  # cProfile sees this process only: run the store in-process to profile it
        from dataclasses import replace

        from lepton.cloud._ingest_runner import StoreRunner

        cfg = replace(cfg, store_process=False)
        inner = StoreRunner.run

        def profiled(self, batch):  # noqa: ANN001, ANN202
            prof.enable()
            try:
                return inner(self, batch)
            finally:
                prof.disable()

        StoreRunner.run = profiled  # type: ignore[method-assign]
    w = IngestWorker(cfg)
    total = len(data) * per_message
    cpu0 = thread_cpu()
    t0 = time.perf_counter()
    w.start()
    if not w.wait_stored(total, timeout=120):
        raise RuntimeError(f"worker stored {w.stats.stored} of {total}; broker log:\n{broker.log()[-3000:]}")
    elapsed = time.perf_counter() - t0
    status = w.status()
    status["cpu_s"] = _cpu_diff(cpu0, thread_cpu())
    pid = getattr(w, "store_pid", None)
    if pid is not None:  # the store child (started by w.start()): all of its CPU is this drain's
        import psutil

        times = psutil.Process(pid).cpu_times()
        status["cpu_s"]["store-child"] = round(times.user + times.system, 3)
    w.stop()
    count = Dataset(root, fleet).count()
    if count != total:
        raise RuntimeError(f"dataset holds {count} samples, expected {total}")
    text = ""
    if prof is not None:
        StoreRunner.run = inner  # type: ignore[method-assign]
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(18)
        text = buf.getvalue()
    return total / elapsed, status, text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--messages", type=int, default=20_000, help="messages for 1 sample/message (default 20000)"
    )
    p.add_argument(
        "--batched-messages",
        type=int,
        default=1_500,
        help="messages for 32 samples/message (default 1500 = 48,000 samples)",
    )
    p.add_argument("--floats", type=int, default=256, help="float32 per tensor (default 256 = 1 KiB)")
    p.add_argument("--profile", action="store_true", help="profile the worker's store, run in-process (cProfile)")
    p.add_argument("--repeat", type=int, default=3, help="runs per shape; medians are reported (default 3)")
    p.add_argument("--out", default=str(HERE / "results" / "ingest.json"))
    p.add_argument("--log-level", default="WARNING")
    p.add_argument(
        "--inflight",
        type=int,
        default=None,
        metavar="N",
        help="override Mosquitto's max_inflight_messages (project config: 1000) and the worker's "
        "--max-pending to N, to see what a wider window buys",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(threadName)s %(name)s: %(message)s")

    rows = []
    profiles = {}
    extra = f"max_inflight_messages {args.inflight}" if args.inflight else ""
    window = args.inflight or 1000
    with MosquittoBroker(extra=extra) as broker, tempfile.TemporaryDirectory() as tmp:
        for per_message, messages in ((1, args.messages), (32, args.batched_messages)):
            bases, rates, files, cpus = [], [], [], []
            for rep in range(args.repeat):
                # A device account belongs to one fleet (the broker's ACL): each run has its own device.
                base_dev, work_dev = f"bench-b{per_message}-{rep}", f"bench-w{per_message}-{rep}"
                base_rate, base_cpu = bare_subscriber(
                    broker,
                    f"bb{per_message}-{rep}",
                    base_dev,
                    payloads(base_dev, messages, per_message, args.floats),
                    per_message,
                )
                bases.append(base_rate)
                data = payloads(work_dev, messages, per_message, args.floats)
                rate, status, _ = worker_run(
                    broker, f"bw{per_message}-{rep}", work_dev, data, per_message, Path(tmp), False, window
                )
                rates.append(rate)
                files.append(status["files"])
                cpus.append({"bare": base_cpu, "worker": status["cpu_s"]})
            if args.profile:  # a separate run: cProfile slows the worker, so it never feeds the figures
                prof_dev = f"bench-p{per_message}"
                data = payloads(prof_dev, messages, per_message, args.floats)
                _, _, profiles[str(per_message)] = worker_run(
                    broker, f"bp{per_message}", prof_dev, data, per_message, Path(tmp), True, window
                )
            base, rate = statistics.median(bases), statistics.median(rates)
            rows.append(
                {
                    "samples_per_message": per_message,
                    "messages": messages,
                    "samples": messages * per_message,
                    "tensor_bytes": args.floats * 4,
                    "payload_bytes": len(data[0]),
                    "bare_samples_per_s": round(base, 1),
                    "worker_samples_per_s": round(rate, 1),
                    "ratio": round(rate / base, 3),
                    "files": files[0],
                    "runs": [
                        {"bare": round(b, 1), "worker": round(r, 1), "ratio": round(r / b, 3),
                         "cpu_s_by_thread": c}
                        for b, r, c in zip(bases, rates, cpus, strict=True)
                    ],
                }
            )

    print(
        f"Mosquitto max_inflight_messages {window}, {args.floats * 4} B tensors, median of {args.repeat} runs"
    )
    head = ("samples/msg", "messages", "samples", "bare/s", "worker/s", "ratio", "files")
    print(" ".join(f"{h:>{w}}" for h, w in zip(head, (11, 9, 8, 10, 10, 6, 6), strict=True)))
    for r in rows:
        print(
            f"{r['samples_per_message']:>11} {r['messages']:>9} {r['samples']:>8} "
            f"{r['bare_samples_per_s']:>10.0f} {r['worker_samples_per_s']:>10.0f} "
            f"{r['ratio']:>6.2f} {r['files']:>6}"
        )
    print("\nCPU seconds by thread during each drain (store-child: the worker's store process):")
    for r in rows:
        for i, run in enumerate(r["runs"]):
            c = run["cpu_s_by_thread"]
            print(f"  {r['samples_per_message']:>2}/msg run {i}: bare {c['bare']}  worker {c['worker']}")
    for k, text in profiles.items():
        print(f"\n--- worker store profile (in-process), {k} sample(s)/message (cumulative) ---")
        print("\n".join(text.splitlines()[:40]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "benchmark": "ingest",
                "broker": "mosquitto (project mosquitto.conf)",
                "method": "drain of messages queued for a persistent session; "
                "connect -> last sample durable; median of --repeat runs",
                "max_inflight_messages": window,
                "rows": rows,
                "profiles": profiles,
            },
            indent=2,
        )
    )
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
