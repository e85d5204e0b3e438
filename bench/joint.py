#!/usr/bin/env python3
"""Joint edge-cloud inference: accuracy vs escalated fraction vs bytes vs answer latency, in one run.

    python bench/joint.py             # about 3 minutes on 2 cores
    python bench/joint.py --quick     # fewer epochs and requests

The task: the UCI digits (1x8x8). The data is split once: 60 % to train both models, 40 % held out
for every figure below. Both models are trained with ``lepton.cloud.train`` on a Parquet dataset
written by the ingest writer:

* edge: ``--target tiny`` (a 16-unit MLP: a microcontroller-class model), int8 if it pays;
* cloud: ``--target cloud`` (the 4x CNN), fp32, the model ``lepton serve`` answers with.

Policies, each replayed over the held-out samples in one random order with the device's own rules
(lepton/device/_escalation.py) on the edge model's real ONNX Runtime outputs:

* ``rate:R`` for R in 0, 0.05, 0.1, 0.2, 0.5, 1.0: the budget policy on the *calibrated* confidence
  (softmax(logits / T), T shipped in the manifest);
* ``sedna:0.5``: KubeEdge Sedna's hard-example filter, a fixed threshold of 0.5 on the raw softmax;
* ``rate@sedna``: the budget policy at Sedna's measured escalated fraction, the like-for-like
  comparison.

Bytes: what leaves a device per captured sample, encoded by the real protocol encoders: the infer
request of every escalated sample plus the samples envelope of every uploaded one, under
``--upload escalated+sample:0.05``, against ``--upload all`` with no escalation (the same-run
baseline: today's behaviour).

Latency: 10 devices on a real Mosquitto (the project's mosquitto.conf) send infer requests to a real
``lepton serve`` worker holding the signed cloud model; answer round-trip p50/p99 against a bare
paho echo responder on the same broker in the same run (the transport's own floor).

Writes bench/results/joint.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

RATES = (0.0, 0.05, 0.1, 0.2, 0.5, 1.0)
FLEET = "joint"
PIPELINE = "digits-joint"


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32).reshape(-1, 1, 8, 8), d.target.astype(np.int64)


def write(root: Path, x: np.ndarray, y: np.ndarray) -> None:
    from lepton.cloud._dataset import samples_to_table, write_parquet_atomic
    from lepton.protocol import Sample

    data = root / FLEET / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [(f"dev-{i % 4}", PIPELINE, Sample(seq=i // 4, ts=float(i), x=x[i], y=str(int(y[i]))))
            for i in range(len(x))]
    write_parquet_atomic(data / "part-0.parquet", samples_to_table(rows))


def train_models(root: Path, epochs: int):
    from lepton.cloud import TrainConfig, train
    from lepton.cloud._export import ExportConfig

    edge = train(TrainConfig(data=root, fleet=FLEET, model="edge", target="tiny", epochs=epochs,
                             max_device_share=1.0, export=ExportConfig(latency_runs=50)))
    cloud = train(TrainConfig(data=root, fleet=FLEET, model="cloud", target="cloud", epochs=epochs,
                              max_device_share=1.0, export=ExportConfig(quantize=False, latency_runs=50)))
    return edge.version, cloud.version


def logits_of(model: bytes, x: np.ndarray) -> np.ndarray:
    from lepton.cloud._export import onnx_session

    sess = onnx_session(model)
    return np.asarray(sess.run(None, {sess.get_inputs()[0].name: x})[0], np.float64)


def replay(policy, conf: np.ndarray, edge_ok: np.ndarray, cloud_ok: np.ndarray, order: np.ndarray):
    escalated = np.zeros(len(conf), bool)
    for i in order:
        escalated[i] = policy.decide(float(conf[i]))
    acc = float(np.where(escalated, cloud_ok, edge_ok).mean())
    return acc, escalated


def bytes_per_sample(x: np.ndarray, y: np.ndarray, escalated: np.ndarray, upload: str) -> float:
    """Mean bytes a device sends per captured sample: infer requests + uploaded sample envelopes."""
    from lepton.device._escalation import parse_upload_policy
    from lepton.protocol import Sample, encode_samples
    from lepton.protocol._infer import InferRequest, encode_infer

    pol = parse_upload_policy(upload)
    total = 0
    for i in range(len(x)):
        if escalated[i]:
            total += len(encode_infer(InferRequest(device="dev-0", seq=i, x=x[i], pipeline=PIPELINE,
                                                   edge_label=str(int(y[i])), edge_confidence=0.5,
                                                   edge_version=1, deadline=time.time() + 0.2)))
        if pol.keep("dev-0", i, escalated=bool(escalated[i])):
            # One sample per envelope: the device's batch of 1 (batching only amortises the header).
            total += len(encode_samples("dev-0", [Sample(seq=i, ts=time.time(), x=x[i], y=None)],
                                        pipeline=PIPELINE))
    return total / len(x)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer epochs and requests")
    ap.add_argument("--requests", type=int, default=None, metavar="N", help="infer requests per device")
    args = ap.parse_args(argv)
    epochs = 6 if args.quick else 15

    from lepton.cloud._calibration import expected_calibration_error, softmax
    from lepton.device._escalation import EscalationPolicy

    x, y = digits()
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(x))
    cut = int(0.6 * len(x))
    tr, te = perm[:cut], perm[cut:]
    work = Path(tempfile.mkdtemp(prefix="lepton-bench-joint-"))
    try:
        write(work / "data", x[tr], y[tr])
        t0 = time.monotonic()
        edge_v, cloud_v = train_models(work / "data", epochs)
        train_s = time.monotonic() - t0
        labels = [int(v) for v in edge_v.manifest["labels"]]
        assert labels == [int(v) for v in cloud_v.manifest["labels"]] == list(range(10))
        xt, yt = x[te], y[te]
        e_logits = logits_of(edge_v.data(), xt)
        c_logits = logits_of(cloud_v.data(), xt)
        temp = float((edge_v.manifest.get("calibration") or {}).get("temperature", 1.0))
        raw, cal = softmax(e_logits), softmax(e_logits, temp)
        raw_conf, cal_conf = raw.max(1), cal.max(1)
        edge_ok = raw.argmax(1) == yt
        cloud_ok = c_logits.argmax(1) == yt
        edge_acc, cloud_acc = float(edge_ok.mean()), float(cloud_ok.mean())
        gap = cloud_acc - edge_acc
        order = rng.permutation(len(xt))
        rows = []

        def add(name: str, policy, conf: np.ndarray) -> dict:
            acc, esc = replay(policy, conf, edge_ok, cloud_ok, order)
            row = {
                "policy": name,
                "accuracy": round(acc, 4),
                "escalated_fraction": round(float(esc.mean()), 4),
                "gap_recovered": round((acc - edge_acc) / gap, 3) if gap > 0 else None,
                "bytes_per_sample": round(bytes_per_sample(xt, yt, esc, "escalated+sample:0.05"), 1),
            }
            rows.append(row)
            return row

        for r in RATES:
            add(f"rate:{r:g}", EscalationPolicy(rate=r) if r < 1 else EscalationPolicy(cloud_only=True), cal_conf)
        sedna = add("sedna:0.5", EscalationPolicy(below=0.5), raw_conf)
        add(f"rate@sedna ({sedna['escalated_fraction']:g})",
            EscalationPolicy(rate=sedna["escalated_fraction"]), cal_conf)
        upload_all = bytes_per_sample(xt, yt, np.zeros(len(xt), bool), "all")
        for row in rows:
            row["bytes_vs_upload_all"] = round(row["bytes_per_sample"] / upload_all, 3)
        ece = {"raw": round(expected_calibration_error(raw, yt), 4),
               "calibrated": round(expected_calibration_error(cal, yt), 4), "temperature": round(temp, 4)}
        latency = measure_latency(work, cloud_v, xt, requests=args.requests or (50 if args.quick else 200))
        sizes = (len(edge_v.data()), len(cloud_v.data()))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    result = {
        "task": "UCI digits 1x8x8, 60/40 split, held-out figures",
        "edge": {"target": "tiny", "accuracy": round(edge_acc, 4), "size_bytes": sizes[0],
                 "quantization": edge_v.manifest["quantization"]},
        "cloud": {"target": "cloud", "accuracy": round(cloud_acc, 4), "size_bytes": sizes[1]},
        "held_out": int(len(te)),
        "train_s": round(train_s, 1),
        "ece": ece,
        "upload_all_bytes_per_sample": round(upload_all, 1),
        "policies": rows,
        "latency": latency,
    }
    best20 = max((r for r in rows if r["escalated_fraction"] <= 0.2), key=lambda r: r["accuracy"])
    like = rows[-1]
    # The operating point: the smallest budget that recovers >= 90 % of the edge-cloud gap.
    budget = [r for r in rows if r["policy"].startswith("rate:")]
    point = next((r for r in budget if (r["gap_recovered"] or 0) >= 0.9), budget[-1])
    result["goals"] = {
        "gap_recovered_at_<=20%_escalated": best20["gap_recovered"],
        "budget_beats_sedna_at_same_fraction": like["accuracy"] > sedna["accuracy"],
        "budget_vs_sedna_accuracy": [like["accuracy"], sedna["accuracy"]],
        "answer_p99_ms": latency.get("serve", {}).get("p99_ms"),
        "operating_point": point["policy"],
        "operating_point_bytes_vs_upload_all": point["bytes_vs_upload_all"],
    }
    print_table(result)
    out = HERE / "results" / "joint.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {out.relative_to(HERE.parent)}")
    return 0


def print_table(r: dict) -> None:
    print(f"\nedge (tiny) accuracy {r['edge']['accuracy']:.4f}, cloud accuracy {r['cloud']['accuracy']:.4f} "
          f"on {r['held_out']} held-out digits; ECE raw {r['ece']['raw']} -> calibrated "
          f"{r['ece']['calibrated']} (T = {r['ece']['temperature']})")
    print(f"{'policy':<24} {'accuracy':>9} {'escalated':>10} {'gap recovered':>14} {'bytes/sample':>13} "
          f"{'vs upload-all':>14}")
    for row in r["policies"]:
        gap = "-" if row["gap_recovered"] is None else f"{row['gap_recovered']:.2f}"
        print(f"{row['policy']:<24} {row['accuracy']:>9.4f} {row['escalated_fraction']:>10.3f} {gap:>14} "
              f"{row['bytes_per_sample']:>13.1f} {row['bytes_vs_upload_all']:>14.3f}")
    lat = r["latency"]
    for name in ("serve", "echo"):
        if name in lat:
            d = lat[name]
            print(f"answer latency {name:<6} p50 {d['p50_ms']:.2f} ms  p99 {d['p99_ms']:.2f} ms  "
                  f"({d['answers']} answers of {d['requests']}, errors {d['errors']}, {lat['devices']} devices "
                  f"at {lat['rate_hz_per_device']:g} Hz each)")
    print("goals:", json.dumps(r["goals"]))


def measure_latency(work: Path, cloud_v, xt: np.ndarray, *, requests: int, devices: int = 10,
                    rate_hz: float = 10.0) -> dict:
    """Answer round trips of ``devices`` clients on Mosquitto: a bare paho echo, then `lepton serve`."""
    import os
    import subprocess
    import threading

    import paho.mqtt.client as mqtt

    from lepton.cloud import Registry, publish_package
    from lepton.protocol import (
        BrokerURL, InferAnswer, Topics, connect, decode_answer, encode_answer, generate_keypair, load_private_key,
        new_client, peek_seq,
    )
    from lepton.protocol._infer import InferRequest, encode_infer
    from lepton.testing import MosquittoBroker, mosquitto_available

    if not mosquitto_available():
        return {"devices": devices, "error": "mosquitto is not installed"}
    topics = Topics(fleet=FLEET)
    priv, pub = generate_keypair(work / "keys")
    with MosquittoBroker() as broker:
        def run_clients(tag: str) -> dict:
            sent: dict[tuple[int, int], float] = {}
            got: dict[tuple[int, int], float] = {}
            errors: dict[str, int] = {}
            lock = threading.Lock()
            clients = []
            for d in range(devices):
                name = f"dev-{d}"
                c = new_client(BrokerURL.parse(broker.url("device", name, fleet=FLEET)), client_id=name,
                               clean_session=True)

                def on_message(client, userdata, msg, d=d):  # noqa: ANN001
                    now = time.perf_counter()
                    a = decode_answer(msg.payload)
                    if a.seq is not None:
                        with lock:
                            if a.error is None:
                                got.setdefault((d, a.seq), now)
                            else:
                                errors[a.error] = errors.get(a.error, 0) + 1

                c.on_message = on_message
                connect(c, BrokerURL.parse(broker.url("device", name, fleet=FLEET)))
                c.loop_start()
                c.subscribe(topics.answers(name), qos=0)
                clients.append(c)
            time.sleep(0.5)  # subscriptions in place
            payloads = [[encode_infer(InferRequest(device=f"dev-{d}", seq=i, x=xt[(d * 7 + i) % len(xt)],
                                                   pipeline=PIPELINE, deadline=time.time() + 3600))
                         for i in range(requests)] for d in range(devices)]
            period = 1.0 / rate_hz
            t0 = time.perf_counter()
            for i in range(requests):
                for d, c in enumerate(clients):
                    with lock:
                        sent[(d, i)] = time.perf_counter()
                    c.publish(topics.infer(f"dev-{d}"), payloads[d][i], qos=0)
                delay = t0 + (i + 1) * period - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            time.sleep(1.0)
            for c in clients:
                c.disconnect()
                c.loop_stop()
            lat = sorted((got[k] - sent[k]) * 1000.0 for k in got)

            def pct(q: float) -> float | None:
                return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else None

            return {"what": tag, "requests": len(sent), "answers": len(got), "errors": errors,
                    "p50_ms": pct(50), "p99_ms": pct(99)}

        # The transport's floor: a bare paho client answering every request at once, on the same broker.
        echo_url = BrokerURL.parse(broker.url("worker", "echo", fleet=FLEET))
        echo = new_client(echo_url, client_id="echo", clean_session=True)

        def on_request(client, userdata, msg):  # noqa: ANN001
            device = topics.parse(msg.topic).device
            client.publish(topics.answers(device), encode_answer(InferAnswer(
                seq=peek_seq(msg.payload), label="0", index=0, confidence=1.0, version=1)), qos=0)

        echo.on_message = on_request
        connect(echo, echo_url)
        echo.loop_start()
        echo.subscribe(topics.all_devices("infer"), qos=0)
        time.sleep(0.3)
        baseline = run_clients("bare paho echo")
        echo.disconnect()
        echo.loop_stop()

        # lepton serve with the signed cloud model
        root = cloud_v.path.parents[2]
        payload, chunks = Registry(root).build("cloud", cloud_v.version, fleet=FLEET,
                                               private_key=load_private_key(priv))
        publish_package(broker.url("trainer", "trainer", fleet=FLEET), FLEET, payload, chunks, public_key=pub)
        env = {**os.environ, "LEPTON_BROKER": broker.url("worker", "serve1", fleet=FLEET),
               "PYTHONPATH": str(HERE.parent)}
        proc = subprocess.Popen([sys.executable, "-m", "lepton", "serve", "--fleet", FLEET, "--model", "cloud",
                                 "--name", "serve1", "--public-key", str(pub), "--json", "--status-interval", "0.5"],
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # wait until it serves the model
                line = proc.stdout.readline()
                if line and json.loads(line).get("model_version"):
                    break
            served = run_clients("lepton serve")
        finally:
            proc.terminate()
            proc.wait(10)
    return {"devices": devices, "rate_hz_per_device": rate_hz, "echo": baseline, "serve": served,
            "serve_vs_echo_p99": round(served["p99_ms"] / baseline["p99_ms"], 2)
            if served["p99_ms"] and baseline["p99_ms"] else None}


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
