"""The device agent against real brokers (embedded amqtt and Mosquitto): end-to-end acks, status, resends."""

from __future__ import annotations

import time

import numpy as np
import pytest

from lepton.device import DeviceAgent, Pipeline, open_source
from lepton.errors import BrokerConnectionError
from tests.device._acker import Acker, Watcher


def make_agent(broker, fleet, tmp_path, device="dev-1", **kwargs) -> DeviceAgent:
    settings = dict(
        source="digits",
        pipeline="digits",
        spool_dir=tmp_path / device,
        batch_size=16,
        batch_ms=20,
        telemetry_interval=0.3,
    )
    settings.update(kwargs)
    return DeviceAgent(
        broker=broker.url("device", device, fleet=fleet), fleet=fleet, device_id=device, **settings
    )


def test_every_sample_arrives_once_with_labels_and_leaves_the_spool(broker, fleet, tmp_path):
    with Acker(broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        summary = make_agent(broker, fleet, tmp_path, limit=300).run()
    assert summary.ok and summary.stopped_by == "limit"
    assert summary.captured == summary.acked == 300 and summary.spool_depth == 0
    assert acker.seqs("dev-1") == set(range(300)) and acker.reused("dev-1") == []
    digits = open_source("digits", once=True)
    assert [acker.labels["dev-1"][s] for s in range(300)] == digits.labels[:300]
    assert acker.pipelines == {Pipeline.from_preset("digits").hash}
    assert acker.shapes == {("float32", (1, 8, 8))}
    assert acker.envelopes < 300  # batched


def test_a_batch_is_split_to_stay_under_the_message_size_limit(amqtt_broker, fleet, tmp_path):
    # 32 samples of 4 KiB each would make a ~130 KB envelope; AWS IoT Core refuses messages over 128 KB.
    frames = [(np.full((32, 32), i, np.float32), i % 10) for i in range(96)]
    broker = amqtt_broker
    with Acker(broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        summary = make_agent(broker, fleet, tmp_path, source=frames, pipeline={"ops": []}, once=True,
                             batch_size=32, batch_ms=500, max_message_bytes=20_000).run()

    assert summary.ok and summary.acked == 96
    assert acker.seqs("dev-1") == set(range(96)) and acker.reused("dev-1") == []
    assert 0 < acker.max_payload <= 20_000
    assert acker.envelopes >= 96 // 4  # at most 4 samples of 4 KiB fit in 20 KB


def test_retained_status_online_then_offline_and_telemetry(broker, fleet, tmp_path):
    with (
        Acker(broker.url("worker", "acker", fleet=fleet), fleet),
        Watcher(broker.url("viewer", "viewer", fleet=fleet), fleet) as watch,
    ):
        time.sleep(0.2)
        agent = make_agent(broker, fleet, tmp_path, limit=60, rate_hz=60)
        summary = agent.run()
        assert summary.ok
        assert watch.wait(lambda w: any(not b["online"] for b in w.bodies("dev-1", "status")))
    statuses = watch.bodies("dev-1", "status")
    online = [b for b in statuses if b["online"]]
    assert online and online[0]["pipeline"] == agent.pipeline.hash and online[0]["source"] == "digits"
    assert {"spool_depth", "dropped", "model_version", "next_seq"} <= set(online[0])
    final = statuses[-1]
    assert final["online"] is False and final["spool_depth"] == 0 and final["next_seq"] == 60
    telemetry = watch.bodies("dev-1", "telemetry")
    assert telemetry, "a telemetry report every 0.3 s over a 1 s run"
    last = telemetry[-1]
    for key in ("captured", "published", "acked", "spool_depth", "dropped", "preprocess_ms", "skipped"):
        assert key in last
    assert last["captured"] >= last["acked"] > 0 and last["dropped"] == 0
    assert any(t["preprocess_ms"] is not None and t["preprocess_ms"] > 0 for t in telemetry)
    # a new viewer sees the retained offline status
    with Watcher(broker.url("viewer", "viewer2", fleet=fleet), fleet) as late:
        assert late.wait(lambda w: w.bodies("dev-1", "status"))
        assert late.bodies("dev-1", "status")[-1]["online"] is False


def test_unacknowledged_samples_stay_spooled_and_go_out_next_run(broker, fleet, tmp_path):
    first = make_agent(broker, fleet, tmp_path, limit=50, drain_timeout=0.5).run()
    assert not first.ok and first.spool_depth == 50 and first.acked == 0  # a PUBACK is not an ack
    with Acker(broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        second = make_agent(broker, fleet, tmp_path, limit=10).run()
    assert second.ok and second.acked == 60 and second.next_seq == 60
    assert acker.seqs("dev-1") == set(range(60)) and acker.reused("dev-1") == []


def test_no_ack_within_timeout_means_resend(broker, fleet, tmp_path):
    with Acker(broker.url("worker", "acker", fleet=fleet), fleet, ack=False) as acker:
        time.sleep(0.2)
        agent = make_agent(broker, fleet, tmp_path, limit=40, ack_timeout=0.5)
        import threading

        def ack_later() -> None:
            acker.wait_for("dev-1", 40)
            time.sleep(1.2)  # past the ack timeout: the device must send everything again
            acker.ack = True

        threading.Thread(target=ack_later, daemon=True).start()
        summary = agent.run()
    assert summary.ok and summary.resent >= 40 and agent.counters.ack_timeouts >= 1
    assert acker.seqs("dev-1") == set(range(40)) and acker.deliveries["dev-1"] >= 80


def test_drop_oldest_is_counted_and_reported(amqtt_broker, fleet, tmp_path):
    from lepton.device import Spool

    one = len(Spool.encode_body(np.zeros((1, 8, 8), np.float32), 0))
    summary = make_agent(
        amqtt_broker, fleet, tmp_path, limit=30, spool_max_bytes=one * 10, drain_timeout=0.3
    ).run()
    assert summary.dropped == summary.dropped_this_run == 20 and summary.spool_depth == 10 and not summary.ok
    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        later = make_agent(amqtt_broker, fleet, tmp_path, limit=1, spool_max_bytes=one * 20).run()
    assert later.ok and later.dropped == 20 and later.dropped_this_run == 0  # the drop is still reported
    assert acker.seqs("dev-1") == set(range(20, 31))  # the 10 newest survived, then seq 30


def test_model_runtime_is_wired_into_status(amqtt_broker, fleet, tmp_path):
    with (
        Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet),
        Watcher(amqtt_broker.url("viewer", "viewer", fleet=fleet), fleet) as watch,
    ):
        time.sleep(0.2)
        agent = make_agent(amqtt_broker, fleet, tmp_path, limit=20, model="digits", verify=False)
        summary = agent.run()
        assert summary.ok and summary.model_version is None  # no model published: still captures
        assert watch.wait(lambda w: w.bodies("dev-1", "status"))
    status = watch.bodies("dev-1", "status")[0]
    assert status["model"] == "digits" and status["model_version"] is None and status["model_verify"] is False


def test_refused_password_is_a_broker_error(broker, fleet, tmp_path):
    url = broker.url("device", "dev-1", fleet=fleet).replace("mqtt://dev-1:", "mqtt://dev-1:wrong")
    agent = DeviceAgent(broker=url, fleet=fleet, device_id="dev-1", source="digits", spool_dir=tmp_path)
    with pytest.raises(BrokerConnectionError, match="refused"):
        agent.run()
    assert agent.spool._db is None  # spool closed cleanly even on a failed start


def _signed_mlp_package(tmp_path, pipeline: Pipeline, fleet: str):
    from onnx import TensorProto, helper, numpy_helper

    from lepton.protocol import build_package, generate_keypair, load_private_key

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["z"]),
            helper.make_node("Add", ["z", "b"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probs"], axis=-1),
        ],
        "t",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["n", 10])],
        initializer=[
            numpy_helper.from_array(rng.normal(0, 1, (64, 10)).astype(np.float32), "w"),
            numpy_helper.from_array(np.zeros(10, np.float32), "b"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    priv, pub = generate_keypair(tmp_path / "keys", name="fleet")
    manifest, chunks = build_package(
        fleet=fleet,
        name="digits",
        version=1,
        data=model.SerializeToString(),
        input_spec={"name": "x", "shape": [-1, 64], "dtype": "float32"},
        labels=[str(i) for i in range(10)],
        pipeline={"hash": pipeline.hash, "spec": pipeline.spec},
        private_key=load_private_key(priv),
    )
    return manifest, chunks, pub


def test_device_serves_a_signed_model_and_publishes_predictions(amqtt_broker, fleet, tmp_path):
    import threading

    from lepton.protocol import BrokerURL, Topics, new_client

    manifest, chunks, pub_key = _signed_mlp_package(tmp_path, Pipeline.from_preset("digits"), fleet)
    topics = Topics(fleet=fleet)
    url = BrokerURL.parse(amqtt_broker.url("worker", "publisher", fleet=fleet))
    publisher = new_client(url, client_id="publisher", clean_session=True)
    publisher.connect(url.host, url.port)
    publisher.loop_start()
    infos = [
        publisher.publish(topics.model_chunk("digits", 1, i), c, qos=1, retain=True)
        for i, c in enumerate(chunks)
    ]
    infos.append(publisher.publish(topics.model("digits"), manifest, qos=1, retain=True))
    for info in infos:
        info.wait_for_publish(10)
    publisher.disconnect()
    publisher.loop_stop()
    with (
        Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet),
        Watcher(amqtt_broker.url("viewer", "viewer", fleet=fleet), fleet) as watch,
    ):
        time.sleep(0.2)
        agent = make_agent(
            amqtt_broker, fleet, tmp_path, rate_hz=100, model="digits", public_key=pub_key, predictions=True
        )
        result = {}
        runner = threading.Thread(target=lambda: result.update(s=agent.run(handle_signals=False)))
        runner.start()
        assert watch.wait(lambda w: len(w.bodies("dev-1", "predictions")) >= 20, timeout=30)
        assert watch.wait(lambda w: any(s.get("model_version") == 1 for s in w.bodies("dev-1", "status")))
        assert watch.wait(lambda w: any(t.get("inferences", 0) > 0 for t in w.bodies("dev-1", "telemetry")))
        agent.stop()
        runner.join(30)
    summary = result["s"]
    assert summary.model_version == 1 and summary.stopped_by == "stopped"
    preds = watch.bodies("dev-1", "predictions")
    assert {p["version"] for p in preds} == {1}
    assert all(p["label"] in [str(i) for i in range(10)] and 0 <= p["confidence"] <= 1 for p in preds)
    digits = open_source("digits", once=True).labels
    assert all(p["truth"] == str(digits[p["seq"] % len(digits)]) for p in preds)  # truth travels with seq
    status = [s for s in watch.bodies("dev-1", "status") if s.get("model_version") == 1][-1]
    assert status["model_verify"] is True and status["model_error"] is None


def test_block_policy_pauses_capture_until_acks_free_room(amqtt_broker, fleet, tmp_path):
    import threading

    from lepton.device import Spool

    one = len(Spool.encode_body(np.zeros((1, 8, 8), np.float32), 0))
    agent = make_agent(
        amqtt_broker, fleet, tmp_path, limit=100, on_full="block", spool_max_bytes=one * 20, ack_timeout=1.0
    )  # the acker joins late: resend what it missed
    result = {}
    runner = threading.Thread(target=lambda: result.update(s=agent.run(handle_signals=False)))
    runner.start()
    deadline = time.monotonic() + 20
    while agent.counters.captured < 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)
    assert agent.counters.captured == 20 and agent.spool.depth == 20  # full: capture waits, nothing dropped
    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        runner.join(30)
    summary = result["s"]
    assert summary.ok and summary.captured == 100 and summary.dropped == 0
    assert acker.seqs("dev-1") == set(range(100))


