"""ModelRuntime: verification, rejection reasons, ordering, the last good model on disk.

The helpers at the top (ONNX models built with onnx.helper, signed packages, a publisher and a device
connection) are shared with tests/device/test_hotswap.py.
"""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from lepton.device import ModelRuntime, Prediction
from lepton.device._modelstore import ModelStore
from lepton.protocol import (
    BrokerURL,
    Topics,
    build_package,
    connect,
    generate_keypair,
    load_private_key,
    load_public_key,
    new_client,
)

MODEL = "digits"
PIPE = "0123456789abcdef"
OTHER_PIPE = "fedcba9876543210"
N_IN, N_OUT = 64, 10
LABELS = [str(i) for i in range(N_OUT)]
INPUT_SPEC = {"name": "x", "shape": [-1, N_IN], "dtype": "float32"}


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------
def make_onnx(seed: int, *, n_in: int = N_IN, n_out: int = N_OUT, hidden: int = 0) -> bytes:
    """A small softmax classifier (optionally with a hidden layer, to make a model of a given size)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inits, nodes, prev, width = [], [], "x", n_in
    if hidden:
        inits += [numpy_helper.from_array(rng.normal(0, 0.1, (n_in, hidden)).astype(np.float32), "w1"),
                  numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")]
        nodes += [helper.make_node("MatMul", ["x", "w1"], ["h0"]),
                  helper.make_node("Add", ["h0", "b1"], ["h1"]),
                  helper.make_node("Relu", ["h1"], ["h"])]
        prev, width = "h", hidden
    inits += [numpy_helper.from_array(rng.normal(0, 1, (width, n_out)).astype(np.float32), "w"),
              numpy_helper.from_array(rng.normal(0, 1, n_out).astype(np.float32), "b")]
    nodes += [helper.make_node("MatMul", [prev, "w"], ["z"]), helper.make_node("Add", ["z", "b"], ["logits"]),
              helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)]
    graph = helper.make_graph(
        nodes, f"lepton-test-{seed}",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n_in])],
        [helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["batch", n_out])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


def make_keys(directory: Path):
    """(private_key, public_key, other_private_key, public_key_path)."""
    priv, pub = generate_keypair(directory, name="fleet")
    other, _ = generate_keypair(directory, name="other")
    return load_private_key(priv), load_public_key(pub), load_private_key(other), pub


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def package(fleet: str, version: int, data: bytes, private_key, *, pipeline: str = PIPE, chunk_size: int = 1024,
            input_spec: dict | None = None, labels: list | None = None, parent: int | None = None):
    return build_package(fleet=fleet, name=MODEL, version=version, data=data, input_spec=input_spec or INPUT_SPEC,
                         labels=labels or LABELS, pipeline={"hash": pipeline, "spec": {"preset": "test"}},
                         metrics={"val_accuracy": 0.9}, parent=parent, chunk_size=chunk_size,
                         private_key=private_key)


def messages(topics: Topics, version: int, manifest: bytes, chunks: list[bytes]) -> list[tuple[str, bytes]]:
    """The retained messages of one version, exactly the layout of lepton/protocol/_models.py, in the
    documented order (manifest first); tests that need another order reorder them."""
    return [(topics.model(MODEL), manifest)] + [(topics.model_chunk(MODEL, version, i), c)
                                                for i, c in enumerate(chunks)]


def feed(runtime: ModelRuntime, msgs: list[tuple[str, bytes]]) -> None:
    for topic, payload in msgs:
        assert runtime.handle_message(topic, payload, True) is True


def wait_for(predicate, timeout: float = 30.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def make_runtime(fleet: str, store: Path, public_key, **kw) -> ModelRuntime:
    kw.setdefault("pipeline_hash", PIPE)
    kw.setdefault("input_shape", (N_IN,))
    return ModelRuntime(topics=Topics(fleet=fleet), model=MODEL, store_dir=store, public_key=public_key, **kw)


class Publisher:
    """The cloud side of delivery, in the documented order: the retained manifest, then the chunks.

    Each publish waits until every message came back on the publisher's own subscription: amqtt
    acknowledges a publish before it processes it and drops what is queued when the client leaves.
    """

    def __init__(self, url: str, fleet: str) -> None:
        self.topics = Topics(fleet=fleet)
        self.url = BrokerURL.parse(url)
        self.client = new_client(self.url, client_id=f"{self.url.username}/pub-{uuid.uuid4().hex[:8]}")
        self.echoes: dict[tuple[str, bytes], int] = {}
        self.cond = threading.Condition()
        subscribed = threading.Event()

        def on_message(client, userdata, message):
            if not message.retain:
                with self.cond:
                    key = (message.topic, bytes(message.payload))
                    self.echoes[key] = self.echoes.get(key, 0) + 1
                    self.cond.notify_all()

        self.client.on_message = on_message
        self.client.on_subscribe = lambda *a: subscribed.set()
        connect(self.client, self.url)
        self.client.subscribe(self.topics.model_filter(MODEL), 0)
        assert subscribed.wait(10), "no SUBACK for the publisher's echo subscription"

    def _send(self, items: list[tuple[str, bytes]]) -> None:
        with self.cond:
            for key in items:
                self.echoes.pop(key, None)
        infos = [self.client.publish(t, p, qos=1, retain=True) for t, p in items]
        for info in infos:
            info.wait_for_publish(30)
        with self.cond:
            assert self.cond.wait_for(lambda: all(k in self.echoes for k in items), 30), "echoes missing"

    def publish(self, version: int, manifest: bytes, chunks: list[bytes]) -> float:
        """Publish and wait for every echo; return the wall-clock time publishing started."""
        started = time.time()
        self._send(messages(self.topics, version, manifest, chunks))
        return started

    def clear(self, version: int, n_chunks: int) -> None:
        self._send([(self.topics.model_chunk(MODEL, version, i), b"") for i in range(n_chunks)])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class DeviceLink:
    """A paho client that feeds a runtime the way the device agent does."""

    def __init__(self, runtime: ModelRuntime, url: str, client_id: str, *, clean_session: bool = True) -> None:
        self.runtime = runtime
        self.url = BrokerURL.parse(url)
        self.client = new_client(self.url, client_id=client_id, clean_session=clean_session)
        self.subscribed = threading.Event()
        self.connected = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties):
            if not reason_code.is_failure:
                self.connected.set()
                for topic_filter, qos in runtime.on_connected(session_present=flags.session_present):
                    client.subscribe(topic_filter, qos)

        def on_subscribe(client, userdata, mid, reason_codes, properties):
            self.subscribed.set()

        def on_message(client, userdata, message):
            self.received_bytes += len(message.payload)
            runtime.handle_message(message.topic, message.payload, message.retain)

        def resubscribe():  # what the device agent does: the broker resends the retained chunks
            for topic_filter, qos in runtime.subscriptions():
                self.client.subscribe(topic_filter, qos)

        self.received_bytes = 0
        self.client.on_connect = on_connect
        self.client.on_subscribe = on_subscribe
        self.client.on_message = on_message
        runtime.on_resubscribe = resubscribe
        connect(self.client, self.url)
        assert self.connected.wait(10), "no CONNACK"
        if clean_session:
            assert self.subscribed.wait(10), "no SUBACK"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


PROBE = np.linspace(-1, 1, N_IN, dtype=np.float32)


def reference(data: bytes, x: np.ndarray = PROBE) -> int:
    import onnxruntime as ort

    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return int(np.argmax(session.run(None, {"x": x[None, :]})[0][0]))


# ------------------------------------------------------------------------------------------------
# tests without a broker: the runtime's own API, fed exactly what paho would hand it
# ------------------------------------------------------------------------------------------------
def test_chunks_in_any_order_before_and_after_the_manifest(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    data = make_onnx(1, hidden=32)
    manifest, chunks = package(fleet, 1, data, private)
    assert len(chunks) >= 4
    changes = []
    runtime = make_runtime(fleet, tmp_path, public, on_change=changes.append)
    try:
        assert runtime.predict(PROBE) is None  # nothing loaded yet
        m, cs = messages(topics, 1, manifest, chunks)[0], messages(topics, 1, manifest, chunks)[1:]
        order = [cs[3], cs[1], m, cs[0]] + cs[4:] + [cs[2]]  # manifest in the middle
        feed(runtime, order)
        wait_for(lambda: runtime.version == 1, what="v1")
        pred = runtime.predict(PROBE)
        assert isinstance(pred, Prediction)
        assert pred.version == 1 and pred.index == reference(data) and pred.label == str(pred.index)
        assert 0 < pred.confidence <= 1 and pred.latency_ms > 0
        status = runtime.status()
        assert status["model"] == MODEL and status["model_version"] == 1 and status["model_error"] is None
        assert status["model_source"] == "broker"
        assert changes and changes[-1]["model_version"] == 1
        assert runtime.handle_message(Topics(fleet=fleet).status("dev-1"), b"{}", False) is False
        assert runtime.handle_message("some/other/topic", b"x", False) is False
    finally:
        runtime.close()


@pytest.mark.parametrize("limit, prepacked", [(None, True), (10**9, True), (1000, False)])
def test_models_above_prepack_max_bytes_are_built_without_prepacking_and_predict_the_same(
        tmp_path, keys, fleet, limit, prepacked):
    private, public, _, _ = keys
    data = make_onnx(5, hidden=32)
    assert len(data) > 1000
    runtime = make_runtime(fleet, tmp_path, public, prepack_max_bytes=limit)
    try:
        feed(runtime, messages(Topics(fleet=fleet), 1, *package(fleet, 1, data, private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        options = runtime._current.session.get_session_options()  # the session the swap installed
        try:
            disabled = options.get_session_config_entry("session.disable_prepacking") == "1"
        except RuntimeError:  # never set: ONNX Runtime's default, prepacking on
            disabled = False

        assert disabled is not prepacked
        assert runtime.predict(PROBE).index == reference(data)
    finally:
        runtime.close()


def _serve(runtime, fleet: str, version: int, private) -> None:  # noqa: ANN001
    """Deliver a small signed model of ``version`` and wait until the runtime serves it."""
    feed(runtime, messages(Topics(fleet=fleet), version,
                           *package(fleet, version, make_onnx(version, hidden=32), private)))
    wait_for(lambda: runtime.version == version, what=f"v{version}")


def test_a_swapped_out_session_is_freed_by_the_worker_once_no_inference_holds_it(tmp_path, keys, fleet):
    """Freeing a large session takes milliseconds; the worker does it, not the next inference."""
    import weakref

    private, public, _, _ = keys
    runtime = make_runtime(fleet, tmp_path, public)
    freed_by: list[str] = []
    try:
        _serve(runtime, fleet, 1, private)
        old = runtime._current  # held across the swap, as by an inference in flight on v1
        weakref.finalize(old, lambda: freed_by.append(threading.current_thread().name))
        held = runtime.predict(PROBE)

        _serve(runtime, fleet, 2, private)
        after = [runtime.predict(PROBE) for _ in range(3)]
        del old  # the "inference" returns: without the worker's reference this thread would free it
        wait_for(lambda: freed_by, what="the old model freed")

        assert held.version == 1 and all(p.version == 2 for p in after)
        assert freed_by == [f"lepton-runtime-{MODEL}"]  # the worker thread, not this (inference) thread
    finally:
        runtime.close()


def test_the_worker_lets_go_of_a_swapped_out_model_someone_keeps_holding(tmp_path, keys, fleet, monkeypatch):
    """Not an inference but a holder that never lets go: the worker drops its own reference after
    RETIRED_MAX_S instead of keeping every old model."""
    import lepton.device._runtime as runtime_module

    monkeypatch.setattr(runtime_module, "RETIRED_MAX_S", 0.0)
    private, public, _, _ = keys
    runtime = make_runtime(fleet, tmp_path, public)
    try:
        _serve(runtime, fleet, 1, private)
        old = runtime._current
        _serve(runtime, fleet, 2, private)

        wait_for(lambda: not runtime._retired, what="the worker to drop its reference")
        assert old.manifest.version == 1 and runtime.predict(PROBE).version == 2
    finally:
        runtime.close()


def test_stale_versions_are_ignored_without_an_error(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    try:
        feed(runtime, messages(topics, 3, *package(fleet, 3, make_onnx(3), private)))
        wait_for(lambda: runtime.version == 3, what="v3")
        feed(runtime, messages(topics, 2, *package(fleet, 2, make_onnx(2), private)))
        feed(runtime, messages(topics, 3, *package(fleet, 3, make_onnx(3), private)))  # retained again on reconnect
        wait_for(lambda: runtime.telemetry()["model_stale_ignored"] >= 2, what="stale versions counted")
        assert runtime.version == 3
        assert runtime.status()["model_error"] is None
        assert runtime.telemetry()["model_rejections"] == 0
    finally:
        runtime.close()


@pytest.mark.parametrize("case, reason", [
    ("tampered_chunk", "chunk_hash_mismatch"),
    ("unsigned", "unsigned"),
    ("other_key", "unknown_key"),
    ("forged_signature", "bad_signature"),
    ("wrong_pipeline", "incompatible_pipeline"),
    ("wrong_input", "incompatible_input"),
    ("not_onnx", "load_failed"),
    ("truncated_manifest", "bad_manifest"),
])
def test_a_bad_model_is_refused_and_the_old_one_keeps_serving(tmp_path, keys, fleet, case, reason):
    private, public, other, _ = keys
    topics = Topics(fleet=fleet)
    good = make_onnx(1)
    changes = []
    runtime = make_runtime(fleet, tmp_path, public, on_change=changes.append)
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, good, private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        data = make_onnx(2)
        manifest, chunks = package(fleet, 2, data, private)
        if case == "tampered_chunk":
            chunks[0] = bytes([chunks[0][0] ^ 0xFF]) + chunks[0][1:]
        elif case == "unsigned":
            manifest, chunks = package(fleet, 2, data, None)
        elif case == "other_key":
            manifest, chunks = package(fleet, 2, data, other)
        elif case == "forged_signature":  # right key id, signature of other bytes
            import base64
            import json
            outer = json.loads(manifest)
            outer["signature"]["sig"] = base64.b64encode(private.sign(b"something else")).decode()
            manifest = json.dumps(outer).encode()
        elif case == "wrong_pipeline":
            manifest, chunks = package(fleet, 2, data, private, pipeline=OTHER_PIPE)
        elif case == "wrong_input":
            manifest, chunks = package(fleet, 2, make_onnx(2, n_in=32), private,
                                       input_spec={"name": "x", "shape": [-1, 32], "dtype": "float32"})
        elif case == "not_onnx":
            manifest, chunks = package(fleet, 2, b"this is not an ONNX graph" * 100, private)
        elif case == "truncated_manifest":
            manifest = manifest[: len(manifest) // 2]
        feed(runtime, messages(topics, 2, manifest, chunks))
        wait_for(lambda: runtime.status()["model_error"], what="a rejection")
        error = runtime.status()["model_error"]
        assert error["reason"] == reason, error
        assert error["message"]
        assert changes[-1]["model_error"]["reason"] == reason  # the agent was told to republish
        pred = runtime.predict(PROBE)
        assert pred is not None and pred.version == 1 and pred.index == reference(good)
        assert runtime.telemetry()["model_rejections"] >= 1
        assert runtime.telemetry()["inference_failures"] == 0
        # a good newer version clears the error
        feed(runtime, messages(topics, 3, *package(fleet, 3, make_onnx(3), private)))
        wait_for(lambda: runtime.version == 3, what="v3")
        assert runtime.status()["model_error"] is None
    finally:
        runtime.close()


def test_no_verify_still_checks_hashes(tmp_path, keys, fleet):
    private, _, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, None)  # --no-verify
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(1), None)))  # unsigned is fine now
        wait_for(lambda: runtime.version == 1, what="unsigned v1 under --no-verify")
        assert runtime.status()["model_verify"] is False
        manifest, chunks = package(fleet, 2, make_onnx(2), private)
        chunks[-1] = chunks[-1][:-1] + bytes([chunks[-1][-1] ^ 1])
        feed(runtime, messages(topics, 2, manifest, chunks))
        wait_for(lambda: runtime.status()["model_error"], what="a rejection")
        assert runtime.status()["model_error"]["reason"] == "chunk_hash_mismatch"
        assert runtime.version == 1
    finally:
        runtime.close()


def test_superseded_chunks_are_dropped_and_accuracy_is_per_version(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    try:
        m2, c2 = package(fleet, 2, make_onnx(2, hidden=16), private)
        m3, c3 = package(fleet, 3, make_onnx(3), private)
        feed(runtime, [(topics.model_chunk(MODEL, 2, 0), c2[0])])  # half of v2, never completed
        feed(runtime, messages(topics, 3, m3, c3))
        wait_for(lambda: runtime.version == 3, what="v3")
        feed(runtime, messages(topics, 2, m2, c2))  # late v2 chunks and manifest: stale now
        wait_for(lambda: runtime.telemetry()["model_stale_ignored"] >= 1, what="v2 ignored")
        assert runtime.version == 3 and runtime.status()["model_pending"] is None
        pred = runtime.predict(PROBE)
        runtime.record_truth(pred, pred.label)
        runtime.record_truth(runtime.predict(PROBE), "not-a-label")
        acc = runtime.status()["accuracy"]["3"]
        assert acc == {"accuracy": 0.5, "correct": 1, "samples": 2}
        tel = runtime.telemetry()
        assert tel["inferences"] == 2 and tel["inference_ms_p99"] >= tel["inference_ms_p50"] > 0
    finally:
        runtime.close()


def test_image_features_are_reshaped_for_a_flat_model(tmp_path, keys, fleet):
    private, public, _, _ = keys
    runtime = make_runtime(fleet, tmp_path, public, input_shape=(8, 8))
    try:
        data = make_onnx(4)
        feed(runtime, messages(Topics(fleet=fleet), 1, *package(fleet, 1, data, private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        pred = runtime.predict(PROBE.reshape(8, 8))
        assert pred is not None and pred.index == reference(data)
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------
# the last good model on disk
# ------------------------------------------------------------------------------------------------
def test_restart_without_a_broker_serves_the_last_good_model(tmp_path, keys, fleet, amqtt_broker):
    private, public, _, _ = keys
    store = tmp_path / "models"
    data = make_onnx(7, hidden=64)
    pub = Publisher(amqtt_broker.url("worker", "cloud", fleet=fleet), fleet)
    runtime = make_runtime(fleet, store, public)
    link = DeviceLink(runtime, amqtt_broker.url("device", "dev-1", fleet=fleet), "dev-1")
    try:
        pub.publish(1, *package(fleet, 1, make_onnx(6), private))
        wait_for(lambda: runtime.version == 1, what="v1")
        pub.publish(2, *package(fleet, 2, data, private))
        wait_for(lambda: runtime.version == 2, what="v2")
    finally:
        link.close()
        pub.close()
        runtime.close()
    amqtt_broker.stop()  # the broker is gone for good

    restarted = make_runtime(fleet, store, public)  # no connection at all
    try:
        pred = restarted.predict(PROBE)  # serves at once, from the constructor on
        assert pred is not None and pred.version == 2 and pred.index == reference(data)
        assert restarted.status()["model_source"] == "disk" and restarted.status()["model_error"] is None
    finally:
        restarted.close()

    # the stored copy is re-verified: another trusted key, or a flipped byte, is not served
    _, _, other, _ = keys
    other_runtime = make_runtime(fleet, store, other.public_key())
    try:
        assert other_runtime.predict(PROBE) is None
        assert other_runtime.status()["model_error"]["reason"] == "unknown_key"
    finally:
        other_runtime.close()
    path = ModelStore(store, MODEL).onnx_path(2)
    assert sorted(p.name for p in store.iterdir()) == ["digits.manifest", "digits.v2.onnx"]  # v1 removed
    blob = bytearray(path.read_bytes())
    blob[-10] ^= 0xFF
    path.write_bytes(bytes(blob))
    tampered = make_runtime(fleet, store, public)
    try:
        assert tampered.predict(PROBE) is None
        assert tampered.status()["model_error"]["reason"] in ("chunk_hash_mismatch", "hash_mismatch")
    finally:
        tampered.close()


def test_the_stored_model_must_fit_the_current_pipeline(tmp_path, keys, fleet):
    private, public, _, _ = keys
    manifest, chunks = package(fleet, 1, make_onnx(1), private)
    ModelStore(tmp_path, MODEL).save(manifest, b"".join(chunks))
    runtime = make_runtime(fleet, tmp_path, public, pipeline_hash=OTHER_PIPE)
    try:
        assert runtime.predict(PROBE) is None
        assert runtime.status()["model_error"]["reason"] == "incompatible_pipeline"
    finally:
        runtime.close()
    same = make_runtime(fleet, tmp_path, public)
    try:
        assert same.predict(PROBE).version == 1
    finally:
        same.close()


# ------------------------------------------------------------------------------------------------
# through real brokers
# ------------------------------------------------------------------------------------------------
def test_late_joiner_assembles_the_current_model_from_retained_messages(broker, keys, fleet, tmp_path):
    private, public, _, _ = keys
    pub = Publisher(broker.url("worker", "cloud", fleet=fleet), fleet)
    v1, v2 = make_onnx(11, hidden=48), make_onnx(12, hidden=48)
    try:
        m1, c1 = package(fleet, 1, v1, private)
        pub.publish(1, m1, c1)
        m2, c2 = package(fleet, 2, v2, private, parent=1)
        pub.publish(2, m2, c2)  # v1's chunks are left retained too: the runtime must not care
        assert len(c2) > 5
    finally:
        pub.close()
    runtime = make_runtime(fleet, tmp_path, public)
    link = DeviceLink(runtime, broker.url("device", "late-dev", fleet=fleet), "late-dev")
    try:
        wait_for(lambda: runtime.version == 2, what="v2 from retained messages")
        assert runtime.predict(PROBE).index == reference(v2)
        assert runtime.status()["model_error"] is None
        assert runtime.telemetry()["swaps"] == 1
    finally:
        link.close()
        runtime.close()


def test_rejections_through_the_broker_keep_the_old_model_and_report_the_reason(amqtt_broker, keys, fleet,
                                                                                tmp_path):
    private, public, other, _ = keys
    pub = Publisher(amqtt_broker.url("worker", "cloud", fleet=fleet), fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    link = DeviceLink(runtime, amqtt_broker.url("device", "dev-r", fleet=fleet), "dev-r")
    good = make_onnx(21)
    try:
        pub.publish(1, *package(fleet, 1, good, private))
        wait_for(lambda: runtime.version == 1, what="v1")
        m, c = package(fleet, 2, make_onnx(22), private)
        c[1] = c[1][:100] + bytes([c[1][100] ^ 0x01]) + c[1][101:]
        bad = [("chunk_hash_mismatch", (m, c)),
               ("unsigned", package(fleet, 3, make_onnx(23), None)),
               ("unknown_key", package(fleet, 4, make_onnx(24), other)),
               ("incompatible_pipeline", package(fleet, 5, make_onnx(25), private, pipeline=OTHER_PIPE))]
        for version, (reason, (manifest, chunks)) in enumerate(bad, start=2):
            pub.publish(version, manifest, chunks)
            wait_for(lambda r=reason: (runtime.status()["model_error"] or {}).get("reason") == r, what=reason)
            assert runtime.status()["model_error"]["version"] == version
            pred = runtime.predict(PROBE)
            assert pred.version == 1 and pred.index == reference(good)
        assert runtime.telemetry()["inference_failures"] == 0
    finally:
        link.close()
        pub.close()
        runtime.close()


def test_serving_a_model_imports_no_training_stack(tmp_path, keys, fleet):
    """The runtime (verify, load, infer) runs on a device without torch, lightning, pyarrow or onnx."""
    import subprocess
    import sys

    private, _, _, pub_path = keys
    ModelStore(tmp_path, MODEL).save(*_joined(package(fleet, 1, make_onnx(1), private)))
    code = f"""
