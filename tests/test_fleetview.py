"""lepton._fleetview: the one parser of status, telemetry and model topics behind `lepton status` and the
demo (issue 11, item 6). I/O-free: no broker, no thread, no clock."""

from __future__ import annotations

import json

import pytest

from lepton._demo import _device_view
from lepton._fleetview import MAX_ENTRIES, MAX_PAYLOAD, FleetView
from lepton.cli._status import snapshot
from lepton.protocol import Topics, build_package, encode_json, encode_telemetry

PREFIX = "acme/site-3/lepton"


@pytest.fixture
def view() -> FleetView:
    return FleetView(fleet="f1", prefix=PREFIX)


@pytest.fixture
def topics() -> Topics:
    return Topics(fleet="f1", prefix=PREFIX)


def _status(**fields) -> bytes:
    return encode_json({"device": "cam-1", "online": True, **fields})


def test_status_and_telemetry_are_kept_per_device_and_both_renderers_read_them(view, topics):
    status = _status(model="digits", model_version=3, spool_depth=4,
                     accuracy={"3": {"accuracy": 0.75, "correct": 3, "samples": 4}})
    telemetry = encode_telemetry({"captured": 10, "acked": 6, "spool_depth": 2, "swaps": 1,
                                  "inference_ms_p50": 1.5, "inference_ms_p99": 3.0})

    assert view.apply(topics.status("cam-1"), status, now=100.0) == "status"
    assert view.apply(topics.telemetry("cam-1"), telemetry, now=101.0) == "telemetry"

    reports = view.devices["cam-1"]
    assert reports.received == 101.0 and reports.order == ["status", "telemetry"]
    row = snapshot(view, now=110.0)["devices"][0]  # lepton status
    assert (row["device"], row["online"], row["model_version"], row["accuracy"], row["accuracy_samples"],
            row["inference_ms_p50"]) == ("cam-1", True, 3, 0.75, 4, 1.5)
    demo = _device_view(reports)  # lepton demo: the newer telemetry's spool depth wins
    assert (demo.online, demo.captured, demo.acked, demo.spool, demo.model_version, demo.accuracy,
            demo.swaps) == (True, 10, 6, 2, 3, 0.75, 1)
    assert demo.accuracy_by_version == {"3": {"correct": 3, "samples": 4}}


def test_reports_fold_in_arrival_order(view, topics):
    view.apply(topics.telemetry("cam-1"), encode_json({"spool_depth": 9}), now=1.0)
    view.apply(topics.status("cam-1"), _status(spool_depth=0), now=2.0)

    assert view.devices["cam-1"].order == ["telemetry", "status"]
    assert _device_view(view.devices["cam-1"]).spool == 0


def test_workers_and_models_are_kept_and_a_cleared_retained_topic_removes_them(view, topics):
    manifest, _ = build_package(fleet="f1", name="digits", version=7, data=b"onnx", input_spec={"shape": [1]},
                                labels=["a"], pipeline={"hash": "p"}, metrics={"val_accuracy": 0.9},
                                quantization="int8")

    assert view.apply(topics.worker_status("w1"), encode_json({"worker": "w1", "stored": 5}), now=1.0) \
        == "worker_status"
    assert view.apply(topics.model("digits"), manifest, now=1.0) == "model"
    assert view.workers["w1"].status["stored"] == 5
    info = view.models["digits"]
    assert (info.version, info.size, info.quantization, info.metrics) == (7, 4, "int8", {"val_accuracy": 0.9})

    view.apply(topics.status("cam-1"), _status(), now=2.0)
    for topic in (topics.worker_status("w1"), topics.model("digits"), topics.status("cam-1")):
        assert view.apply(topic, b"", now=3.0) is not None
    assert (view.workers, view.models, view.devices, view.ignored) == ({}, {}, {}, 0)


@pytest.mark.parametrize("payload", [b"not json", b"[1, 2]", json.dumps({"v": 2}).encode(),
                                     encode_json({"pad": "x" * MAX_PAYLOAD})])
