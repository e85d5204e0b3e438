"""lepton.dashboard's core (FleetBoard) and its /metrics text: I/O-free, no broker, no clock."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("prometheus_client", reason="pip install 'lepton[dashboard]'")

from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from lepton.dashboard import FleetBoard  # noqa: E402
from lepton.dashboard._board import MAX_VERSIONS  # noqa: E402
from lepton.protocol import (  # noqa: E402
    Topics,
    build_package,
    encode_json,
    encode_telemetry,
    generate_keypair,
    load_private_key,
)

T = Topics(fleet="f1")


def _status(device: str, **fields) -> bytes:
    return encode_json({"device": device, "online": True, **fields})


def _telemetry(device: str, ts: float, **fields) -> bytes:  # the topic names the device
    payload = json.loads(encode_telemetry(fields))
    payload["ts"] = ts
    return json.dumps(payload).encode()


def test_rows_rates_and_deltas():
    board = FleetBoard(fleet="f1")
    board.apply(T.status("cam-1"), _status("cam-1", model="digits", model_version=2,
                accuracy={"2": {"accuracy": 0.9, "correct": 9, "samples": 10}}), now=1.0)
    board.apply(T.telemetry("cam-1"), _telemetry("cam-1", 100.0, captured=10, acked=4, escalated=1), now=1.0)
    board.apply(T.telemetry("cam-1"), _telemetry("cam-1", 102.0, captured=30, acked=14, escalated=2), now=3.0)

    delta = board.delta(now=3.0)
    row = delta["devices"][0]
    assert (row["device"], row["model_version"], row["captured"], row["acked"]) == ("cam-1", 2, 30, 14)
    assert (row["capture_rate"], row["ack_rate"], row["escalation_rate"]) == (10.0, 5.0, 0.5)
    assert "status" not in row and "telemetry" not in row  # the page gets typed fields, not raw reports
    assert delta["models"] == [{"model": "digits", "version": None, "size": None, "quantization": None,
                                "metrics": {}, "devices": {"2": 1}}]
    assert board.delta(now=4.0)["devices"] == []  # nothing new since

    board.apply(T.telemetry("cam-1"), _telemetry("cam-1", 104.0, captured=5, acked=1), now=5.0)  # restarted
    assert board.delta(now=5.0)["devices"][0]["capture_rate"] is None

    board.apply(T.status("cam-1"), b"", now=6.0)  # status cleared; telemetry still held
    board.apply(T.telemetry("cam-1"), b"", now=6.0)
    assert board.delta(now=6.0)["removed"] == ["cam-1"] and board.snapshot(now=6.0)["devices"] == []


def test_history_pools_accuracy_per_version_and_is_bounded():
    board = FleetBoard(fleet="f1", history_s=10.0, sample_s=1.0)
    for i, (c, n) in enumerate([(9, 10), (1, 10)]):
        board.apply(T.status(f"cam-{i}"), _status(f"cam-{i}", spool_depth=5 + i,
                    accuracy={"3": {"accuracy": c / n, "correct": c, "samples": n}}), now=0.0)
    point = board.tick(now=0.0)
    assert point is not None and point["accuracy"] == {"3": 0.5} and point["spool_depth"] == 11
    assert board.tick(now=0.5) is None  # not due yet
    for t in range(1, 50):
        board.tick(now=float(t))
    assert len(board.history) == 10


def test_untrusted_input_is_bounded_and_cleaned():
    board = FleetBoard(fleet="f1", max_devices=3, max_payload=4096)
    for i in range(5):
        board.apply(T.status(f"cam-{i}"), _status(f"cam-{i}"), now=0.0)
    board.apply(T.status("cam-0"), _status("cam-0", pipeline="x" * 5000), now=0.0)
    versions = {str(v): {"accuracy": 1.0, "correct": 1, "samples": 1} for v in range(1, 40)}
    board.apply(T.status("cam-1"), _status("cam-1", model="m", accuracy=versions,
                model_error={"reason": "\x1b[2J<b>", "message": "<script>x</script>" + "y" * 1000}), now=0.0)
    doc = board.snapshot(now=1.0)
    assert [d["device"] for d in doc["devices"]] == ["cam-0", "cam-1", "cam-2"]
    assert doc["summary"]["ignored_messages"] == 3  # two devices over the bound, one payload over 4 KiB
    row = doc["devices"][1]
    assert row["model_error"] == "\\x1b[2J<b>"  # control characters escaped; HTML is the page's job
    assert row["model_error_message"].startswith("<script>x</script>") and len(row["model_error_message"]) <= 300
    assert len(board.tick(now=1.0)["accuracy"]) <= MAX_VERSIONS


def test_dead_letters_are_kept_newest_first_and_bounded():
    board = FleetBoard(fleet="f1", max_dead_letters=3)
    for i in range(5):
        report = {"topic": T.samples("cam-1"), "device": "cam-1", "reason": f"bad {i}", "field": "payload",
                  "worker": "w1", "size": 3, "time": 10.0 + i}
        assert board.apply(T.deadletter(), encode_json(report), now=0.0) == "deadletter"
    assert board.apply(T.deadletter(), b"not json", now=0.0) is None
    assert [d["reason"] for d in board.delta(now=1.0)["dead_letters"]] == ["bad 4", "bad 3", "bad 2"]
    assert board.snapshot(now=1.0)["summary"]["dead_letters_seen"] == 5
    assert "dead_letters" not in board.delta(now=2.0)


def test_metrics_text_parses_and_follows_the_board(tmp_path):
    from lepton.dashboard._server import _registry
    from prometheus_client import generate_latest

    board = FleetBoard(fleet="f1")
    priv, _ = generate_keypair(tmp_path, name="k")
    manifest, _chunks = build_package(
        fleet="f1", name="digits", version=2, data=b"\0" * 100, input_spec={"name": "x", "shape": [-1, 4],
        "dtype": "float32"}, labels=["a", "b"], pipeline={"hash": "0" * 16, "spec": {}},
        metrics={"val_accuracy": 0.93}, quantization="int8", private_key=load_private_key(priv))
    board.apply(T.model("digits"), manifest, now=0.0)
    for i, version in enumerate([1, 2, 2]):
        board.apply(T.status(f"cam-{i}"), _status(f"cam-{i}", model="digits", model_version=version,
                    spool_depth=i), now=0.0)
    board.apply(T.worker_status("w1"), encode_json({"worker": "w1", "online": True, "samples_per_s": 12.5,
                                                    "stored": 100, "dead_letters": 2, "bytes": 4096}), now=0.0)

    text = generate_latest(_registry(lambda: board.snapshot(now=1.0))).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(text) for s in family.samples}

    def get(name, **labels):
        return samples[(name, tuple(sorted({"fleet": "f1", **labels}.items())))]

    assert get("lepton_device_online", device="cam-0") == 1.0
    assert get("lepton_device_spool_depth", device="cam-2") == 2.0
    assert get("lepton_device_model_version", device="cam-1") == 2.0
    assert get("lepton_model_devices", model="digits", version="2") == 2.0
    assert get("lepton_model_latest_version", model="digits") == 2.0
    assert get("lepton_worker_stored_total", worker="w1") == 100.0
    assert get("lepton_worker_ingest_rate", worker="w1") == 12.5
    assert get("lepton_fleet_devices_online") == 3.0
    assert board.models()[0]["quantization"] == "int8" and board.models()[0]["metrics"] == {"val_accuracy": 0.93}

    board.apply(T.status("cam-0"), b"", now=2.0)  # a removed device leaves /metrics too
    text = generate_latest(_registry(lambda: board.snapshot(now=2.0))).decode()
    assert 'device="cam-0"' not in text and 'device="cam-1"' in text
