#!/usr/bin/env python3
"""Hot-swap: time from a retained model publish to the first inference on it, and inference served meanwhile.

    python bench/hotswap.py             # 10 device runtimes, one process each (like real devices)
    python bench/hotswap.py --devices 4 --procs 1 --broker amqtt --reps-small 3 --reps-large 1

Setup: one broker (Mosquitto when installed, else the embedded amqtt); ``--devices`` ModelRuntime
instances, each with its own paho client, its own last-good-model directory and its own inference
thread calling ``predict()`` at ``--rate`` Hz (a camera-paced device), spread over ``--procs``
processes. A publisher sends each model as the cloud does (retained chunks, then the retained signed
manifest) and clears the previous version's chunks once every device has moved on.

Figures, per model size (a ~1 MB and a ~20 MB fp32 MLP, verified with an Ed25519 signature):

* swap latency: from the start of the publish to each device's first inference on the new version
  (p50 / p99 / max over devices x repetitions). It includes transfer through the broker, sha256 of
  every chunk and of the whole model, the signature check, building and warming the new
  InferenceSession, the disk write of the last good model, and the swap itself.
* served ratio: inferences served by all devices in the swap window ``[publish, last device swapped]``
  (at least ``--min-window`` long) divided by inferences served in a window of the same length right
  after it, with no swap (the baseline measured in the same run). Target 1.0, zero failed inferences.
* max gap: the longest pause between two inferences of one device, in swap windows vs quiet windows.
  With 10 device processes on a small machine this mostly measures CPU contention (every device
  hashes and loads the new model at the same moment), so a second figure isolates the runtime:
* stall probe: one runtime in its own process, inferring back to back, fed 3 swaps in-process (no
  broker): the longest pause between two inferences during a swap vs during a quiet period as long.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODEL = "bench"
PIPE = "bench-pipeline-0"
N_IN, N_OUT = 64, 10


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------
def make_model(target_bytes: int, seed: int) -> bytes:
    """An MLP 64 -> H -> 10 (softmax) whose float32 weights come to about ``target_bytes``."""
    from onnx import TensorProto, helper, numpy_helper

    hidden = max(8, target_bytes // (4 * (N_IN + N_OUT + 1)))
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(rng.normal(0, 0.05, (N_IN, hidden)).astype(np.float32), "w1"),
             numpy_helper.from_array(np.zeros(hidden, np.float32), "b1"),
             numpy_helper.from_array(rng.normal(0, 0.05, (hidden, N_OUT)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.zeros(N_OUT, np.float32), "b2")]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Add", ["a", "b1"], ["b"]),
             helper.make_node("Relu", ["b"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["c"]),
             helper.make_node("Add", ["c", "b2"], ["d"]), helper.make_node("Softmax", ["d"], ["p"], axis=-1)]
    graph = helper.make_graph(nodes, "bench",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", N_IN])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", N_OUT])],
                              initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


# ------------------------------------------------------------------------------------------------
# device processes
# ------------------------------------------------------------------------------------------------
def device_process(wid: int, names: list[str], urls: list[str], fleet: str, pub_key_path: str, store: str,
                   rate: float, events: mp.Queue, control: mp.Queue) -> None:
    """Host several device runtimes, each with its own paho client and paced inference thread."""
    import logging

    from lepton.device import ModelRuntime
    from lepton.protocol import BrokerURL, Topics, connect, load_public_key, new_client

    logging.basicConfig(level=logging.WARNING)
    topics = Topics(fleet=fleet)
    key = load_public_key(pub_key_path)
    stop = threading.Event()
    devices = []
    for name, url in zip(names, urls, strict=True):
        runtime = ModelRuntime(topics=topics, model=MODEL, store_dir=Path(store) / name, public_key=key,
                               pipeline_hash=PIPE, input_shape=(N_IN,))
        broker = BrokerURL.parse(url)
        client = new_client(broker, client_id=name)
        subscribed = threading.Event()

        def on_connect(c, u, f, rc, p, runtime=runtime):
            for topic_filter, qos in runtime.subscriptions():
                c.subscribe(topic_filter, qos)

        def on_message(c, u, m, runtime=runtime):
            runtime.handle_message(m.topic, m.payload, m.retain)

        client.on_connect = on_connect
        client.on_subscribe = lambda c, u, mid, rcs, p, ev=subscribed: ev.set()
        client.on_message = on_message
        connect(client, broker)
        subscribed.wait(10)
        devices.append({"name": name, "runtime": runtime, "client": client, "ts": [], "ver": [],
                        "failures": 0, "seen": set()})

    def infer(dev: dict) -> None:
        runtime, period = dev["runtime"], 1.0 / rate
        x = np.random.default_rng(0).normal(size=N_IN).astype(np.float32)
        next_at = time.monotonic()
        while not stop.is_set():
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + period, time.monotonic() - 1.0)
            pred = runtime.predict(x)
            now = time.time()
            if pred is None:
                if dev["seen"]:
                    dev["failures"] += 1
                continue
            dev["ts"].append(now)
            dev["ver"].append(pred.version)
            if pred.version not in dev["seen"]:
                dev["seen"].add(pred.version)
                events.put(("version", dev["name"], pred.version, now))

    threads = [threading.Thread(target=infer, args=(d,), daemon=True) for d in devices]
    for t in threads:
        t.start()
    events.put(("ready", wid, len(devices)))
    control.get()  # stop
    stop.set()
    for t in threads:
        t.join(5)
    out = []
    for d in devices:
        d["client"].disconnect()
        d["client"].loop_stop()
        tel = d["runtime"].telemetry()
        out.append({"name": d["name"], "ts": d["ts"], "ver": d["ver"], "failures": d["failures"],
                    "runtime_failures": tel["inference_failures"], "rejections": tel["model_rejections"],
                    "history": d["runtime"].swap_history(),
                    "inference_ms": {k: tel[f"inference_ms_{k}"] for k in ("mean", "p50", "p99")}})
        d["runtime"].close()
    events.put(("done", wid, out))


def stall_probe(size_bytes: int, reps: int, results: mp.Queue) -> None:
    """One runtime, one thread inferring back to back, a model of ``size_bytes`` fed in-process.

    Isolates the runtime from the broker and from other device processes: the longest pause between
    two inferences while a swap is in progress, against the longest pause in a quiet period as long.
    """
    from lepton.device import ModelRuntime
    from lepton.protocol import Topics, build_package, generate_keypair, load_private_key, load_public_key

    work = Path(tempfile.mkdtemp(prefix="lepton-bench-stall-"))
    priv, pub = generate_keypair(work / "keys")
    key = load_private_key(priv)
    topics = Topics(fleet="probe")
    runtime = ModelRuntime(topics=topics, model=MODEL, store_dir=work / "store",
                           public_key=load_public_key(pub), pipeline_hash=PIPE, input_shape=(N_IN,))

    def messages(version: int, data: bytes) -> list[tuple[str, bytes]]:
        manifest, chunks = build_package(fleet=topics.fleet, name=MODEL, version=version, data=data,
                                         input_spec={"name": "x", "shape": [-1, N_IN], "dtype": "float32"},
                                         labels=[str(i) for i in range(N_OUT)],
                                         pipeline={"hash": PIPE, "spec": {}}, private_key=key)
        return [(topics.model_chunk(MODEL, version, i), c) for i, c in enumerate(chunks)] + \
            [(topics.model(MODEL), manifest)]

    batches = [messages(v, make_model(size_bytes, 500 + v)) for v in range(1, reps + 2)]
    for topic, payload in batches[0]:
        runtime.handle_message(topic, payload, True)
    while runtime.version != 1:
        time.sleep(0.01)
    stamps: list[float] = []
    stop = threading.Event()
    x = np.zeros(N_IN, np.float32)

    def loop() -> None:
        while not stop.is_set():
            runtime.predict(x)
            stamps.append(time.perf_counter())

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    time.sleep(0.3)
    swap_gaps, quiet_gaps = [], []
    for version, batch in enumerate(batches[1:], start=2):
        t0 = time.perf_counter()
        for topic, payload in batch:  # what paho's network thread does, message by message
            runtime.handle_message(topic, payload, True)
        while runtime.version != version:
            time.sleep(0.001)
        t1 = time.perf_counter()
        time.sleep((t1 - t0) + 0.1)
        ts = np.asarray(stamps)
        for lo, hi, acc in ((t0, t1, swap_gaps), (t1 + 0.05, t1 + 0.05 + (t1 - t0), quiet_gaps)):
            inside = ts[(ts >= lo) & (ts <= hi)]
            acc.append(float(np.diff(inside).max() * 1000) if inside.size > 1 else None)
    stop.set()
    thread.join(5)
    tel = runtime.telemetry()
    runtime.close()
    results.put({"model_bytes": len(make_model(size_bytes, 0)), "swaps": reps,
                 "inference_ms_p50": tel["inference_ms_p50"],
                 "inference_ms_p99": tel["inference_ms_p99"],
                 "max_gap_ms_swap": round(max(g for g in swap_gaps if g is not None), 2),
                 "max_gap_ms_quiet": round(max(g for g in quiet_gaps if g is not None), 2),
                 "failures": tel["inference_failures"]})


# ------------------------------------------------------------------------------------------------
# coordinator
# ------------------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10)
    parser.add_argument("--procs", type=int, default=None,
                        help="processes hosting the device runtimes (default: one per device)")
    parser.add_argument("--min-window", type=float, default=1.0,
                        help="shortest swap window in seconds for the served ratio (default 1)")
    parser.add_argument("--rate", type=float, default=20.0, help="inferences per second per device")
    parser.add_argument("--small-mb", type=float, default=1.0)
    parser.add_argument("--large-mb", type=float, default=20.0)
    parser.add_argument("--reps-small", type=int, default=5)
    parser.add_argument("--reps-large", type=int, default=3)
    parser.add_argument("--broker", choices=["mosquitto", "amqtt"], default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "hotswap.json"))
    args = parser.parse_args(argv)
    args.procs = max(1, min(args.procs or args.devices, args.devices))

    from lepton.protocol import (
        BrokerURL,
        Topics,
        build_package,
        connect,
        generate_keypair,
        load_private_key,
        new_client,
    )
    from lepton.testing import AmqttBroker, MosquittoBroker, mosquitto_available

    kind = args.broker or ("mosquitto" if mosquitto_available() else "amqtt")
    work = Path(tempfile.mkdtemp(prefix="lepton-bench-hotswap-"))
    fleet = f"bench{os.getpid()}"
    topics = Topics(fleet=fleet)
    priv_path, pub_path = generate_keypair(work / "keys")
    private = load_private_key(priv_path)
    sizes = {"small": int(args.small_mb * 1024 * 1024), "large": int(args.large_mb * 1024 * 1024)}
    print(f"building models ({args.small_mb:g} MB and {args.large_mb:g} MB) ...", flush=True)
    models = {"small": [make_model(sizes["small"], s) for s in range(1, args.reps_small + 2)],
              "large": [make_model(sizes["large"], 100 + s) for s in range(args.reps_large)]}

    broker_handle = MosquittoBroker() if kind == "mosquitto" else AmqttBroker()
    broker_handle.start()
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    procs, controls = [], []
    try:
        pub_url = BrokerURL.parse(broker_handle.url("worker", "bench-cloud", fleet=fleet))
        publisher = new_client(pub_url, client_id="bench-cloud", max_inflight=100)
        connect(publisher, pub_url)
        names = [f"dev-{i:02d}" for i in range(args.devices)]
        groups = [names[i::args.procs] for i in range(args.procs)]
        for wid, group in enumerate(groups):
            urls = [broker_handle.url("device", n, fleet=fleet) for n in group]
            control = ctx.Queue()
            p = ctx.Process(target=device_process, daemon=True,
                            args=(wid, group, urls, fleet, str(pub_path), str(work / "store"), args.rate,
                                  events, control))
            p.start()
            procs.append(p)
            controls.append(control)
        first_seen: dict[tuple[str, int], float] = {}

        def pump(timeout: float) -> list:
            got = []
            try:
                item = events.get(timeout=timeout)
                while True:
                    if item[0] == "version":
                        first_seen[(item[1], item[2])] = item[3]
                    got.append(item)
                    item = events.get_nowait()
            except queue.Empty:
                pass
            return got

        ready = 0
        deadline = time.monotonic() + 120
        while ready < len(procs) and time.monotonic() < deadline:
            ready += sum(1 for item in pump(1.0) if item[0] == "ready")
        if ready < len(procs):
            raise RuntimeError("device processes did not start")

        def publish(version: int, data: bytes, parent: int | None) -> tuple[float, float, int]:
            manifest, chunks = build_package(fleet=fleet, name=MODEL, version=version, data=data,
                                             input_spec={"name": "x", "shape": [-1, N_IN],
                                                         "dtype": "float32"},
                                             labels=[str(i) for i in range(N_OUT)],
                                             pipeline={"hash": PIPE, "spec": {}}, parent=parent,
                                             private_key=private)
            start = time.time()
            infos = [publisher.publish(topics.model_chunk(MODEL, version, i), c, qos=1, retain=True)
                     for i, c in enumerate(chunks)]
            infos.append(publisher.publish(topics.model(MODEL), manifest, qos=1, retain=True))
            for info in infos:
                info.wait_for_publish(120)
            return start, time.time(), len(chunks)

        def wait_all(version: int, timeout: float = 300) -> float:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if all((n, version) in first_seen for n in names):
                    return max(first_seen[(n, version)] for n in names)
                pump(0.2)
            missing = [n for n in names if (n, version) not in first_seen]
            raise RuntimeError(f"v{version} never reached {missing}")

        def clear(version: int, n_chunks: int) -> None:
            for info in [publisher.publish(topics.model_chunk(MODEL, version, i), b"", qos=1, retain=True)
                         for i in range(n_chunks)]:
                info.wait_for_publish(60)

        print(f"{args.devices} device runtimes in {args.procs} process(es), {kind}, "
              f"{args.rate:g} inferences/s per device", flush=True)
        version, prev_chunks = 1, 0
        _, _, prev_chunks = publish(1, models["small"][0], None)
        wait_all(1)
        time.sleep(1.0)
        swaps = []  # (size, version, start, published, done, quiet_end)
        plan = [("small", m) for m in models["small"][1:]] + [("large", m) for m in models["large"]]
        for size, data in plan:
            version += 1
            start, published, n_chunks = publish(version, data, version - 1)
            done = wait_all(version)
            clear(version - 1, prev_chunks)
            prev_chunks = n_chunks
            window = max(done - start, args.min_window)
            time.sleep(max(0.0, start + window - time.time()) + window + 0.5)  # a quiet window follows
            swaps.append({"size": size, "version": version, "start": start, "published": published,
                          "done": done, "end": start + window, "window_s": window, "bytes": len(data)})
            print(f"  v{version} ({size}, {len(data) / 1e6:.1f} MB): published (all PUBACKs) in "
                  f"{(published - start) * 1000:.0f} ms, all {args.devices} devices swapped in "
                  f"{(done - start) * 1000:.0f} ms", flush=True)
            pump(0.0)
        for control in controls:
            control.put("stop")
        results = []
        deadline = time.monotonic() + 60
        while len(results) < len(procs) and time.monotonic() < deadline:
            for item in pump(1.0):
                if item[0] == "done":
                    results.extend(item[2])
        publisher.disconnect()
        publisher.loop_stop()
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
        broker_handle.stop()

    per_size: dict[str, dict] = {}
    for size in ("small", "large"):
        events_ = [s for s in swaps if s["size"] == size]
        latencies, ready_ms, served_swap, served_quiet, gap_swap, gap_quiet = [], [], 0, 0, [], []
        for s in events_:
            w0, w1 = s["start"], s["end"]
            q0, q1 = w1 + 0.25, w1 + 0.25 + (w1 - w0)
            for dev in results:
                ts = np.asarray(dev["ts"])
                latencies.append((first_seen[(dev["name"], s["version"])] - w0) * 1000)
                served_swap += int(((ts >= w0) & (ts < w1)).sum())
                served_quiet += int(((ts >= q0) & (ts < q1)).sum())
                for lo, hi, acc in ((w0, w1, gap_swap), (q0, q1, gap_quiet)):
                    inside = ts[(ts >= lo - 1.0 / args.rate) & (ts < hi)]
                    if inside.size > 1:
                        acc.append(float(np.diff(inside).max() * 1000))
                ready_ms += [h["ready_ms"] for h in dev["history"]
                             if h["version"] == s["version"] and h["ready_ms"]]
        per_size[size] = {
            "model_bytes": events_[0]["bytes"] if events_ else None,
            "swaps": len(events_),
            "devices": args.devices,
            "swap_latency_ms": {"p50": pct(latencies, 50), "p99": pct(latencies, 99),
                                "max": round(max(latencies), 1) if latencies else None},
            "manifest_to_ready_ms_p50": pct(ready_ms, 50),
            "served_in_swap_windows": served_swap,
            "served_in_quiet_windows": served_quiet,
            "served_ratio": round(served_swap / served_quiet, 4) if served_quiet else None,
            "max_gap_ms_swap": round(max(gap_swap), 1) if gap_swap else None,
            "max_gap_ms_quiet": round(max(gap_quiet), 1) if gap_quiet else None,
        }
    probes = {}
    for size in ("small", "large"):
        probe_q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=stall_probe, args=(sizes[size], 3, probe_q), daemon=True)
        proc.start()
        probes[size] = probe_q.get(timeout=300)
        proc.join(30)

    timeline = []
    for s in swaps:
        ready = sorted(h["ready_ms"] for d in results for h in d["history"]
                       if h["version"] == s["version"] and h["ready_ms"])
        timeline.append({"version": s["version"], "size": s["size"], "bytes": s["bytes"],
                         "publish_ms": round((s["published"] - s["start"]) * 1000, 1),
                         "all_swapped_ms": round((s["done"] - s["start"]) * 1000, 1),
                         "manifest_to_ready_ms_max": round(ready[-1], 1) if ready else None,
                         "steps_ms_max": {k: max((h.get(k) or 0 for d in results for h in d["history"]
                                                  if h["version"] == s["version"]), default=None)
                                          for k in ("verify_ms", "stage_ms", "load_ms")}})
    failures = sum(d["failures"] + d["runtime_failures"] for d in results)
    failures += sum(r["failures"] for r in probes.values())
    rejections = sum(d["rejections"] for d in results)
    summary = {
        "config": {"devices": args.devices, "processes": args.procs, "broker": kind, "rate_hz": args.rate,
                   "reps_small": args.reps_small, "reps_large": args.reps_large,
                   "layout": "each runtime has its own paho client; runtimes spread over the processes"},
        "sizes": per_size,
        "swaps": timeline,
        "failed_inferences": failures,
        "rejections": rejections,
        "inferences_total": sum(len(d["ts"]) for d in results),
        "stall_probe": probes,
    }

    print()
    header = f"{'model':>8} {'swaps':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} {'ready p50':>9} " \
             f"{'served swap/quiet':>19} {'ratio':>6} {'max gap swap/quiet ms':>22}"
    print(header)
    print("-" * len(header))
    for r in per_size.values():
        mb = f"{(r['model_bytes'] or 0) / 1e6:.1f}MB"
        lat = r["swap_latency_ms"]
        print(f"{mb:>8} {r['swaps']:>5} {lat['p50']!s:>8} {lat['p99']!s:>8} {lat['max']!s:>8} "
              f"{r['manifest_to_ready_ms_p50']!s:>9} "
              f"{r['served_in_swap_windows']:>9}/{r['served_in_quiet_windows']:<9} "
              f"{r['served_ratio']!s:>6} {r['max_gap_ms_swap']!s:>11}/{r['max_gap_ms_quiet']!s:<10}")
    print("\nstall probe: 1 runtime in its own process, inference back to back, 3 swaps fed in-process")
    print(f"{'model':>8} {'inference p50/p99 ms':>21} {'max gap swap ms':>16} {'max gap quiet ms':>17}")
    for r in probes.values():
        print(f"{r['model_bytes'] / 1e6:>6.1f}MB {r['inference_ms_p50']!s:>10}/{r['inference_ms_p99']!s:<10} "
              f"{r['max_gap_ms_swap']!s:>16} {r['max_gap_ms_quiet']!s:>17}")
    print(f"\nfailed inferences: {failures}   rejections: {rejections}   "
          f"({args.devices} runtimes, {args.procs} processes, {kind}, {args.rate:g} Hz each)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if failures == 0 and rejections == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
