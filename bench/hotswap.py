#!/usr/bin/env python3
"""Hot-swap: time from a retained model publish to the first inference on it, and inference served meanwhile.

    python bench/hotswap.py             # 10 device runtimes, one process each (like real devices)
    python bench/hotswap.py --devices 4 --procs 1 --broker amqtt --reps-small 3 --reps-large 1

Setup: one broker (Mosquitto when installed, else the embedded amqtt); ``--devices`` ModelRuntime
instances, each with its own paho client, its own last-good-model directory and its own inference
thread calling ``predict()`` at ``--rate`` Hz (a camera-paced device), spread over ``--procs``
processes. A publisher sends each model as retained QoS 1 messages (by default the chunks, then the
signed manifest; see ``--order``) and clears the previous version's chunks once every device has
moved on.

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
* where the time goes, per device and swap, in ms from the publish start: first chunk and last chunk
  received (paho's callback), manifest received, assembled (verified whole, before staging), built
  (session loaded and warmed up, swapped in), first inference on it; p50 and max in the table, every
  device's in the JSON (``swaps[].devices_ms``).
* transport floor: after each swap's quiet window the same bytes are published the same way on
  another model's topics to ``--devices`` bare paho subscribers (one process each, subscribed like a
  device at QoS 0) that only count bytes: publish start to the last byte at each is what no device
  code can beat on this broker and machine.
* CPU seconds per swap (from each process's own clock, and /proc for Mosquitto): all device processes
  together and per device, the broker; the same for the floor's subscribers.

``--order manifest-first`` publishes as docs/protocol.md and lepton.cloud do (the manifest, then the
chunks); the default keeps this bench's historical order (the chunks, then the manifest), in which a
device can verify nothing before the last message.
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
FLOOR_MODEL = "floor"  # the transport floor's topics: the same shape, another model name
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
                   rate: float, events: mp.Queue, control: mp.Queue, options: dict) -> None:
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
                               pipeline_hash=PIPE, input_shape=(N_IN,), **options)
        broker = BrokerURL.parse(url)
        client = new_client(broker, client_id=name)
        subscribed = threading.Event()

        def on_connect(c, u, f, rc, p, runtime=runtime):
            for topic_filter, qos in runtime.subscriptions():
                c.subscribe(topic_filter, qos)

        arrivals: dict[int, dict] = {}  # version -> first/last chunk arrival (wall clock), chunk count
        manifests: list[float] = []  # arrival of each manifest message (its version is known once verified)

        def on_message(c, u, m, runtime=runtime, arrivals=arrivals, manifests=manifests):
            now = time.time()
            if "/v/" in m.topic and m.payload:  # .../models/bench/v/{version}/chunks/{index}
                got = arrivals.setdefault(int(m.topic.split("/v/")[1].split("/")[0]), {"first_chunk": now})
                got["last_chunk"] = now
                got["chunks"] = got.get("chunks", 0) + 1
            elif m.payload:
                manifests.append(now)
            runtime.handle_message(m.topic, m.payload, m.retain)

        client.on_connect = on_connect
        client.on_subscribe = lambda c, u, mid, rcs, p, ev=subscribed: ev.set()
        client.on_message = on_message
        connect(client, broker)
        subscribed.wait(10)
        devices.append({"name": name, "runtime": runtime, "client": client, "ts": [], "ver": [],
                        "failures": 0, "seen": set(), "arrivals": arrivals,
                        "manifests": manifests})

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

    cpu: list[tuple[float, float]] = []  # (wall clock, CPU seconds of this process)

    def sample_cpu() -> None:
        while not stop.is_set():
            cpu.append((time.time(), time.process_time()))
            time.sleep(0.02)

    threads = [threading.Thread(target=infer, args=(d,), daemon=True) for d in devices]
    threads.append(threading.Thread(target=sample_cpu, daemon=True))
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
        out.append({"name": d["name"], "wid": wid, "ts": d["ts"], "ver": d["ver"], "failures": d["failures"],
                    "arrivals": d["arrivals"], "manifests": d["manifests"], "cpu": cpu,
                    "runtime_failures": tel["inference_failures"], "rejections": tel["model_rejections"],
                    "history": d["runtime"].swap_history(),
                    "inference_ms": {k: tel[f"inference_ms_{k}"] for k in ("mean", "p50", "p99")}})
        d["runtime"].close()
    events.put(("done", wid, out))


def floor_process(name: str, url: str, fleet: str, events: mp.Queue, control: mp.Queue) -> None:
    """The transport floor: a bare paho subscriber that subscribes like a device (the same filter shape,
    QoS 0) to the ``FLOOR_MODEL`` topics and only counts bytes (and reads the chunk count from the
    manifest). Per version: when its first message and its last byte arrived, and how many bytes came."""
    from lepton.protocol import BrokerURL, Topics, connect, new_client, parse_manifest

    topics = Topics(fleet=fleet)
    broker = BrokerURL.parse(url)
    client = new_client(broker, client_id=name)
    subscribed = threading.Event()
    got: dict[int, dict] = {}  # version -> first arrival, bytes, chunks, chunks expected

    def on_message(c, u, m) -> None:
        now = time.time()
        if not m.payload:
            return
        if "/v/" in m.topic:
            version, n, expect = int(m.topic.split("/v/")[1].split("/")[0]), 1, None
        else:  # the manifest
            manifest = parse_manifest(m.payload)[0]
            version, n, expect = manifest.version, 0, len(manifest.chunks)
        v = got.setdefault(version, {"first": now, "nbytes": 0, "chunks": 0, "expect": None})
        v["nbytes"] += len(m.payload)
        v["chunks"] += n
        if expect is not None:
            v["expect"] = expect
        if v["expect"] is not None and v["chunks"] == v["expect"]:
            events.put(("floor", name, version, v["first"], now, v["nbytes"]))
            v["expect"] = -1  # reported

    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.model_filter(FLOOR_MODEL), 0)
    client.on_subscribe = lambda c, u, mid, rcs, p: subscribed.set()
    client.on_message = on_message
    connect(client, broker)
    subscribed.wait(10)
    stop = threading.Event()
    cpu: list[tuple[float, float]] = []

    def sample_cpu() -> None:
        while not stop.is_set():
            cpu.append((time.time(), time.process_time()))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample_cpu, daemon=True)
    sampler.start()
    events.put(("floor_ready", name))
    control.get()
    stop.set()
    sampler.join(5)
    client.disconnect()
    client.loop_stop()
    events.put(("floor_done", name, cpu))


def cpu_in(samples: list, lo: float, hi: float) -> float | None:
    """CPU seconds spent between wall-clock times ``lo`` and ``hi``, from (wall, cpu) samples."""
    if len(samples) < 2:
        return None
    walls, cpus = np.asarray(samples).T
    return float(np.interp(hi, walls, cpus) - np.interp(lo, walls, cpus))


def stall_probe(size_bytes: int, reps: int, results: mp.Queue, options: dict) -> None:
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
                           public_key=load_public_key(pub), pipeline_hash=PIPE, input_shape=(N_IN,),
                           **options)

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
def pct(values: list[float], q: float, digits: int = 1) -> float | None:
    return round(float(np.percentile(values, q)), digits) if values else None


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
    parser.add_argument("--prepack-max-mb", type=float, default=None,
                        help="ModelRuntime(prepack_max_bytes=...) of the devices and the stall probe: build "
                             "larger models without ONNX Runtime's weight prepacking; -1: always prepack "
                             "(default: the runtime's default)")
    parser.add_argument("--order", choices=["chunks-first", "manifest-first"], default="chunks-first",
                        help="chunks then the manifest (the default, as this bench always did), or the "
                             "manifest then the chunks (docs/protocol.md's order of publication, "
                             "lepton.cloud's)")
    parser.add_argument("--no-floor", action="store_true",
                        help="skip the transport floor (bare subscribers that only count bytes)")
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

    prepack = {} if args.prepack_max_mb is None else {  # the same for the devices and the stall probe
        "prepack_max_bytes": None if args.prepack_max_mb < 0 else int(args.prepack_max_mb * 2**20)}
    broker_handle = MosquittoBroker() if kind == "mosquitto" else AmqttBroker()
    broker_handle.start()
    ctx = mp.get_context("spawn")
    events: mp.Queue = ctx.Queue()
    procs, controls = [], []
    floor_procs, floor_controls = [], []
    broker_cpu: list[tuple[float, float]] = []  # (wall clock, CPU seconds of the broker process)
    sampling = threading.Event()
    broker_pid = broker_handle._proc.pid if kind == "mosquitto" and broker_handle._proc else None

    def sample_broker() -> None:
        import psutil

        try:
            broker = psutil.Process(broker_pid) if broker_pid is not None else None
            while broker is not None and not sampling.is_set():
                times = broker.cpu_times()
                broker_cpu.append((time.time(), times.user + times.system))
                time.sleep(0.02)
        except psutil.Error:  # the broker exited: its samples so far stand
            return

    threading.Thread(target=sample_broker, daemon=True).start()
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
                                  events, control,
                                  prepack))
            p.start()
            procs.append(p)
            controls.append(control)
        floor_names = [] if args.no_floor else [f"floor-{i:02d}" for i in range(args.devices)]
        for name in floor_names:
            control = ctx.Queue()
            p = ctx.Process(target=floor_process, daemon=True,
                            args=(name, broker_handle.url("device", name, fleet=fleet), fleet, events,
                                  control))
            p.start()
            floor_procs.append(p)
            floor_controls.append(control)
        first_seen: dict[tuple[str, int], float] = {}
        # (subscriber, version) -> first arrival, last byte, bytes
        floor_seen: dict[tuple[str, int], tuple[float, float, int]] = {}

        def pump(timeout: float) -> list:
            got = []
            try:
                item = events.get(timeout=timeout)
                while True:
                    if item[0] == "version":
                        first_seen[(item[1], item[2])] = item[3]
                    elif item[0] == "floor":
                        floor_seen[(item[1], item[2])] = item[3:]
                    got.append(item)
                    item = events.get_nowait()
            except queue.Empty:
                pass
            return got

        ready = 0
        deadline = time.monotonic() + 120
        while ready < len(procs) + len(floor_procs) and time.monotonic() < deadline:
            ready += sum(1 for item in pump(1.0) if item[0] in ("ready", "floor_ready"))
        if ready < len(procs) + len(floor_procs):
            raise RuntimeError("device processes did not start")

        def publish(version: int, data: bytes, parent: int | None, model: str = MODEL
                    ) -> tuple[float, float, int]:
            manifest, chunks = build_package(fleet=fleet, name=model, version=version, data=data,
                                             input_spec={"name": "x", "shape": [-1, N_IN],
                                                         "dtype": "float32"},
                                             labels=[str(i) for i in range(N_OUT)],
                                             pipeline={"hash": PIPE, "spec": {}}, parent=parent,
                                             private_key=private)
            start = time.time()
            msgs = [(topics.model_chunk(model, version, i), c) for i, c in enumerate(chunks)]
            msgs.insert(0 if args.order == "manifest-first" else len(msgs), (topics.model(model), manifest))
            infos = [publisher.publish(t, p, qos=1, retain=True) for t, p in msgs]
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

        def clear(version: int, n_chunks: int, model: str = MODEL) -> None:
            for info in [publisher.publish(topics.model_chunk(model, version, i), b"", qos=1, retain=True)
                         for i in range(n_chunks)]:
                info.wait_for_publish(60)

        def floor(version: int, data: bytes) -> dict | None:
            """The same chunks published the same way to the bare subscribers: the transport floor."""
            if not floor_names:
                return None
            start, published, n_chunks = publish(version, data, None, model=FLOOR_MODEL)
            deadline = time.monotonic() + 120
            while not all((n, version) in floor_seen for n in floor_names) and time.monotonic() < deadline:
                pump(0.2)
            clear(version, n_chunks, model=FLOOR_MODEL)
            got = [floor_seen[(n, version)] for n in floor_names if (n, version) in floor_seen]
            return {"version": version, "start": start, "published": published,
                    "first_ms": [(g[0] - start) * 1000 for g in got],
                    "last_ms": [(g[1] - start) * 1000 for g in got],
                    "complete": sum(1 for g in got if g[2] > len(data)),  # every chunk and the manifest
                    "subscribers": len(floor_names),
                    "done": max(g[1] for g in got) if got else None}

        print(f"{args.devices} device runtimes in {args.procs} process(es), {kind}, "
              f"{args.rate:g} inferences/s per device", flush=True)
        version, prev_chunks = 1, 0
        _, _, prev_chunks = publish(1, models["small"][0], None)
        wait_all(1)
        time.sleep(1.0)
        swaps = []  # (size, version, start, published, done, quiet_end)
        floors = []  # one transport-floor publish after each swap, the same model bytes
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
            fl = floor(version, data)
            if fl is not None:
                fl["size"] = size
                floors.append(fl)
                time.sleep(0.5)
            print(f"  v{version} ({size}, {len(data) / 1e6:.1f} MB): published (all PUBACKs) in "
                  f"{(published - start) * 1000:.0f} ms, all {args.devices} devices swapped in "
                  f"{(done - start) * 1000:.0f} ms"
                  + (f"; floor: last byte at all {len(floor_names)} bare subscribers in "
                     f"{max(fl['last_ms']):.0f} ms" if fl else ""), flush=True)
            pump(0.0)
        for control in controls + floor_controls:
            control.put("stop")
        results, floor_cpu = [], {}
        deadline = time.monotonic() + 60
        while (len(results) < len(procs) or len(floor_cpu) < len(floor_procs)) \
                and time.monotonic() < deadline:
            for item in pump(1.0):
                if item[0] == "done":
                    results.extend(item[2])
                elif item[0] == "floor_done":
                    floor_cpu[item[1]] = item[2]
        publisher.disconnect()
        publisher.loop_stop()
    finally:
        sampling.set()
        for p in procs + floor_procs:
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
    # Where the time goes: per device and swap, ms from the publish start to each step.
    phase_names = ("first_chunk", "last_chunk", "manifest", "assembled", "built", "first_inference")
    cpu_by_wid = {d["wid"]: d["cpu"] for d in results}
    for size in ("small", "large"):
        events_ = [s for s in swaps if s["size"] == size]
        phases: dict[str, list[float]] = {k: [] for k in phase_names}
        dev_cpu, broker_cpu_s = [], []
        for s in events_:
            v, w0 = s["version"], s["start"]
            for dev in results:
                arr = dev["arrivals"].get(v, {})
                hist = [h for h in dev["history"] if h["version"] == v]
                manifest = min((t for t in dev["manifests"] if t >= w0), default=None)
                stamps = {"first_chunk": arr.get("first_chunk"), "last_chunk": arr.get("last_chunk"),
                          "manifest": manifest, "first_inference": first_seen.get((dev["name"], v))}
                if hist and hist[0].get("swapped_ts"):
                    h = hist[0]
                    stamps["built"] = h["swapped_ts"]
                    steps_s = ((h.get("stage_ms") or 0) + (h.get("load_ms") or 0)) / 1000
                    stamps["assembled"] = h["swapped_ts"] - steps_s
                for k, t in stamps.items():
                    if t is not None:
                        phases[k].append((t - w0) * 1000)
                s.setdefault("devices_ms", {})[dev["name"]] = {
                    k: round((t - w0) * 1000, 1) for k, t in stamps.items() if t is not None}
            cpus = [cpu_in(c, w0, s["done"]) for c in cpu_by_wid.values()]
            dev_cpu.append(sum(c for c in cpus if c is not None))
            broker_cpu_s.append(cpu_in(broker_cpu, w0, s["done"]))
        fl = [f for f in floors if f["size"] == size]
        floor_last = [x for f in fl for x in f["last_ms"]]
        floor_first = [x for f in fl for x in f["first_ms"]]
        floor_dev_cpu = [sum(c for c in (cpu_in(v, f["start"], f["done"]) for v in floor_cpu.values())
                             if c is not None) for f in fl]
        r = per_size[size]
        r["phases_ms"] = {k: {"p50": pct(v, 50), "max": round(max(v), 1) if v else None}
                          for k, v in phases.items()}
        r["transport_floor_ms"] = {
            "subscribers": len(floor_names), "publishes": len(fl),
            "complete": sum(f["complete"] for f in fl),
            "first_byte_p50": pct(floor_first, 50),
            "last_byte": {"p50": pct(floor_last, 50), "p99": pct(floor_last, 99),
                          "max": round(max(floor_last), 1) if floor_last else None},
            "publish_ms_p50": pct([(f["published"] - f["start"]) * 1000 for f in fl], 50)}
        r["cpu_s_per_swap"] = {
            "devices_sum": pct(dev_cpu, 50, 3),
            "per_device": pct([c / args.devices for c in dev_cpu], 50, 3) if dev_cpu else None,
            "broker": pct([c for c in broker_cpu_s if c is not None], 50, 3),
            "floor_subscribers_sum": pct(floor_dev_cpu, 50, 3),
            "floor_broker": pct([c for c in (cpu_in(broker_cpu, f["start"], f["done"]) for f in fl)
                                 if c is not None], 50, 3)}
    probes = {}
    for size in ("small", "large"):
        probe_q: mp.Queue = ctx.Queue()
        proc = ctx.Process(target=stall_probe, args=(sizes[size], 3, probe_q, prepack), daemon=True)
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
                                          for k in ("verify_ms", "stage_ms", "load_ms")},
                         "devices_ms": s.get("devices_ms", {})})
    failures = sum(d["failures"] + d["runtime_failures"] for d in results)
    failures += sum(r["failures"] for r in probes.values())
    rejections = sum(d["rejections"] for d in results)
    summary = {
        "config": {"devices": args.devices, "processes": args.procs, "broker": kind, "rate_hz": args.rate,
                   "order": args.order,
                   "runtime_options": prepack,
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
    print("\nwhere the time goes: ms from the publish start, p50/max over devices x swaps; the transport "
          "floor is the same\nchunks published the same way to bare subscribers (one process each) that only "
          "count bytes")
    header = f"{'model':>8} " + " ".join(f"{k.replace('_', ' '):>15}" for k in phase_names) + \
        f" {'floor last byte p50/p99/max':>28}"
    print(header)
    print("-" * len(header))
    for r in per_size.values():
        if not r["swaps"]:
            continue
        mb = f"{(r['model_bytes'] or 0) / 1e6:.1f}MB"
        ph = r["phases_ms"]
        fl = r["transport_floor_ms"]["last_byte"]
        cells = " ".join(f"{str(ph[k]['p50']) + '/' + str(ph[k]['max']):>15}" for k in phase_names)
        print(f"{mb:>8} " + cells
              + f" {str(fl['p50']) + '/' + str(fl['p99']) + '/' + str(fl['max']):>28}")
    print("\nCPU seconds per swap (median over swaps): all device processes, per device, the broker; "
          "the floor's subscribers and broker")
    for r in per_size.values():
        if r["swaps"]:
            c = r["cpu_s_per_swap"]
            print(f"{(r['model_bytes'] or 0) / 1e6:>6.1f}MB devices {c['devices_sum']} "
                  f"({c['per_device']}/device), broker {c['broker']}; "
                  f"floor: subscribers {c['floor_subscribers_sum']}, broker {c['floor_broker']}")
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