def test_a_bad_or_oversized_report_is_ignored_and_counted(view, topics, payload):
    view.apply(topics.status("cam-1"), _status(model_version=1), now=1.0)

    assert view.apply(topics.status("cam-1"), payload, now=2.0) is None

    assert view.ignored == 1
    assert view.devices["cam-1"].status["model_version"] == 1  # the last good report stays


def test_foreign_topics_and_forged_manifests_are_ignored_and_counted(view, topics):
    other = Topics(fleet="f1")  # the default prefix: not this view's fleet

    assert view.apply(other.status("cam-1"), _status(), now=1.0) is None
    assert view.apply(topics.model("digits"), b'{"v": 1, "manifest": "garbage"}', now=1.0) is None
    assert view.apply(topics.samples("cam-1"), b"\x00", now=1.0) is None  # not a report: not counted

    assert (view.devices, view.models, view.ignored) == ({}, {}, 2)


def test_devices_beyond_max_entries_are_ignored_but_known_ones_still_update(view, topics):
    for i in range(MAX_ENTRIES):
        view.apply(topics.status(f"d{i}"), _status(), now=1.0)

    assert view.apply(topics.status("one-too-many"), _status(), now=2.0) is None
    assert view.apply(topics.status("d0"), _status(online=False), now=2.0) == "status"

    assert len(view.devices) == MAX_ENTRIES and view.ignored == 1
    assert view.devices["d0"].status["online"] is False


def test_the_subscription_filters_use_the_prefix(view):
    assert view.filters() == [(f"{PREFIX}/f1/+/+/status", 1), (f"{PREFIX}/f1/devices/+/telemetry", 0)]
    assert view.filters(workers=["w1"], models=["digits"]) == [
        (f"{PREFIX}/f1/devices/+/status", 1), (f"{PREFIX}/f1/workers/w1/status", 1),
        (f"{PREFIX}/f1/devices/+/telemetry", 0), (f"{PREFIX}/f1/models/digits", 1)]


def test_the_demo_monitor_feeds_its_summary_from_a_real_broker(amqtt_broker, tmp_path):
    import time

    from lepton._demo import MODEL, WORKER, Demo, DemoConfig, _Monitor
    from lepton.protocol import short_lived_client

    demo = Demo(DemoConfig(broker=amqtt_broker.anonymous_url(), workdir=tmp_path))
    t = demo.topics
    manifest, _ = build_package(fleet=demo.fleet, name=MODEL, version=2, data=b"x" * 40,
                                input_spec={"shape": [1]}, labels=["a"], pipeline={"hash": "p"},
                                quantization="int8",
                                metrics={"fp32_size_bytes": 100, "quantization_reason": "faster"})
    retained = [(t.model(MODEL), manifest), (t.worker_status(WORKER), encode_json({"stored": 42})),
                (t.status("dev-0"), _status(model_version=2, accuracy={"2": {"accuracy": 0.5, "correct": 1,
                                                                             "samples": 2}})),
                (t.worker_status("someone-else"), encode_json({"stored": 7}))]
    with short_lived_client(amqtt_broker.url("admin", "pub", fleet=demo.fleet), "pub") as pub:
        for info in [pub.publish(topic, payload, qos=1, retain=True) for topic, payload in retained]:
            info.wait_for_publish(10)
    monitor = _Monitor(amqtt_broker.url("viewer", "v1", fleet=demo.fleet), demo)
    monitor.start()
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and (demo.summary()["model_version"] is None
                                               or not demo.summary()["devices"]):
            time.sleep(0.05)
        summary = demo.summary()
    finally:
        monitor.stop()

    assert (summary["model_version"], summary["model_size_bytes"], summary["compression_ratio"],
            summary["model_quantization"], summary["quantization_reason"]) == (2, 40, 0.4, "int8", "faster")
    assert summary["samples_ingested"] == 42  # the demo's own worker, not another one
    assert summary["devices"]["dev-0"]["model_version"] == 2
    assert summary["edge_accuracy_by_version"] == {2: {"accuracy": 0.5, "samples": 2}}
    assert summary["time_to_first_model_s"] is not None
