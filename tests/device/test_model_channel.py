"""The model channel against someone who may write ``models/`` (issue 10 item 4).

Forged and replayed manifests decide nothing, orphan chunks are bounded, ONNX external data is refused
before ONNX Runtime sees it, and a device back from a long absence downloads only the current version.
"""

from __future__ import annotations

import json
import time

import pytest

from lepton.cloud import fetch_model, publish_package
from lepton.protocol import BrokerURL, Topics, build_package, connect, new_client
from tests.device.test_runtime import (
    INPUT_SPEC,
    LABELS,
    MODEL,
    PIPE,
    PROBE,
    DeviceLink,
    feed,
    keys,
    make_onnx,
    make_runtime,
    messages,
    package,
    reference,
    wait_for,
)

__all__ = ["keys"]  # the module-scoped key fixture, shared with test_runtime.py


def forged_manifests(fleet: str, private, other) -> list[tuple[str, bytes]]:
    """Manifests claiming version 10**12: unsigned, signed by another key, and tampered after signing."""
    big = 10**12
    unsigned, _ = package(fleet, big, b"x" * 10, None)
    foreign, _ = package(fleet, big, b"x" * 10, other)
    genuine_small, _ = package(fleet, 2, b"y" * 10, private)
    outer = json.loads(genuine_small)
    body = json.loads(outer["manifest"])
    body["version"] = big
    outer["manifest"] = json.dumps(body, sort_keys=True, separators=(",", ":"))
    tampered = json.dumps(outer).encode()
    return [("unsigned", unsigned), ("unknown_key", foreign), ("bad_signature", tampered)]


def _raw_client(url: str):
    burl = BrokerURL.parse(url)
    client = new_client(burl, client_id=f"{burl.username}/forger")
    connect(client, burl)
    return client


# ------------------------------------------------------------------------------------------------
# (a) a forged manifest decides nothing
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("retain", [True, False])
def test_a_forged_manifest_neither_supersedes_nor_pins_a_version(tmp_path, keys, fleet, retain):
    private, public, other, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    v2, v3 = make_onnx(32, hidden=16), make_onnx(33)
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(31), private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        m2 = messages(topics, 2, *package(fleet, 2, v2, private))
        feed(runtime, m2[:3])  # v2's manifest and two chunks: pending
        wait_for(lambda: (runtime.status()["model_pending"] or {}).get("chunks") == 2, what="v2 pending")
        seen = set()
        for reason, payload in forged_manifests(fleet, private, other):
            runtime.handle_message(topics.model(MODEL), payload, retain)
            wait_for(lambda r=reason: (runtime.status()["model_error"] or {}).get("reason") == r,
                     what=f"{reason} reported")
            seen.add(runtime.status()["model_error"]["reason"])
            assert runtime.status()["model_pending"] == {"version": 2, "chunks": 2, "of": len(m2) - 1}
        feed(runtime, m2[3:])  # the rest of the genuine v2 still completes it
        wait_for(lambda: runtime.version == 2, what="the genuine v2 after the forgeries")
        m3 = messages(topics, 3, *package(fleet, 3, v3, private))
        feed(runtime, m3[1:] + m3[:1])  # v3 chunks first (orphans), then its manifest
        wait_for(lambda: runtime.version == 3, what="the genuine v3, chunks before manifest")

        assert seen == {"unsigned", "unknown_key", "bad_signature"}
        assert runtime.predict(PROBE).index == reference(v3)
        assert runtime.telemetry()["swaps"] == 3
    finally:
        runtime.close()


def test_a_forged_retained_manifest_blocks_neither_publishing_nor_devices(broker, keys, fleet, tmp_path):
    private, public, other, pub_path = keys
    url = broker.url("worker", "cloud", fleet=fleet)
    topics = Topics(fleet=fleet)
    publish_package(url, fleet, *package(fleet, 1, make_onnx(41), private, chunk_size=4096), public_key=public)
    runtime = make_runtime(fleet, tmp_path, public)
    link = DeviceLink(runtime, broker.url("device", "dev-a", fleet=fleet), "dev-a")
    forger = _raw_client(url)
    try:
        wait_for(lambda: runtime.version == 1, what="v1")
        for _, payload in forged_manifests(fleet, private, other):
            forger.publish(topics.model(MODEL), payload, qos=1, retain=True).wait_for_publish(10)
            forger.publish(topics.model(MODEL), payload, qos=0, retain=False).wait_for_publish(10)
        wait_for(lambda: runtime.status()["model_error"], what="the forgeries reported")

        v2 = make_onnx(42)
        result = publish_package(url, fleet, *package(fleet, 2, v2, private, chunk_size=4096),
                                 public_key=public)  # today: "the broker already serves v1000000000000"
        wait_for(lambda: runtime.version == 2, what="the device on the genuine v2")
        fetched = fetch_model(url, fleet, MODEL, str(pub_path), timeout=15)
    finally:
        forger.disconnect()
        forger.loop_stop()
        link.close()
        runtime.close()

    assert result.version == 2 and result.verified
    assert 1000000000000 not in result.cleared  # the forged version chose nothing to clear
    assert fetched.manifest.version == 2 and fetched.data == v2


