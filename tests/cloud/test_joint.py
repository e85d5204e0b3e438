"""Edge-cloud collaboration end to end: real device agents escalate to a real `lepton serve` worker
through a real broker, use the cloud's answers in time and their own otherwise, and upload only what
the upload policy keeps, stored once by a real ingest worker."""

from __future__ import annotations

import json
import time

import pytest

from lepton.cloud import Dataset, IngestWorker, WorkerConfig
from lepton.cloud._serve import ServeWorker
from lepton.cloud._serve_config import ServeConfig
from lepton.device import DeviceAgent
from lepton.protocol import Topics

from tests.broker._mqtt import Inbox

from .test_serve import publish_model


def _device(broker, fleet, keypair, tmp_path, name, **kw):
    kw.setdefault("model", "digits")
    if kw["model"] is not None:
        kw.setdefault("public_key", keypair[1])
    return DeviceAgent(broker=broker.url("device", name, fleet=fleet), fleet=fleet, device_id=name,
                       source="digits", pipeline="digits", spool_dir=tmp_path / name, fsync=False,
                       drain_timeout=30, telemetry_interval=0.5, **kw)


def _wait_model(agent, timeout=30.0):
    deadline = time.monotonic() + timeout
    while agent.runtime.version is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert agent.runtime.version is not None, "the device never loaded the model"


def test_hard_samples_go_to_the_cloud_and_its_answers_are_used(
        broker, fleet, trained_digits, keypair, tmp_path):
    version = publish_model(broker, fleet, trained_digits, keypair)
    data = tmp_path / "data"
    topics = Topics(fleet=fleet)
    with ServeWorker(ServeConfig(broker=broker.url("worker", "serve1", fleet=fleet), fleet=fleet,
                                 model="digits", name="serve1", public_key=keypair[1], data=data)) as serve, \
            IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet, data=data,
                                      name="w1", batch_ms=10)), \
            Inbox(broker.url("viewer", "v1", fleet=fleet)) as viewer:
        assert serve.wait_model(version.version, timeout=30)
        assert viewer.subscribe(topics.predictions("cam-1"), qos=0)
        agent = _device(broker, fleet, keypair, tmp_path, "cam-1", limit=300, rate_hz=200,
                        escalate_rate=0.3, upload="escalated+sample:0.1", predictions=True,
                        answer_timeout_ms=2000)
        agent.start()
        _wait_model(agent)
        summary = agent.run(handle_signals=False)
        time.sleep(0.5)  # QoS 0 predictions still in flight
        predictions = [json.loads(m.payload) for m in viewer.drain()]
    j = summary.collaboration
    assert summary.ok and summary.captured == 300
    assert j["escalation"] == "rate:0.3" and j["upload"] == "escalated+sample:0.1"
    assert 0.2 <= j["escalated_fraction"] <= 0.4, j
    assert j["answered_by_cloud"] >= 0.9 * j["escalated"], j  # answers arrive well within 2 s on loopback
    assert j["answered_by_cloud"] + j["answered_by_edge"] == 300
    assert j["answer_ms_p50"] is not None and j["answer_ms_p99"] >= j["answer_ms_p50"]
    # uploaded: every escalated sample, plus ~10 % of the rest; the dataset holds exactly those, once
    assert j["escalated"] <= j["uploaded"] < j["escalated"] + 0.2 * (300 - j["escalated"]), j
    assert summary.acked == j["uploaded"]
    t = Dataset(data, fleet).read_table(columns=["device", "seq"])
    seqs = t.column("seq").to_pylist()
    assert len(seqs) == len(set(seqs)) == j["uploaded"] and max(seqs) <= summary.next_seq - 1
    # bytes: the infer requests plus the uploaded samples, per sample captured
    assert j["bytes_per_sample"] == round((j["infer_bytes"] + j["sample_bytes"]) / 300, 1)
    # predictions say who answered; the cloud's label is what the device reports for those
    by = {p["answered_by"] for p in predictions}
    assert by == {"cloud", "edge"}, by
    cloud = [p for p in predictions if p["answered_by"] == "cloud"]
    assert cloud and all(p["escalated"] and p["edge_label"] is not None for p in cloud)
    assert len({p["seq"] for p in predictions}) == len(predictions)  # one prediction per sample
    assert j["joint_accuracy"] >= j["edge_accuracy"] - 0.01  # the same model on both sides here
    # the answers were recorded as teacher labels for the uploaded samples
    from lepton.cloud._labels import LabelStore

    teacher = {r.seq for r in LabelStore(data, fleet).rows() if r.source == "teacher"}
    assert len(teacher) == j["answered_by_cloud"]