def test_bad_frames_are_counted_and_a_failing_custom_source_ends_capture_cleanly(
    amqtt_broker, fleet, tmp_path
):
    def flaky():
        for i in range(5):
            yield np.full((8, 8), 10 * i, np.uint8), i
        yield np.zeros((2, 2, 2, 2), np.uint8), 9  # not an image: skipped and counted
        yield "not a frame", None
        yield np.full((8, 8), 99, np.uint8), 5
        raise RuntimeError("sensor bus timeout")

    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        summary = make_agent(amqtt_broker, fleet, tmp_path, source=flaky()).run()
    assert summary.ok and summary.captured == 6 and summary.frame_errors == 2
    assert summary.stopped_by == "source error: RuntimeError: sensor bus timeout"
    assert acker.seqs("dev-1") == set(range(6)) and acker.labels["dev-1"][5] == 5


def test_reconnect_backoff_grows_with_jitter_and_resets():
    from lepton.device._config import Backoff

    b = Backoff(base=0.5, cap=8.0)
    delays = [b.next() for _ in range(8)]
    for attempt, d in enumerate(delays):
        full = min(8.0, 0.5 * 2**attempt)
        assert full / 2 <= d <= full  # "equal jitter": half fixed, half random
    assert max(delays) <= 8.0 and delays[-1] >= 4.0
    fleet_delays = {round(Backoff().next(), 6) for _ in range(50)}
    assert len(fleet_delays) > 40  # devices coming back together do not reconnect in lock-step
    b.reset()
    assert b.next() <= 0.5