# ------------------------------------------------------------------------------------------------
# (b) replay across fleets and models
# ------------------------------------------------------------------------------------------------
def test_a_package_signed_for_another_fleet_or_model_is_refused(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(51), private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        foreign_fleet = messages(topics, 5, *package("otherfleet", 5, make_onnx(52), private))
        feed(runtime, foreign_fleet)
        wait_for(lambda: (runtime.status()["model_error"] or {}).get("reason") == "wrong_fleet", what="wrong_fleet")
        other_model, chunks = build_package(fleet=fleet, name="faces", version=6, data=make_onnx(53),
                                            input_spec=INPUT_SPEC, labels=LABELS,
                                            pipeline={"hash": PIPE, "spec": {}}, private_key=private,
                                            chunk_size=1024)
        feed(runtime, messages(topics, 6, other_model, chunks))
        wait_for(lambda: (runtime.status()["model_error"] or {}).get("reason") == "wrong_model", what="wrong_model")
        assert runtime.version == 1
        assert runtime.buffers()["model_pending_bytes"] == 0  # nothing of the replays is assembled
        feed(runtime, messages(topics, 2, *package(fleet, 2, make_onnx(54), private)))
        wait_for(lambda: runtime.version == 2, what="the genuine v2")
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------
# (c) orphan chunks
# ------------------------------------------------------------------------------------------------
def test_thousands_of_orphan_chunks_stay_bounded_and_a_genuine_swap_still_happens(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    caps = {"max_orphan_bytes": 256 * 1024, "max_orphan_chunks": 512, "max_orphan_versions": 2}
    retained: list[tuple[str, bytes]] = []  # what a broker would resend on a re-subscription
    runtime = make_runtime(fleet, tmp_path, public, refetch_after=0.5, **caps)
    runtime.on_resubscribe = lambda: [runtime.handle_message(t, p, True) for t, p in list(retained)]
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(61), private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        peak = {"bytes": 0, "chunks": 0, "versions": 0}
        for i in range(8000):  # one-byte chunks, half on one version, half each on a new version
            version = 10**12 if i % 2 else 10**12 + i
            runtime.handle_message(topics.model_chunk(MODEL, version, i), b"x", True)
        for i in range(200):  # and large ones: 200 x 64 KiB
            runtime.handle_message(topics.model_chunk(MODEL, 10**12, 100_000 + i), b"y" * 65536, True)
        while not runtime._inbox.empty():
            b = runtime.buffers()
            peak = {"bytes": max(peak["bytes"], b["model_orphan_bytes"]),
                    "chunks": max(peak["chunks"], b["model_orphan_chunks"]),
                    "versions": max(peak["versions"], b["model_orphan_versions"])}
            time.sleep(0.001)
        v2 = make_onnx(62, hidden=16)
        m2 = messages(topics, 2, *package(fleet, 2, v2, private))
        retained[:] = m2
        feed(runtime, m2[1:] + m2[:1])  # its chunks are orphans too until the manifest comes
        wait_for(lambda: runtime.version == 2, timeout=60, what="the genuine v2 amid the flood")
        after = runtime.buffers()
    finally:
        runtime.close()

    assert peak["bytes"] <= caps["max_orphan_bytes"] and peak["chunks"] <= caps["max_orphan_chunks"]
    assert peak["versions"] <= caps["max_orphan_versions"]
    assert after["model_orphans_dropped"] >= 8000 + 200 - caps["max_orphan_chunks"]
    assert after["model_pending_bytes"] == 0 and after["model_orphan_bytes"] <= caps["max_orphan_bytes"]


def test_a_device_with_no_room_for_orphans_still_gets_the_model_from_retained(broker, keys, fleet, tmp_path):
    """A low-RAM device keeps only chunks of a verified manifest; the retained ones it dropped come again."""
    private, public, _, _ = keys
    url = broker.url("worker", "cloud", fleet=fleet)
    data = make_onnx(71, hidden=96)
    payload, chunks = package(fleet, 1, data, private, chunk_size=1024)
    publish_package(url, fleet, payload, chunks, public_key=public)
    runtime = make_runtime(fleet, tmp_path, public, max_orphan_bytes=0, refetch_after=1.0)
    link = DeviceLink(runtime, broker.url("device", "dev-low", fleet=fleet), "dev-low")
    try:
        wait_for(lambda: runtime.version == 1, timeout=60, what="v1 on a device without orphan room")
        held = runtime.buffers()
    finally:
        link.close()
        runtime.close()

    assert runtime.predict(PROBE).index == reference(data)
    assert held["model_orphan_bytes"] == 0
    # whether the broker sent the manifest first or not, nothing unverified was held
    assert held["model_orphans_dropped"] == 0 or held["model_refetches"] >= 1


# ------------------------------------------------------------------------------------------------
# (d) ONNX external data
# ------------------------------------------------------------------------------------------------
def external_data_model(tmp_path, seed: int) -> bytes:
    """A valid model whose weight ``w`` lives in ``../../w.bin`` next to the store, where ORT would find it."""
    import numpy as np
    import onnx
    from onnx import TensorProto, numpy_helper

    model = onnx.load_from_string(make_onnx(seed))
    w = next(t for t in model.graph.initializer if t.name == "w")
    values = numpy_helper.to_array(w).astype(np.float32)
    (tmp_path / "w.bin").write_bytes(values.tobytes())
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    for key, value in (("location", "../../w.bin"), ("offset", "0"), ("length", str(values.nbytes))):
        entry = w.external_data.add()
        entry.key, entry.value = key, value
    return model.SerializeToString()


def test_a_model_with_external_data_is_refused_before_onnx_runtime_loads_it(tmp_path, keys, fleet):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    store = tmp_path / "a" / "b"
    runtime = make_runtime(fleet, store, public)
    crafted = external_data_model(tmp_path, 81)
    try:
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(80), private)))
        wait_for(lambda: runtime.version == 1, what="v1")
        feed(runtime, messages(topics, 2, *package(fleet, 2, crafted, private)))
        wait_for(lambda: (runtime.status()["model_error"] or {}).get("reason") == "external_data",
                 what="external_data")
        assert runtime.version == 1
        assert not (store / f"{MODEL}.v2.onnx").exists()  # never staged, never handed to ONNX Runtime
    finally:
        runtime.close()


