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
    manifest, chunks = build_package(fleet=fleet, name="clf", version=3, data=model.SerializeToString(),
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


@pytest.mark.parametrize("sigint", ["default", "ignored"])
def test_watch_follows_live_updates_until_ctrl_c(amqtt_broker, fleet, sigint):
    """``ignored``: started as ``cmd &`` from a script or a CI runner, a process inherits SIGINT ignored;
    the watch (every lepton command) must still stop on it (it once ran on until SIGKILL)."""
    topics = Topics(fleet=fleet)
    url = amqtt_broker.url("device", "dev-w", fleet=fleet)
    publish_retained(url, [(topics.status("dev-w"), encode_json({"online": True, "model_version": 1}))],
                     "dev-w")
    argv = [*CLI, "status", "--broker", amqtt_broker.anonymous_url(), "--fleet", fleet,
            "--watch", "--json", "--interval", "0.2", "--timeout", "2"]
    if sigint == "ignored":  # exec keeps an ignored signal ignored
        argv = ["sh", "-c", 'trap "" INT; exec "$@"', "sh", *argv]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
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
        assert proc.wait(60) == 0  # well under a second alone; a loaded machine once took over 15 s
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


# ------------------------------------------------------------------------------------------------
# statuses are untrusted input: one device's retained status must not break the view for everyone
# ------------------------------------------------------------------------------------------------
_HUGE = 10 ** 400  # a valid JSON int (under Python's 4300 digits), too big for a float
#: raw payloads (JSON that encode_json would refuse to write: NaN, Infinity, huge ints)
POISON_STATUS = {
    "p-types": b'{"v":1,"online":"yes","model":{"version":[]},"model_version":[],"spool_depth":"x",'
               b'"accuracy":{"3":[]},"model_error":{"reason":["r"],"message":{"m":1}},"ts":"now"}',
    "p-nan": b'{"v":1,"online":true,"model_version":3,"accuracy":{"3":{"accuracy":NaN,"samples":"x"}},'
             b'"spool_depth":NaN,"ts":NaN}',
    "p-huge": ('{"v":1,"model_version":%d,"spool_depth":%d,"ts":%d,"accuracy":%d}'
               % (_HUGE, _HUGE, _HUGE, _HUGE)).encode(),
    "p-escape": json.dumps({"v": 1, "online": True, "model": "\x1b[2J\x1b[31mEVIL\r",
                            "model_error": {"reason": "\x1b]0;pwned\x07bad\u202egnp.exe",
                                            "message": "line1\r\nline2\x1b[1A\u2028" + "A" * 50_000},
                            "ts": 1e308}).encode(),
    "p-list": b'{"v":1,"online":[true],"model":["clf"],"model_error":"' + b"E" * 40_000 + b'",'
              b'"accuracy":[1,2],"ts":-1}',
}
POISON_TELEMETRY = {
    "p-types": b'{"v":1,"inference_ms_p50":"1","inference_ms_p99":Infinity,"spool_depth":-5,"inferences":1.5,'
               b'"swaps":true,"model_version":{"x":1},"ts":Infinity}',
    "p-nan": b'{"v":1,"inference_ms_p50":[1,2],"spool_depth":1e400,"ts":-Infinity}',
}
_UNSAFE = ("\x1b", "\r", "\x07", "\u202e", "\u2028", "\x00")


def _strict_json(text: str):
    def refuse(name: str):
        raise AssertionError(f"{name} in the JSON output")

    return json.loads(text, parse_constant=refuse)


def test_hostile_statuses_neither_crash_the_view_nor_reach_the_terminal(broker, fleet):
    topics = Topics(fleet=fleet)
    honest = {"device": "dev-ok", "online": True, "model": "clf", "model_version": 2, "spool_depth": 7,
              "accuracy": {"2": {"accuracy": 0.5, "samples": 10}}}
    publish_retained(broker.url("device", "dev-ok", fleet=fleet),
                     [(topics.status("dev-ok"), encode_json(honest))], "dev-ok")
    for name, payload in POISON_STATUS.items():
        items = [(topics.status(name), payload)]
        if name in POISON_TELEMETRY:
            items.append((topics.telemetry(name), POISON_TELEMETRY[name]))
        publish_retained(broker.url("device", name, fleet=fleet), items, name)
    worker = json.dumps({"v": 1, "online": "yes", "stored": "\x1b[2J" + "S" * 40_000, "\x1b[31mkey": 1,
                         "queue": 10 ** 300, "errors": 3, "nested": {"a": [1] * 2000},
                         "ts": "x"}).encode()
    publish_retained(broker.url("worker", "w-evil", fleet=fleet), [(topics.worker_status("w-evil"), worker)],
                     "w-evil")
    viewer = broker.url("viewer", "viewer-9", fleet=fleet)

    table = lepton("status", "--broker", viewer, "--fleet", fleet, "--timeout", "5")
    as_json = lepton("status", "--broker", viewer, "--fleet", fleet, "--timeout", "5", "--json")

    assert table.returncode == 0, table.stderr
    assert as_json.returncode == 0, as_json.stderr
    for out in (table.stdout, as_json.stdout):
        assert not any(ch in out for ch in _UNSAFE), [ch for ch in _UNSAFE if ch in out]
        assert len(out) < 60_000  # 500 kB of hostile strings are cut, not echoed
    lines = table.stdout.splitlines()
    assert lines[0] == f"fleet {fleet}: 6 device(s), 3 online, 1 worker(s)"  # dev-ok, p-nan, p-escape
    assert max(len(line) for line in lines) < 1000
    row = next(line for line in lines if line.startswith("dev-ok")).split()
    assert row[:5] == ["dev-ok", "yes", "v2", "0.500", "(10)"] and row[7] == "7"
    assert any(line.startswith("p-escape") and "\\x1b[2J" not in line and "\\x1b]0;pwned" in line
               for line in lines)  # an escape is shown as text, never sent raw
    body = _strict_json(as_json.stdout)
    devices = {d["device"]: d for d in body["devices"]}
    assert set(devices) == {"dev-ok", *POISON_STATUS}
    assert devices["dev-ok"]["accuracy"] == 0.5 and devices["dev-ok"]["spool_depth"] == 7
    types = devices["p-types"]
    assert types["online"] is None and types["model"] is None and types["model_version"] is None
    assert types["spool_depth"] is None and types["inference_ms_p50"] is None  # "1" is not a number
    assert types["inference_ms_p99"] is None and types["inferences"] is None and types["swaps"] is None
    assert types["model_error"] is None and types["model_error_message"] is None and types["last_seen"] is None
    nan = devices["p-nan"]
    assert nan["accuracy"] is None and nan["accuracy_samples"] is None and nan["spool_depth"] is None
    assert nan["model_version"] == 3 and nan["last_seen"] is None
    huge = devices["p-huge"]
    assert huge["model_version"] is None and huge["spool_depth"] is None and huge["accuracy"] is None
    assert huge["last_seen"] is None
    evil = devices["p-escape"]
    assert evil["model"].startswith("\\x1b[2J") and "EVIL" in evil["model"]
    assert "\\u202e" in evil["model_error"] and len(evil["model_error_message"]) <= 500
    assert devices["p-list"]["model_error"].startswith("EEE") and len(devices["p-list"]["model_error"]) <= 100
    for d in devices.values():  # the raw reports are kept, but typed and bounded too
        assert len(json.dumps(d)) < 10_000
    (w,) = body["workers"]
    assert w["online"] is None and w["last_seen"] is None and w["summary"]["errors"] == 3
    assert all(isinstance(v, (int, float, str, bool)) for v in w["summary"].values())
    assert "queue" not in w["summary"] or w["summary"]["queue"] is None or w["summary"]["queue"] < 2 ** 63
    assert len(w["summary"]["stored"]) <= 100 and "\\x1b[31mkey" in w["summary"]


def test_an_oversized_status_is_ignored_and_counted(amqtt_broker, fleet):
    topics = Topics(fleet=fleet)
    url = amqtt_broker.url("device", "dev-big", fleet=fleet)
    publish_retained(url, [(topics.status("dev-big"), encode_json({"online": True, "pad": "x" * 300_000}))],
                     "dev-big")
    result = lepton("status", "--broker", amqtt_broker.url("viewer", "v", fleet=fleet), "--fleet", fleet,
                    "--json", "--timeout", "3")
    assert result.returncode == 0, result.stderr
    body = _strict_json(result.stdout)
    assert body["devices"] == [] and body["ignored_messages"] == 1