def test_numpy_labels_from_a_custom_source_are_sent_as_plain_values(amqtt_broker, fleet, tmp_path):
    labels = np.arange(20, dtype=np.int64) % 3  # what `zip(images, y)` over numpy arrays yields
    frames = [(np.full((4, 4), i, np.float32), labels[i]) for i in range(20)]
    frames.append((np.zeros((4, 4), np.float32), 1.5))
    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        summary = make_agent(amqtt_broker, fleet, tmp_path, source=frames, pipeline={"ops": []},
                             once=True).run()

    assert summary.ok and summary.acked == 20 and summary.frame_errors == 1  # the float label is refused
    assert [acker.labels["dev-1"][s] for s in range(20)] == [int(v) for v in labels]


class _RecordingDB:
    """Stands in for the spool's SQLite connection and records which thread ran SQL."""

    def __init__(self, db) -> None:  # noqa: ANN001
        self.db, self.calls = db, []

    def __getattr__(self, name):  # noqa: ANN001
        import threading

        self.calls.append((threading.current_thread().name, name))
        return getattr(self.db, name)


class _FakeClient:
    def __init__(self) -> None:
        self.subscribed, self.published = [], []

    def subscribe(self, topic, qos=0):  # noqa: ANN001
        self.subscribed.append(topic)

    def publish(self, topic, payload, qos=0, retain=False):  # noqa: ANN001
        from types import SimpleNamespace

        self.published.append(topic)
        return SimpleNamespace(rc=0)


