"""`lepton status`: the fleet table from retained status and telemetry topics alone (real CLI and brokers)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from lepton.protocol import (
    BrokerURL,
    Topics,
    build_package,
    connect,
    encode_json,
    generate_keypair,
    load_private_key,
    load_public_key,
    new_client,
)

CLI = [sys.executable, "-m", "lepton"]


def lepton(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def publish_retained(url: str, items: list[tuple[str, bytes]], client_id: str) -> None:
    broker = BrokerURL.parse(url)
    client = new_client(broker, client_id=client_id)
    connect(client, broker)
    try:
        for info in [client.publish(t, p, qos=1, retain=True) for t, p in items]:
            info.wait_for_publish(10)
    finally:
        client.disconnect()
        client.loop_stop()


def runtime_status(tmp_path, fleet: str) -> tuple[dict, dict]:
    """A real ModelRuntime's status and telemetry after serving a model and scoring a few predictions."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from lepton.device import ModelRuntime

    w = numpy_helper.from_array(np.eye(4, 3, dtype=np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["z"]),
                               helper.make_node("Softmax", ["z"], ["p"], axis=-1)], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 3])],
                              initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    priv, pub = generate_keypair(tmp_path / "keys")
    manifest, chunks = build_package(name="clf", version=3, data=model.SerializeToString(),
                                     input_spec={"name": "x", "shape": [-1, 4], "dtype": "float32"},
                                     labels=["a", "b", "c"], pipeline={"hash": "p1", "spec": {}},
                                     private_key=load_private_key(priv))
    topics = Topics(fleet=fleet)
    runtime = ModelRuntime(topics=topics, model="clf", store_dir=tmp_path / "store",
                           public_key=load_public_key(pub), pipeline_hash="p1", input_shape=(4,))
    try:
        for i, c in enumerate(chunks):
            runtime.handle_message(topics.model_chunk("clf", 3, i), c, True)
        runtime.handle_message(topics.model("clf"), manifest, True)
        deadline = time.monotonic() + 30
        while runtime.version != 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        for truth in ("a", "a", "b", "a"):
            runtime.record_truth(runtime.predict(np.array([1, 0, 0, 0], np.float32)), truth)
        return runtime.status(), runtime.telemetry()
    finally:
        runtime.close()


@pytest.fixture
def populated(broker, fleet, tmp_path):
    """Retained statuses of three devices and a worker, published with each one's own credentials."""
    topics = Topics(fleet=fleet)
    status, telemetry = runtime_status(tmp_path, fleet)
    assert status["model_version"] == 3
    dev_a = dict(status, device="dev-a", online=True, spool_depth=9, pipeline="p1")
    tel_a = dict(telemetry, device="dev-a", spool_depth=4, captured=100, acked=96)
    dev_b = {"device": "dev-b", "online": False, "model": "clf", "model_version": 2, "spool_depth": 0,
             "model_error": {"reason": "bad_signature", "message": "the manifest signature does not verify",
                             "version": 4}, "accuracy": {}}
    worker = {"worker": "w1", "online": True, "ingested": 1234}
    for name, role, items in [
        ("dev-a", "device", [(topics.status("dev-a"), encode_json(dev_a)),
                             (topics.telemetry("dev-a"), encode_json(tel_a))]),
        ("dev-b", "device", [(topics.status("dev-b"), encode_json(dev_b))]),
        ("dev-c", "device", [(topics.status("dev-c"), b"not json")]),
        ("w1", "worker", [(topics.worker_status("w1"), encode_json(worker))]),
    ]:
        publish_retained(broker.url(role, name, fleet=fleet), items, name)
    return broker, fleet


