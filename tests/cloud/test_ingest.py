"""The ingest worker against real brokers: storage, end-to-end acks, status, shared-subscription refusal,
dead letters under fuzzed input. Fault injection (kill -9, broker restart, groups) is in
test_ingest_faults.py."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import msgpack
import pytest

from lepton.cloud import Dataset, IngestWorker, WorkerConfig
from lepton.errors import ConfigError, ProtocolError
from lepton.protocol import BrokerURL, Topics, connect, decode_json, encode_samples, new_client
from tests.cloud._ingest_support import (
    ResendPublisher,
    make_samples,
    start_worker_process,
    stop_process,
    wait_status,
)


def _unique(ds: Dataset) -> tuple[int, int, set]:
    t = ds.read_table(columns=["device", "seq"])
    pairs = list(zip(t.column("device").to_pylist(), t.column("seq").to_pylist(), strict=True))
    return len(pairs), len(set(pairs)), set(pairs)


def test_worker_stores_acks_and_reports_status(broker, fleet, tmp_path):
    worker = IngestWorker(
        WorkerConfig(
            broker=broker.url("worker", "w1", fleet=fleet),
            fleet=fleet,
            data=tmp_path,
            name="w1",
            batch_ms=20,
            status_interval=0.3,
        )
    )
    worker.start()
    pubs = [
        ResendPublisher(
            broker.url("device", d, fleet=fleet), fleet, d, total=1500, per_message=50, resend_after=2.0
        )
        for d in ("cam-1", "cam-2")
    ]
    try:
        for p in pubs:
            p.start()
        threads = [threading.Thread(target=p.run) for p in pubs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        status = wait_status(
            broker.url("viewer", "v1", fleet=fleet),
            fleet,
            "w1",
            lambda s: s.get("stored") == 3000 and s.get("online") is True,
        )
    finally:
        for p in pubs:
            p.stop()
        worker.stop()

    assert all(not p.unacked() for p in pubs)  # every device released by end-to-end acks
    rows, unique, pairs = _unique(Dataset(tmp_path, fleet))
    assert rows == unique == 3000
    assert pairs == {(d, s) for d in ("cam-1", "cam-2") for s in range(1500)}
    assert status["dead_letters"] == 0 and status["files"] >= 1 and status["last_write"] is not None
    table = Dataset(tmp_path, fleet).read_table(columns=["label", "pipeline", "shape", "dtype"])
    assert set(table.column("pipeline").to_pylist()) == {"p0"}
    assert table.column("shape").to_pylist()[0] == [16] and table.column("dtype").to_pylist()[0] == "float32"
    # Last Will / clean stop: the retained status says offline.
    final = wait_status(
        broker.url("viewer", "v1", fleet=fleet), fleet, "w1", lambda s: s.get("online") is False
    )
    assert final["stored"] == 3000


def test_duplicates_are_acked_not_stored(mosquitto_broker, fleet, tmp_path):
    url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    with IngestWorker(WorkerConfig(broker=url, fleet=fleet, data=tmp_path, name="w1", batch_ms=10)) as worker:
        pub = ResendPublisher(
            mosquitto_broker.url("device", "cam-1", fleet=fleet), fleet, "cam-1", total=200, per_message=20
        )
        pub.start()
        pub.run()
        assert worker.wait_stored(200, timeout=30)
        # A device that lost its acks resends everything: it must be released again, nothing stored twice.
        pub.acked.clear()
        pub.run()
        pub.stop()
        deadline = time.monotonic() + 10
        while worker.stats.duplicates < 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert worker.stats.duplicates == 200 and worker.stats.stored == 200
    rows, unique, _ = _unique(Dataset(tmp_path, fleet))
    assert rows == unique == 200


def test_group_on_amqtt_is_refused_with_one_clear_message(amqtt_broker, fleet, tmp_path):
    url = amqtt_broker.url("worker", "w1", fleet=fleet)
    worker = IngestWorker(WorkerConfig(broker=url, fleet=fleet, data=tmp_path, name="w1", group="g1"))
    with pytest.raises(ConfigError, match="shared subscriptions"):
        worker.start()

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton",
            "worker",
            "--broker",
            url,
            "--fleet",
            fleet,
            "--data",
            str(tmp_path),
            "--group",
            "g1",
            "--name",
            "w2",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    lines = [ln for ln in out.stderr.splitlines() if ln.startswith("lepton worker: error:")]
    assert len(lines) == 1 and "without --group" in lines[0]


def _fuzz_payloads(device: str, n: int, rng: random.Random) -> list[tuple[bytes, int]]:
    """``n`` malformed payloads, each with exactly one problem; returns (payload, good samples inside)."""
    good = encode_samples(device, make_samples(10**6, 3), pipeline="p0")
    out: list[tuple[bytes, int]] = []
    kinds = [
        "random",
        "truncated",
        "not_map",
        "bad_version",
        "wrong_device",
        "no_samples",
        "bad_sample",
        "flipped",
        "bad_dtype",
        "short_data",
        "huge_shape",
        "empty",
    ]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        body = msgpack.unpackb(good, raw=False)
        good_inside = 0
        if kind == "random":
            payload = rng.randbytes(rng.randint(1, 300))
        elif kind == "truncated":
            payload = good[: rng.randint(1, len(good) - 1)]
        elif kind == "not_map":
            payload = msgpack.packb([1, 2, 3])
        elif kind == "bad_version":
            body["v"] = rng.choice([2, True, 1.0, "1", None])
            payload = msgpack.packb(body)
        elif kind == "wrong_device":
            body["device"] = "someone-else"
            payload = msgpack.packb(body)
        elif kind == "no_samples":
            body["samples"] = rng.choice([[], None, "x", 5])
            payload = msgpack.packb(body)
        elif kind == "bad_sample":
            # A bad sample inside a good message: the two others must be stored.
            seq_base = 2_000_000 + 3 * i
            body["samples"][0]["seq"] = seq_base
            body["samples"][1]["seq"] = seq_base + 1
            body["samples"][2] = rng.choice(
                [
                    {"seq": -1, "ts": 1.0, "x": body["samples"][2]["x"]},
                    {"seq": seq_base + 2, "ts": float("nan"), "x": body["samples"][2]["x"]},
                    {"seq": seq_base + 2, "ts": 1.0, "x": "nope"},
                    "not a map",
                ]
            )
            payload = msgpack.packb(body, use_bin_type=True)
            good_inside = 2
        elif kind == "flipped":
            b = bytearray(good)
            b[0] ^= 0xFF
            payload = bytes(b)
        elif kind == "bad_dtype":
            body["samples"] = [dict(body["samples"][0], x=dict(body["samples"][0]["x"], dtype="complex128"))]
            payload = msgpack.packb(body, use_bin_type=True)
        elif kind == "short_data":
            body["samples"] = [dict(body["samples"][0], x=dict(body["samples"][0]["x"], data=b"\x00" * 5))]
            payload = msgpack.packb(body, use_bin_type=True)
        elif kind == "huge_shape":
            body["samples"] = [
                dict(body["samples"][0], x=dict(body["samples"][0]["x"], shape=[2**40, 2**40]))
            ]
            payload = msgpack.packb(body, use_bin_type=True)
        else:
            payload = b""
        out.append((payload, good_inside))
    return out


@pytest.mark.mosquitto
def test_fuzzed_payloads_are_dead_lettered_and_quarantined(mosquitto_broker, fleet, tmp_path):
    """1,000 malformed payloads mixed into 10,000 valid samples: every valid sample stored, every bad
    one reported on the deadletter topic AND quarantined, and the worker process alive throughout."""
    worker_url = mosquitto_broker.url("worker", "w1", fleet=fleet)
    reports: list[dict] = []
    viewer_url = mosquitto_broker.url("viewer", "v1", fleet=fleet)
    viewer = BrokerURL.parse(viewer_url)
    watch = new_client(viewer, client_id=f"dl-{fleet}", clean_session=False)
    watch.on_connect = lambda c, *a: c.subscribe(Topics(fleet=fleet).deadletter(), qos=1)
    watch.on_message = lambda c, u, m: reports.append(decode_json(m.payload))
    connect(watch, viewer)
    proc = start_worker_process(worker_url, fleet, tmp_path, name="w1")
    # A user of its own: mosquitto.conf binds client ids to usernames, so a second v1 would kick `watch`.
    wait_status(mosquitto_broker.url("viewer", "v2", fleet=fleet), fleet, "w1", lambda s: s.get("online") is True)
    pub = ResendPublisher(
        mosquitto_broker.url("device", "cam-1", fleet=fleet), fleet, "cam-1", total=10_000, per_message=100
    )
    pub.start()
    bad = _fuzz_payloads("cam-1", 1000, random.Random(7))
    topic = Topics(fleet=fleet).samples("cam-1")
    try:
        for i in range(100):  # interleave: one valid message, ten bad ones
            pub.publish(pub.seqs[i * 100 : (i + 1) * 100])
            for payload, _ in bad[i * 10 : (i + 1) * 10]:
                pub.client.publish(topic, payload, qos=1)
            assert proc.poll() is None
        pub.run(timeout=120)
        deadline = time.monotonic() + 60
        while len(reports) < 1000 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None  # alive after everything
        extra_good = sum(g for _, g in bad)
        ds = Dataset(tmp_path, fleet)
        deadline = time.monotonic() + 30
        while ds.count() < 10_000 + extra_good and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        pub.stop()
        rc = stop_process(proc)
        watch.disconnect()
        watch.loop_stop()

    assert rc == 0
    rows, unique, pairs = _unique(Dataset(tmp_path, fleet))
    assert rows == unique == 10_000 + extra_good
    assert {("cam-1", s) for s in range(10_000)} <= pairs
    assert len(reports) == 1000
    assert all({"topic", "device", "reason", "field", "size", "time"} <= r.keys() for r in reports)
    quarantined = {p.name for p in (tmp_path / fleet / "quarantine").glob("*.bin")}
    # Quarantine keeps each distinct payload once (named by its hash), however often it came.
    distinct = {p for p, _ in bad}
    assert len(quarantined) == len(distinct) and {r["quarantine"] for r in reports} == quarantined
    sizes = sorted(len(p) for p in distinct)
    assert sorted((tmp_path / fleet / "quarantine" / q).stat().st_size for q in quarantined) == sizes
    # Bad samples inside otherwise good messages are reported one by one, naming the field.
    sample_reports = [r for r in reports if r["sample"] is not None]
    assert all(r["field"].startswith(f"samples[{r['sample']}]") for r in sample_reports)
    assert sum(1 for r in sample_reports if r["sample"] == 2) == sum(1 for _, g in bad if g)
    side = json.loads(next((tmp_path / fleet / "quarantine").glob("*.json")).read_text())
    assert side["problems"] and side["quarantine"].endswith(".bin") and side["topic"] == topic


def test_worker_config_errors_are_clear(tmp_path):
    with pytest.raises(ConfigError, match="model"):
        WorkerConfig(broker="mqtt://127.0.0.1:1883", fleet="f1", data=tmp_path, train_every=10)
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "lepton",
            "worker",
            "--broker",
            "localhost",
            "--fleet",
            "f1",
            "--data",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "mqtt://" in out.stderr


def test_raw_rows_equal_the_rows_of_decoded_arrays():
    """The worker stores the wire bytes of ``decode_samples_raw`` without building arrays; its rows must
    equal the rows built from the numpy samples of ``decode_samples_lenient``, on good and bad input,
    and the table it builds per envelope (``decode_samples_columns`` -> ``table_from_columns``) must
    equal the table of those rows."""
    from lepton.cloud._dataset import _sample_row, raw_sample_rows, table_from_columns, table_from_rows
    from lepton.protocol import (
        DTYPES,
        Sample,
        decode_samples_columns,
        decode_samples_lenient,
        decode_samples_raw,
        encode_samples,
    )

    rng = random.Random(11)
    import numpy as np

    valid = []
    for i, name in enumerate(sorted(DTYPES)):
        arr = (np.arange(6) % 2).astype(DTYPES[name]).reshape(2, 3)
        samples = [
            Sample(
                seq=i * 10 + k,
                ts=float(k) if k else 5,
                x=arr,
                y=[None, 3, "cat", -(2**63)][k % 4],
                meta=[None, {"a": [1, 2]}, {}][k % 3],
            )
            for k in range(4)
        ]
        valid.append(encode_samples("cam-1", samples, pipeline=[None, "p1"][i % 2]))
    valid.append(encode_samples("cam-1", [Sample(seq=0, ts=1.0, x=np.zeros((0, 3), np.float32))]))
    for name in ("float32", "bool"):  # uniform envelopes: the per-envelope path
        x = (np.arange(6) % 2).astype(DTYPES[name]).reshape(3, 2)
        valid.append(encode_samples("cam-1", [Sample(seq=100 + k, ts=2.5 + k, x=x, y=[7, "dog"][k % 2])
                                              for k in range(8)], pipeline="p2"))
    corpus = valid + [p for p, _ in _fuzz_payloads("cam-1", 600, rng)]
    corpus += [
        bytes(rng.choice(valid)[: rng.randint(0, 40)]) + rng.randbytes(rng.randint(0, 40)) for _ in range(300)
    ]
    bool_bad = msgpack.unpackb(
        encode_samples("cam-1", [Sample(seq=1, ts=1.0, x=np.zeros(2, np.bool_))]), raw=False
    )
    bool_bad["samples"][0]["x"]["data"] = b"\x00\x02"
    corpus.append(msgpack.packb(bool_bad, use_bin_type=True))

    accepted = 0
    all_parts, all_rows = [], []
    for payload in corpus:
        try:
            env, bad = decode_samples_lenient(payload, expected_device="cam-1", max_tensor_bytes=1 << 20)
        except ProtocolError as exc:
            with pytest.raises(ProtocolError) as raw_exc:
                decode_samples_raw(payload, expected_device="cam-1", max_tensor_bytes=1 << 20)
            assert raw_exc.value.field == exc.field
            continue
        device, pipeline, good, raw_bad = decode_samples_raw(payload, expected_device="cam-1",
                                                             max_tensor_bytes=1 << 20)
        assert [(i, e.field) for i, _, e in raw_bad] == [(i, e.field) for i, _, e in bad]
        rows = raw_sample_rows(device, pipeline, good, 0.0)
        assert rows == [_sample_row("cam-1", env.pipeline, s, 0.0) for s in env.samples]
        _d, _p, cols, col_bad = decode_samples_columns(payload, expected_device="cam-1",
                                                       max_tensor_bytes=1 << 20)
        assert [(i, e.field) for i, _, e in col_bad] == [(i, e.field) for i, _, e in bad]
        if rows:
            assert table_from_columns([(device, pipeline, 0.0, cols)]).equals(table_from_rows(rows))
            all_parts.append((device, pipeline, 0.0, cols))
            all_rows += rows
        accepted += not bad
    assert accepted >= len(valid)
    assert table_from_columns(all_parts).equals(table_from_rows(all_rows))  # a batch of many envelopes


def test_bad_sample_in_good_message_is_quarantined_and_acked(amqtt_broker, fleet, tmp_path):
    """The good sample is stored, the bad one dead-lettered and quarantined, and both seqs are acked
    so the device's spool can drain (resending a malformed sample cannot repair it)."""
    url = amqtt_broker.url("worker", "w1", fleet=fleet)
    with IngestWorker(WorkerConfig(broker=url, fleet=fleet, data=tmp_path, name="w1", batch_ms=10)) as worker:
        pub = ResendPublisher(
            amqtt_broker.url("device", "cam-1", fleet=fleet), fleet, "cam-1", total=2, per_message=2
        )
        pub.start()
        body = msgpack.unpackb(encode_samples("cam-1", make_samples(0, 2), pipeline="p0"), raw=False)
        body["samples"][1]["ts"] = float("nan")
        pub.client.publish(
            Topics(fleet=fleet).samples("cam-1"), msgpack.packb(body, use_bin_type=True), qos=1
        )
        deadline = time.monotonic() + 20
        while pub.unacked() and time.monotonic() < deadline:
            time.sleep(0.05)
        pub.stop()
        assert pub.unacked() == [] and worker.stats.dead_letters == 1 and worker.stats.stored == 1
    assert Dataset(tmp_path, fleet).read_table(columns=["seq"]).column("seq").to_pylist() == [0]
    assert len(list((tmp_path / fleet / "quarantine").glob("*.bin"))) == 1