def test_paho_callbacks_run_no_sql_and_hand_the_connect_to_the_publisher(tmp_path):
    from types import SimpleNamespace

    from lepton.protocol import encode_acks

    agent = DeviceAgent(broker="mqtt://dev-1:pw@127.0.0.1:1", fleet="f", device_id="dev-1",
                        source="digits", spool_dir=tmp_path)
    try:
        agent.spool.append(np.zeros((1, 8, 8), np.float32), 1)
        recorder = agent.spool._db = _RecordingDB(agent.spool._db)
        client = agent._client = _FakeClient()
        ok = SimpleNamespace(is_failure=False)
        agent._on_connect(client, None, SimpleNamespace(session_present=False), ok, None)
        agent._on_message(client, None, SimpleNamespace(topic=agent.topics.acks("dev-1"),
                                                        payload=encode_acks([(0, 0)]), retain=False))
        agent._on_disconnect(client, None, None, ok, None)
        agent._on_connect(client, None, SimpleNamespace(session_present=True), ok, None)
        assert recorder.calls == []  # no SQL on paho's thread (the status reads the spool's memory)
        assert client.published == [] and client.subscribed == [agent.topics.acks("dev-1")] * 2
        assert agent._just_connected.is_set() and agent.connected  # the publisher takes it from here
        assert agent._publisher.ack_inbox == [(0, 0)] and agent.counters.reconnects == 1
        assert agent.status()["spool_depth"] == 1 and agent.telemetry()["captured"] == 0
        assert recorder.calls == []  # the reports cost no SQL on whatever thread builds them
        agent._publisher.apply_acks(None)  # the publisher's job (or the main thread's once it stopped)
        assert agent.spool.depth == 0 and agent.counters.acked == 1 and recorder.calls
    finally:
        agent._client = None
        agent.spool._db = recorder.db
        agent.close()
