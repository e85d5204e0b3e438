"""Delivery through real brokers: retained chunks + manifest, late subscribers, cleanup, size limits."""

from __future__ import annotations

import threading

import numpy as np
import onnxruntime as ort
import pytest

from lepton.cloud import DeliveryError, fetch_model, publish_package
from lepton.errors import ModelRejected
from lepton.protocol import (
    BrokerURL,
    Topics,
    build_package,
    connect,
    generate_keypair,
    load_private_key,
    new_client,
)
from lepton.testing import MosquittoBroker
from tests.conftest import _mosquitto_or_skip



def other_weights(version) -> bytes:
    """A second valid ONNX model: the fp32 export when int8 shipped, else the shipped one re-labelled
    (the export ships fp32 alone when int8 loses too much accuracy, so model.fp32.onnx may not exist)."""
    fp32 = version.path / "model.fp32.onnx"
    if fp32.exists():
        return fp32.read_bytes()
    import onnx

    model = onnx.load_from_string(version.data())
    model.doc_string = "another version"
    return model.SerializeToString()

def _package(version, *, fleet, data, manifest, chunk_size=32 * 1024, key=None, parent=None):
    return build_package(
        fleet=fleet,
        name="digits",
        version=version,
        data=data,
        input_spec=manifest["input"],
        labels=manifest["labels"],
        pipeline=manifest["pipeline"],
        metrics=manifest["metrics"],
        quantization=manifest["quantization"],
        parent=parent,
        chunk_size=chunk_size,
        private_key=key,
    )


def _retained_once(url: str, topic_filter: str, *, until, timeout: float = 10.0) -> dict[str, bytes]:
    """Retained messages of ``topic_filter`` seen by a new subscriber, once ``until(messages)`` holds."""
    got: dict[str, bytes] = {}
    done = threading.Event()
    lock = threading.Lock()
    client = new_client(BrokerURL.parse(url), client_id=f"{BrokerURL.parse(url).username}/probe-retained")

    def on_message(c, userdata, msg):
        with lock:
            if msg.retain and msg.payload:
                got[msg.topic] = bytes(msg.payload)
            if until(got):
                done.set()

    client.on_message = on_message
    connect(client, BrokerURL.parse(url))
    try:
        client.subscribe(topic_filter, qos=1)
        assert done.wait(timeout), f"retained messages seen: {sorted(got)}"
        # the broker sends a subscription's retained messages in one burst; let it finish
        done.wait(0.5)
    finally:
        client.disconnect()
        client.loop_stop()
    with lock:
        return dict(got)


def _retained_settles_to(url: str, topic_filter: str, expected: set[str], *, attempts: int = 20) -> set[str]:
    """Subscribe afresh until a new subscriber sees exactly ``expected`` (amqtt updates its retained store
    after acknowledging a publish, so a subscriber right after publication may still see the old state)."""
    seen: set[str] = set()
    for _ in range(attempts):
        seen = set(_retained_once(url, topic_filter, until=lambda got: expected <= set(got)))
        if seen == expected:
            break
    return seen


