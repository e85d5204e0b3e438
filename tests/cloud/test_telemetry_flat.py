"""Telemetry that other tools can chart (issue 14, item 3): every telemetry report a real device, a real
ingest worker and a real serve worker publish on a real broker is flat ``name -> number`` (what
Grafana's MQTT data source plots), and names only fields docs/protocol.md lists."""

from __future__ import annotations

import json
import time

from lepton.cloud import IngestWorker, WorkerConfig
from lepton.protocol import Topics
from tests.broker._mqtt import Inbox
from tests.protocol.test_docs_example import documented_telemetry_fields

from .test_joint import _device, _wait_model
from .test_serve import publish_model, serve

#: documented fields this run cannot produce, and why: a test that lists them keeps the doc honest both
#: ways (every field seen is documented, every documented field not seen is named here)
NOT_IN_THIS_RUN = {
    "device": {"last_swap_previous"},  # its one swap replaced no model
    "worker": {"train_last_exit", "train_last_started"},  # no training in this test
    "serve": {"model_pending_version", "model_pending_chunks", "model_pending_of",  # only mid-download
              "teacher_labels_written", "teacher_labels_dropped", "teacher_labels_files"},  # no --data
}


def _is_number(value: object) -> bool:
    return type(value) in (int, float)  # not bool (a subclass of int), not str, not a dict or list


def test_every_telemetry_report_is_flat_numbers_with_documented_names(
        mosquitto_broker, fleet, trained_digits, keypair, tmp_path):
    broker = mosquitto_broker
    topics = Topics(fleet=fleet)
    version = publish_model(broker, fleet, trained_digits, keypair)
    with Inbox(broker.url("viewer", "v1", fleet=fleet)) as viewer, \
            serve(broker, fleet, keypair) as serve_worker, \
            IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet,
                                      data=tmp_path / "data", name="w1", batch_ms=10, status_interval=0.5)):
        # prepare: a viewer (what Grafana would log in as) on every telemetry topic of the fleet
        assert viewer.subscribe(topics.all_devices("telemetry"), qos=0)
        assert viewer.subscribe(f"{topics.root}/workers/+/telemetry", qos=0)
        assert serve_worker.wait_model(version.version, timeout=30)
        agent = _device(broker, fleet, keypair, tmp_path, "cam-1", limit=60, rate_hz=100,
                        escalate_rate=0.5, answer_timeout_ms=2000)
        agent.start()
        _wait_model(agent)
        # act: capture, infer, escalate, upload; then one more report period of every sender
        summary = agent.run(handle_signals=False)
        time.sleep(1.5)
        reports: dict[str, list[dict]] = {}
        for message in viewer.drain():
            reports.setdefault(message.topic, []).append(json.loads(message.payload))

    kinds = {topics.telemetry("cam-1"): "device", topics.worker_telemetry("w1"): "worker",
             topics.worker_telemetry("serve1"): "serve"}
    assert summary.ok and set(reports) == set(kinds), sorted(reports)
    for topic, kind in kinds.items():
        documented = documented_telemetry_fields(kind)
        seen: set[str] = set()
        for body in reports[topic]:
            bad = {k: v for k, v in body.items() if not _is_number(v)}
            assert not bad, f"{kind} telemetry on {topic} has values a chart cannot plot: {bad}"
            assert body["v"] == 1
            seen |= set(body)
        assert seen <= documented, f"{kind} telemetry fields not in docs/protocol.md: {seen - documented}"
        assert documented - seen == NOT_IN_THIS_RUN[kind], f"{kind}: documented, never seen"
    device = reports[topics.telemetry("cam-1")][-1]
    assert device["connected"] == 1 and device["inferences"] > 0 and device["escalated"] > 0
    assert device["inference_ms_p99"] >= device["inference_ms_p50"] > 0
    assert reports[topics.worker_telemetry("w1")][-1]["stored"] == summary.captured
    assert reports[topics.worker_telemetry("serve1")][-1]["answered"] > 0
