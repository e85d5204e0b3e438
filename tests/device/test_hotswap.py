"""Hot-swap under continuous inference: 5 versions and a rollback through a real broker, no failures."""

from __future__ import annotations

import threading
import time

import pytest

from lepton.protocol import Topics
from tests.device.test_runtime import (
    PROBE,
    DeviceLink,
    Publisher,
    make_keys,
    make_onnx,
    make_runtime,
    package,
    reference,
    wait_for,
)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


class InferenceLoop(threading.Thread):
    """Calls predict() back to back, as a camera-fed device does, and records what served each call."""

    def __init__(self, runtime) -> None:
        super().__init__(daemon=True)
        self.runtime = runtime
        self.stop = threading.Event()
        self.first_seen: dict[int, float] = {}  # version -> wall time of its first inference
        self.calls = 0
        self.failures = 0  # None after the first model was served
        self.max_gap_ms = 0.0

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            pred = self.runtime.predict(PROBE)
            now = time.time()
            self.calls += 1
            if pred is None:
                if self.first_seen:
                    self.failures += 1
                time.sleep(0.001)
                continue
            if last is not None:
                self.max_gap_ms = max(self.max_gap_ms, (now - last) * 1000)
            last = now
            self.first_seen.setdefault(pred.version, now)


def test_five_versions_and_a_rollback_under_continuous_inference(broker, keys, fleet, tmp_path,
                                                                 record_property):
    private, public, _, _ = keys
    topics = Topics(fleet=fleet)
    pub = Publisher(broker.url("worker", "cloud", fleet=fleet), fleet)
    runtime = make_runtime(fleet, tmp_path / "store", public)
    link = DeviceLink(runtime, broker.url("device", "hs-dev", fleet=fleet), "hs-dev")
    loop = InferenceLoop(runtime)
    loop.start()
    weights = {v: make_onnx(100 + v, hidden=256) for v in range(1, 6)}
    latencies_ms: dict[int, float] = {}
    try:
        for version in range(1, 6):
            manifest, chunks = package(fleet, version, weights[version], private, chunk_size=8192,
                                       parent=version - 1 or None)
            started = pub.publish(version, manifest, chunks)
            wait_for(lambda v=version: v in loop.first_seen, what=f"first inference on v{version}")
            latencies_ms[version] = round((loop.first_seen[version] - started) * 1000, 2)
            if version > 1:  # the cloud clears superseded chunks once the new version is out
                pub.clear(version - 1, len(package(fleet, version - 1, weights[version - 1], private,
                                                   chunk_size=8192)[1]))
        # rollback to v2's weights: published as a new, higher version
        manifest, chunks = package(fleet, 6, weights[2], private, chunk_size=8192, parent=2)
        started = pub.publish(6, manifest, chunks)
        wait_for(lambda: 6 in loop.first_seen, what="first inference on the rollback v6")
        latencies_ms[6] = round((loop.first_seen[6] - started) * 1000, 2)
        time.sleep(0.05)
    finally:
        loop.stop.set()
        loop.join(5)
        link.close()
        pub.close()
        runtime.close()
    record_property("swap_latency_ms", latencies_ms)
    record_property("max_inference_gap_ms", round(loop.max_gap_ms, 2))
    record_property("inferences", loop.calls)

    assert sorted(loop.first_seen) == [1, 2, 3, 4, 5, 6]  # every version reached, in order
    assert [v for v, _ in sorted(loop.first_seen.items(), key=lambda kv: kv[1])] == [1, 2, 3, 4, 5, 6]
    assert loop.failures == 0
    telemetry = runtime.telemetry()
    assert telemetry["inference_failures"] == 0 and telemetry["swaps"] == 6
    assert telemetry["model_rejections"] == 0
    pred = runtime.predict(PROBE)
    assert pred.version == 6 and pred.index == reference(weights[2])  # the rollback serves v2's weights
    history = runtime.swap_history()
    assert [h["version"] for h in history] == [1, 2, 3, 4, 5, 6]
    assert all(h["first_inference_ts"] >= h["swapped_ts"] for h in history)
    assert runtime.status()["model_pending"] is None and runtime.status()["model_error"] is None
    assert topics.model("digits") and set(latencies_ms) == {1, 2, 3, 4, 5, 6}


def test_a_rejected_version_mid_stream_never_interrupts_inference(amqtt_broker, keys, fleet, tmp_path):
    private, public, other, _ = keys
    pub = Publisher(amqtt_broker.url("worker", "cloud", fleet=fleet), fleet)
    runtime = make_runtime(fleet, tmp_path, public)
    link = DeviceLink(runtime, amqtt_broker.url("device", "hs-rej", fleet=fleet), "hs-rej")
    loop = InferenceLoop(runtime)
    loop.start()
    try:
        pub.publish(1, *package(fleet, 1, make_onnx(1, hidden=128), private))
        wait_for(lambda: 1 in loop.first_seen, what="v1")
        pub.publish(2, *package(fleet, 2, b"\x08\x07garbage" * 500, private))  # signed, hashes right, not ONNX
        wait_for(lambda: runtime.status()["model_error"], what="rejection of v2")
        pub.publish(3, *package(fleet, 3, make_onnx(3, hidden=128), other))  # another key
        wait_for(lambda: (runtime.status()["model_error"] or {}).get("version") == 3, what="rejection of v3")
        pub.publish(4, *package(fleet, 4, make_onnx(4, hidden=128), private))
        wait_for(lambda: 4 in loop.first_seen, what="v4")
    finally:
        loop.stop.set()
        loop.join(5)
        link.close()
        pub.close()
        runtime.close()
    assert sorted(loop.first_seen) == [1, 4]
    assert loop.failures == 0 and runtime.telemetry()["inference_failures"] == 0
    assert runtime.telemetry()["model_rejections"] == 2
    assert runtime.status()["model_error"] is None  # cleared by the good v4