def test_late_subscriber_rebuilds_the_exact_signed_model(broker, fleet, trained_digits, keypair):
    _, _, version = trained_digits
    data = version.data()
    payload, chunks = _package(1, fleet=fleet, data=data, manifest=version.manifest, key=load_private_key(keypair[0]))
    assert len(chunks) > 1

    result = publish_package(broker.url("worker", "trainer", fleet=fleet), fleet, payload, chunks)
    package = fetch_model(
        broker.url("device", "dev-late", fleet=fleet), fleet, "digits", keypair[1], timeout=10
    )

    assert result.verified and result.chunks == len(chunks)
    assert package.data == data
    assert package.signed_by is not None
    assert package.manifest.version == 1 and package.manifest.labels == tuple(str(i) for i in range(10))
    x = np.zeros((2, 1, 8, 8), np.float32)
    logits = ort.InferenceSession(package.data, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert logits.shape == (2, 10)


def test_superseded_chunks_are_cleared_and_versions_only_move_forward(broker, fleet, trained_digits):
    _, _, version = trained_digits
    url = broker.url("worker", "trainer", fleet=fleet)
    topics = Topics(fleet=fleet)
    v1_data = version.data()
    v2_data = other_weights(version)
    p1, c1 = _package(1, fleet=fleet, data=v1_data, manifest=version.manifest)
    p2, c2 = _package(2, fleet=fleet, data=v2_data, manifest=version.manifest, parent=1)
    publish_package(url, fleet, p1, c1)

    # v2 does not say what it supersedes: the publisher finds v1 in the broker's retained manifest
    result = publish_package(url, fleet, p2, c2)

    expected = {topics.model("digits")} | {topics.model_chunk("digits", 2, i) for i in range(len(c2))}
    seen = _retained_settles_to(
        broker.url("viewer", "viewer", fleet=fleet), topics.model_filter("digits"), expected
    )
    assert result.cleared == {1: len(c1)}
    assert set(seen) == expected, "v1 chunks must be gone"
    assert fetch_model(url, fleet, "digits", None).data == v2_data
    with pytest.raises(DeliveryError, match="never move back"):
        publish_package(url, fleet, p1, c1)


def test_fetch_rejects_a_foreign_key_and_an_unsigned_model(
    amqtt_broker, fleet, trained_digits, keypair, tmp_path
):
    _, _, version = trained_digits
    url = amqtt_broker.url("worker", "trainer", fleet=fleet)
    _, other_public = generate_keypair(tmp_path, name="other")
    p1, c1 = _package(1, fleet=fleet, data=version.data(), manifest=version.manifest, key=load_private_key(keypair[0]))
    publish_package(url, fleet, p1, c1)

    with pytest.raises(ModelRejected) as foreign:
        fetch_model(url, fleet, "digits", other_public)
    p2, c2 = _package(2, fleet=fleet, data=version.data(), manifest=version.manifest)
    publish_package(url, fleet, p2, c2)
    with pytest.raises(ModelRejected) as unsigned:
        fetch_model(url, fleet, "digits", keypair[1])

    assert foreign.value.reason == "unknown_key"
    assert unsigned.value.reason == "unsigned"
    assert fetch_model(url, fleet, "digits", None).manifest.version == 2  # hashes only: accepted


def test_fetch_of_a_model_never_published_times_out_clearly(amqtt_broker, fleet):
    with pytest.raises(DeliveryError, match="no retained manifest"):
        fetch_model(amqtt_broker.url("worker", "w", fleet=fleet), fleet, "nothing", None, timeout=1)


@pytest.mark.mosquitto
def test_mosquitto_with_a_message_size_limit_smaller_than_the_model(fleet, trained_digits, keypair):
    _mosquitto_or_skip()
    _, _, version = trained_digits
    data = version.data()
    limit = 100_000
    assert len(data) > limit
    with MosquittoBroker(extra=f"message_size_limit {limit}") as broker:
        url = broker.url("worker", "trainer", fleet=fleet)
        key = load_private_key(keypair[0])
        # One message holding the whole model: Mosquitto acknowledges it but drops it, and the publisher
        # notices (the message never comes back on its own subscription).
        whole, one_chunk = _package(1, fleet=fleet, data=data, manifest=version.manifest, chunk_size=len(data), key=key)
        with pytest.raises(DeliveryError, match="message_size_limit"):
            publish_package(url, fleet, whole, one_chunk, timeout=3)

        # The default chunk size (96 KiB) fits under the limit.
        payload, chunks = _package(2, fleet=fleet, data=data, manifest=version.manifest, chunk_size=96 * 1024, key=key)
        result = publish_package(url, fleet, payload, chunks)
        package = fetch_model(broker.url("device", "dev-9", fleet=fleet), fleet, "digits", keypair[1])

    assert len(chunks) >= 2 and all(len(c) <= limit for c in chunks)
    assert result.verified
    assert package.data == data and package.manifest.version == 2


def test_a_device_runtime_hot_swaps_to_the_published_model(
    amqtt_broker, fleet, trained_digits, keypair, tmp_path, digits_arrays
):
    """Cross-check with the edge: lepton.device's ModelRuntime verifies, loads and serves what we publish."""
    from lepton.device import ModelRuntime
    from lepton.protocol import load_public_key
    from tests.cloud.conftest import DIGITS_HASH

    _, _, version = trained_digits
    payload, chunks = _package(1, fleet=fleet, data=version.data(), manifest=version.manifest, key=load_private_key(keypair[0])
    )
    publish_package(amqtt_broker.url("worker", "trainer", fleet=fleet), fleet, payload, chunks)
    swapped = threading.Event()
    runtime = ModelRuntime(
        topics=Topics(fleet=fleet),
        model="digits",
        store_dir=tmp_path / "store",
        public_key=load_public_key(keypair[1]),
        pipeline_hash=DIGITS_HASH,
        input_shape=(1, 8, 8),
        on_change=lambda status: swapped.set(),
    )
    url = BrokerURL.parse(amqtt_broker.url("device", "dev-7", fleet=fleet))
    client = new_client(url, client_id="dev-7")
    client.on_message = lambda c, u, msg: runtime.handle_message(msg.topic, msg.payload, msg.retain)
    connect(client, url)
    try:
        for topic, qos in runtime.subscriptions():
            client.subscribe(topic, qos=qos)
        for _ in range(100):
            if runtime.version == 1:
                break
            swapped.wait(0.2)
            swapped.clear()
        x, y = digits_arrays
        predictions = [runtime.predict(x[i]) for i in range(200)]
    finally:
        client.disconnect()
        client.loop_stop()
        runtime.close()

    assert runtime.version == 1
    assert all(p is not None and p.version == 1 for p in predictions)
    accuracy = np.mean([p.label == str(y[i]) for i, p in enumerate(predictions)])
    assert (
        accuracy >= 0.95
    )  # mostly training samples: this checks labels and input layout, not generalisation