def test_without_a_cloud_the_device_answers_alone_and_never_stalls(broker, fleet, trained_digits, keypair,
                                                                    tmp_path):
    version = publish_model(broker, fleet, trained_digits, keypair)
    with IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet,
                                   data=tmp_path / "data", name="w1", batch_ms=10)):
        agent = _device(broker, fleet, keypair, tmp_path, "cam-2", limit=200, rate_hz=100,
                        escalate_rate=0.5, answer_timeout_ms=500)
        agent.start()
        _wait_model(agent)
        assert agent.runtime.version == version.version
        started = time.monotonic()
        summary = agent.run(handle_signals=False)
        took = time.monotonic() - started
    j = summary.collaboration
    assert summary.ok and j["escalated"] >= 60
    assert j["answered_by_cloud"] == 0 and j["answered_by_edge"] == 200 and j["answers_timed_out"] == j["escalated"]
    # 200 samples at 100 Hz: 2 s of capture; waiting for no one costs one timeout at the end (0.5 s), not
    # one each (60 or more escalations x 0.5 s = 30 s or more); the rest is headroom for a loaded machine.
    assert took < 2.0 + 0.5 + 12.0, took
    assert j["joint_accuracy"] == j["edge_accuracy"]


def test_a_device_without_a_model_is_answered_by_the_cloud(amqtt_broker, fleet, trained_digits, keypair,
                                                           tmp_path):
    broker = amqtt_broker
    version = publish_model(broker, fleet, trained_digits, keypair)
    with ServeWorker(ServeConfig(broker=broker.url("worker", "serve1", fleet=fleet), fleet=fleet,
                                 model="digits", name="serve1", public_key=keypair[1])) as serve, \
            IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet,
                                      data=tmp_path / "data", name="w1", batch_ms=10)):
        assert serve.wait_model(version.version, timeout=30)
        agent = _device(broker, fleet, keypair, tmp_path, "cam-3", model=None, cloud_only=True, limit=150,
                        rate_hz=150, answer_timeout_ms=2000, upload="sample:0.2")
        summary = agent.run(handle_signals=False)
    j = summary.collaboration
    assert summary.ok and j["escalation"] == "cloud-only" and j["escalated"] == 150
    assert j["answered_by_cloud"] >= 140 and j["joint_accuracy"] >= 0.9, j
    assert j["edge_accuracy"] == 0.0  # no local model: the edge answers nothing
    assert 10 <= j["uploaded"] <= 50 and summary.acked == j["uploaded"]


@pytest.mark.parametrize("kw, words", [
    ({"cloud_only": True}, "drop --model"),
    ({"model": None, "escalate_rate": 0.1}, "need a local model"),
    ({"upload": "escalated"}, "needs escalation"),
    ({"escalate_rate": 0.1, "escalate_below": 0.5}, "exclude each other"),
    ({"upload": "most"}, "--upload"),
])
def test_collaboration_settings_that_cannot_work_are_refused_up_front(tmp_path, keypair, kw, words):
    from lepton.errors import ConfigError

    base = dict(broker="mqtt://d1:pw@127.0.0.1:1", fleet="f", device_id="d1", source="digits",
                spool_dir=tmp_path, model="digits", public_key=keypair[1])
    with pytest.raises(ConfigError, match=words):
        DeviceAgent(**{**base, **kw})


def test_the_fixtures_digits_hash_is_the_devices_digits_preset():
    from lepton.device import Pipeline

    from .conftest import DIGITS_HASH

    assert Pipeline.from_preset("digits").hash == DIGITS_HASH