# ------------------------------------------------------------------------------------------------
# (e) a device back from a long absence
# ------------------------------------------------------------------------------------------------
def test_an_offline_persistent_device_downloads_only_the_current_version(broker, keys, fleet, tmp_path):
    private, public, _, _ = keys
    url = broker.url("worker", "cloud", fleet=fleet)
    device_url = broker.url("device", "dev-off", fleet=fleet)
    weights = {v: make_onnx(90 + v, hidden=7000) for v in range(1, 7)}  # ~2 MB each
    publish_package(url, fleet, *package(fleet, 1, weights[1], private, chunk_size=96 * 1024),
                    public_key=public, verify=False)
    runtime = make_runtime(fleet, tmp_path, public)
    link = DeviceLink(runtime, device_url, "dev-off", clean_session=False)  # as the device agent
    try:
        wait_for(lambda: runtime.version == 1, timeout=60, what="v1")
        link.close()  # offline; the broker keeps its session and subscription
        for version in range(2, 7):
            publish_package(url, fleet, *package(fleet, version, weights[version], private,
                                                 chunk_size=96 * 1024), public_key=public, verify=False)
        back = DeviceLink(runtime, device_url, "dev-off", clean_session=False)
        try:
            wait_for(lambda: runtime.version == 6, timeout=90, what="v6 after reconnecting")
            time.sleep(2.0)  # anything queued would arrive by now
            received = back.received_bytes
        finally:
            back.close()
    finally:
        runtime.close()

    one_version = len(weights[6])
    assert 1_900_000 < one_version < 2_300_000
    assert received <= 1.2 * one_version, f"{received} bytes on reconnect for a {one_version}-byte model"
    assert runtime.predict(PROBE).index == reference(weights[6])


def test_the_runtime_queue_is_bounded_while_its_thread_is_busy(tmp_path, keys, fleet):
    private, public, other, _ = keys
    topics = Topics(fleet=fleet)
    runtime = make_runtime(fleet, tmp_path, public, max_inbox_bytes=1024 * 1024)
    try:
        with runtime._stats_lock:  # the worker blocks on it while it reports the forged manifest below
            runtime.handle_message(topics.model(MODEL), forged_manifests(fleet, private, other)[0][1], True)
            wait_for(lambda: runtime._inbox.empty(), what="the worker holding the forged manifest")
            for i in range(100):  # 6.4 MiB of chunks arrive while the worker is stuck
                runtime.handle_message(topics.model_chunk(MODEL, 5, i), b"z" * 65536, True)
            held = runtime.buffers()
        wait_for(lambda: runtime.buffers()["model_inbox_bytes"] == 0, what="the queue drained")
        feed(runtime, messages(topics, 1, *package(fleet, 1, make_onnx(99), private)))
        wait_for(lambda: runtime.version == 1, what="v1 once the worker runs again")
    finally:
        runtime.close()

    assert held["model_inbox_bytes"] <= 1024 * 1024
    assert held["model_inbox_dropped"] >= 100 - 1024 * 1024 // 65536