def test_json_lists_devices_and_workers(populated):
    broker, fleet = populated
    result = lepton("status", "--broker", broker.url("viewer", "viewer-1", fleet=fleet), "--fleet", fleet,
                    "--json", "--timeout", "5")
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert body["fleet"] == fleet
    devices = {d["device"]: d for d in body["devices"]}
    assert set(devices) == {"dev-a", "dev-b"}
    a, b = devices["dev-a"], devices["dev-b"]
    assert a["online"] is True and a["model"] == "clf" and a["model_version"] == 3
    assert a["accuracy"] == 0.75 and a["accuracy_samples"] == 4
    assert a["inference_ms_p99"] >= a["inference_ms_p50"] > 0 and a["inferences"] == 4
    assert a["spool_depth"] == 4  # telemetry is newer than the status: its spool depth wins
    assert a["model_error"] is None and a["last_seen_s"] is not None
    assert b["online"] is False and b["model_version"] == 2 and b["model_error"] == "bad_signature"
    assert b["model_error_message"] == "the manifest signature does not verify"
    assert [w["worker"] for w in body["workers"]] == ["w1"]
    assert body["workers"][0]["summary"]["ingested"] == 1234
    assert body["ignored_messages"] == 1  # dev-c's payload is not protocol v1 JSON


def test_table(populated):
    broker, fleet = populated
    result = lepton("status", "--broker", broker.url("viewer", "viewer-2", fleet=fleet), "--fleet", fleet)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"fleet {fleet}: 2 device(s), 1 online, 1 worker(s)"
    header = next(line for line in lines if line.startswith("device"))
    assert header.split() == ["device", "online", "model", "acc", "p50", "ms", "p99", "ms", "spool", "seen",
                              "error"]
    row_a = next(line for line in lines if line.startswith("dev-a")).split()
    assert row_a[:5] == ["dev-a", "yes", "v3", "0.750", "(4)"] and row_a[7] == "4"
    row_b = next(line for line in lines if line.startswith("dev-b")).split()
    assert row_b[:3] == ["dev-b", "no", "v2"] and row_b[-1] == "bad_signature"
    assert any("dev-b: bad_signature: the manifest signature does not verify" in line for line in lines)
    assert any(line.startswith("w1") and "ingested=1234" in line for line in lines)


def test_watch_follows_live_updates_until_ctrl_c(amqtt_broker, fleet):
    topics = Topics(fleet=fleet)
    url = amqtt_broker.url("device", "dev-w")
    publish_retained(url, [(topics.status("dev-w"), encode_json({"online": True, "model_version": 1}))],
                     "dev-w")
    proc = subprocess.Popen([*CLI, "status", "--broker", amqtt_broker.anonymous_url(), "--fleet", fleet,
                             "--watch", "--json", "--interval", "0.2", "--timeout", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first = json.loads(proc.stdout.readline())
        assert first["devices"][0]["model_version"] == 1
        publish_retained(url, [(topics.status("dev-w"), encode_json({"online": True, "model_version": 2}))],
                         "dev-w")
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            snap = json.loads(proc.stdout.readline())
            if snap["devices"][0]["model_version"] == 2:
                break
        else:
            raise AssertionError("the watch never showed v2")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_an_empty_fleet_and_bad_flags(amqtt_broker, fleet):
    result = lepton("status", "--broker", amqtt_broker.anonymous_url(), "--fleet", fleet, "--timeout", "1")
    assert result.returncode == 0
    assert "no device has published a retained status" in result.stdout

    bad_url = lepton("status", "--broker", "localhost:1883", "--fleet", fleet)
    assert bad_url.returncode == 2
    assert bad_url.stderr.strip().count("\n") == 0 and "mqtt://" in bad_url.stderr

    bad_fleet = lepton("status", "--broker", amqtt_broker.anonymous_url(), "--fleet", "no/slashes")
    assert bad_fleet.returncode == 2 and "--fleet" in bad_fleet.stderr

    port = BrokerURL.parse(amqtt_broker.anonymous_url()).port
    amqtt_broker.stop()
    down = lepton("status", "--broker", f"mqtt://127.0.0.1:{port}", "--fleet", fleet)
    assert down.returncode == 3 and "cannot reach broker" in down.stderr