import sys
import numpy as np
from pathlib import Path
from lepton.device import ModelRuntime
from lepton.protocol import Topics, load_public_key
rt = ModelRuntime(topics=Topics(fleet={fleet!r}), model={MODEL!r}, store_dir=Path({str(tmp_path)!r}),
                  public_key=load_public_key({str(pub_path)!r}), pipeline_hash={PIPE!r},
                  input_shape=({N_IN},))
assert rt.predict(np.zeros({N_IN}, np.float32)).version == 1
rt.close()
print(sorted(m for m in ("torch", "lightning", "pyarrow", "onnx") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _joined(built: tuple[bytes, list[bytes]]) -> tuple[bytes, bytes]:
    manifest, chunks = built
    return manifest, b"".join(chunks)


def test_garbage_on_model_topics_never_raises_and_never_replaces_the_model(tmp_path, keys, fleet, caplog):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    good = make_onnx(9)
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, good, private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        topic_choices = st.sampled_from([topics.model(MODEL), topics.model_chunk(MODEL, 2, 0),
                                         topics.model_chunk(MODEL, 7, 3), f"{topics.model(MODEL)}/junk",
                                         f"{topics.model(MODEL)}/v/x/chunks/1", "lepton", ""])

        @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
        @given(topic=topic_choices, payload=st.binary(max_size=2048))
        def hammer(topic, payload):
            assert runtime.handle_message(topic, payload, False) in (True, False)

        hammer()
        runtime.handle_message(topics.model(MODEL), b'{"v": 1, "manifest": "{\\"kind\\": 1}"}', True)
        wait_for(lambda: runtime._inbox.empty(), what="the inbox drained")
        pred = runtime.predict(PROBE)
        assert pred.version == 1 and pred.index == reference(good)
        assert runtime._worker.is_alive()
        assert not [r for r in caplog.records if "unexpected error" in r.getMessage()]
        # and a good newer version still gets through afterwards
        feed(runtime, messages(topics, 2, *package(fleet, 2, make_onnx(10), private)))
        wait_for(lambda: runtime.version == 2, what="v2 after the garbage")
    finally:
        runtime.close()


def test_reports_from_other_threads_read_a_consistent_snapshot_while_versions_assemble(tmp_path, keys, fleet):
    # status() and buffers() run on the agent's threads while the worker assembles: they read the
    # snapshot the worker publishes whole, never its live assembly (issue 11 item 2).
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    seen, errors, stop = [], [], threading.Event()

    def report() -> None:
        while not stop.is_set():
            try:
                status, buffers = runtime.status(), runtime.buffers()
                runtime.telemetry()
            except Exception as exc:  # noqa: BLE001 - collected and asserted on below
                errors.append(exc)
                return
            seen.append((status["model_pending"], buffers))
            time.sleep(0.0005)  # often, but leaving the worker the GIL most of the time

    reader = threading.Thread(target=report)
    reader.start()
    try:
        for version in (1, 2, 3):
            data = make_onnx(70 + version, hidden=64)
            msgs = messages(topics, version, *package(fleet, version, data, private))
            feed(runtime, msgs[1:] + msgs[:1])  # orphans first, then the manifest claims them
            wait_for(lambda v=version: runtime.version == v, what=f"v{version}")
    finally:
        stop.set()
        reader.join(10)
        runtime.close()

    assert errors == []
    assert seen, "the reader never ran"
    for pending, buffers in seen:
        assert pending is None or 0 <= pending["chunks"] <= pending["of"]
        assert buffers["model_orphan_bytes"] >= 0 and buffers["model_orphan_chunks"] >= 0
        assert buffers["model_inbox_bytes"] >= 0
    assert runtime.telemetry()["swaps"] == 3 and runtime.status()["model_pending"] is None


def _logits_onnx(seed: int) -> bytes:
    """make_onnx without its Softmax: the model outputs raw logits, as lepton train's models do."""
    import onnx

    model = onnx.load_from_string(make_onnx(seed))
    graph = model.graph
    softmax = next(n for n in graph.node if n.op_type == "Softmax")
    graph.node.remove(softmax)
    graph.output[0].name = "logits"
    return model.SerializeToString()


@pytest.mark.parametrize("temperature", [None, 0.5, 3.0])
def test_confidence_is_the_softmax_of_logits_over_the_manifests_temperature(tmp_path, keys, fleet, temperature):
    import onnxruntime as ort

    private, public, _, _ = keys
    data = _logits_onnx(4)
    calibration = None if temperature is None else {"method": "temperature", "temperature": temperature}
    manifest, chunks = build_package(
        fleet=fleet, name=MODEL, version=1, data=data, input_spec=INPUT_SPEC, labels=LABELS,
        pipeline={"hash": PIPE, "spec": None}, private_key=private, calibration=calibration)
    logits = ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, {"x": PROBE[None, :]})[0][0]
    z = logits.astype(np.float64) / (temperature or 1.0)
    expected = float(np.exp(z - z.max()).max() / np.exp(z - z.max()).sum())
    runtime = make_runtime(fleet, tmp_path, public)
    try:
        feed(runtime, messages(Topics(fleet=fleet), 1, manifest, chunks))
        wait_for(lambda: runtime.version == 1, what="v1")
        pred = runtime.predict(PROBE)
    finally:
        runtime.close()

    assert pred.index == int(np.argmax(logits))  # the temperature never changes the answer
    assert pred.confidence == pytest.approx(expected, rel=1e-6)
