"""End to end: a real `lepton device --model ... --public-key ...` process hot-swaps while it publishes.

The device streams the UCI digits through the `digits` preset; the test plays the cloud: it trains a
logistic regression on the same features (scikit-learn), exports it as ONNX, signs and publishes it as
retained chunks + manifest, then publishes models that must be refused. Everything is observed the way
an operator would: the device's retained status and telemetry, its predictions topic, `lepton status`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest

from lepton.protocol import BrokerURL, Topics, build_package, connect, decode_json, new_client
from tests.device.test_runtime import Publisher, make_keys, wait_for

pytestmark = pytest.mark.slow

MODEL = "digits"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_keys(tmp_path_factory.mktemp("keys"))


def digits_features():
    from lepton.device import Pipeline, open_source

    pipeline = Pipeline.from_preset("digits")
    xs, ys = [], []
    for frame, label in open_source("digits", once=True):
        xs.append(pipeline(frame).reshape(-1))
        ys.append(int(label))
    return pipeline, np.stack(xs), np.array(ys)


def linear_onnx(w: np.ndarray, b: np.ndarray) -> bytes:
    """(N, 1, 8, 8) float32 -> flatten -> x @ w + b -> softmax: what the device's digits preset feeds."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "w"], ["z"]),
         helper.make_node("Add", ["z", "b"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["p"], axis=-1)],
        "digits-linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 1, 8, 8])],
        [helper.make_tensor_value_info("p", TensorProto.FLOAT, ["n", 10])],
        initializer=[numpy_helper.from_array(w.astype(np.float32), "w"),
                     numpy_helper.from_array(b.astype(np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.checker.check_model(model)
    return model.SerializeToString()


class Watcher:
    """A viewer: the device's latest retained status, telemetry and predictions."""

    def __init__(self, url: str, fleet: str, device: str) -> None:
        self.topics = Topics(fleet=fleet)
        self.status: dict = {}
        self.telemetry: dict = {}
        self.predictions: list[dict] = []
        self.lock = threading.Lock()
        broker = BrokerURL.parse(url)
        self.client = new_client(broker, client_id=f"{broker.username}/watch-{fleet}")
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [(self.topics.status(device), 1), (self.topics.telemetry(device), 0),
             (self.topics.predictions(device), 0)])
        self.client.on_message = self._on_message
        connect(self.client, broker)

    def _on_message(self, client, userdata, message) -> None:
        if not message.payload:
            return
        body = decode_json(message.payload)
        channel = self.topics.parse(message.topic).channel
        with self.lock:
            if channel == "status":
                self.status = body
            elif channel == "telemetry":
                self.telemetry = body
            else:
                self.predictions.append(body)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_device_process_hot_swaps_and_reports_rejections(mosquitto_broker, keys, fleet, tmp_path):
    private, public, other, pub_path = keys
    pipeline, x, y = digits_features()
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=500).fit(x, y)
    trained = linear_onnx(clf.coef_.T, clf.intercept_)
    rng = np.random.default_rng(0)
    untrained = linear_onnx(rng.normal(0, 0.01, (64, 10)), np.zeros(10))
    spec = {"name": "x", "shape": [-1, 1, 8, 8], "dtype": "float32"}
    labels = [str(i) for i in range(10)]

    def pkg(version, data, key, pipe=pipeline.hash, parent=None):
        return build_package(fleet=fleet, name=MODEL, version=version, data=data, input_spec=spec, labels=labels,
                             pipeline={"hash": pipe, "spec": pipeline.spec}, parent=parent, private_key=key,
                             chunk_size=1024)

    pub = Publisher(mosquitto_broker.url("worker", "cloud", fleet=fleet), fleet)
    pub.publish(1, *pkg(1, untrained, private))  # retained before the device exists
    watcher = Watcher(mosquitto_broker.url("viewer", "viewer", fleet=fleet), fleet, "cam-1")
    spool = tmp_path / "spool"
    cmd = [sys.executable, "-m", "lepton", "device", "--broker",
           mosquitto_broker.url("device", "cam-1", fleet=fleet), "--fleet", fleet, "--id", "cam-1",
           "--source", "digits", "--rate", "100", "--spool", str(spool), "--telemetry-interval", "0.3",
           "--model", MODEL, "--public-key", str(pub_path), "--predictions", "--quiet"]
    device = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: watcher.status.get("model_version") == 1, 60, "the device serving v1 from retained")
        assert watcher.status["model"] == MODEL and watcher.status["model_error"] is None

        pub.publish(2, *pkg(2, trained, private, parent=1))
        wait_for(lambda: watcher.status.get("model_version") == 2, 60, "the hot-swap to v2")
        wait_for(lambda: (watcher.status.get("accuracy", {}).get("2") or {}).get("samples", 0) >= 200, 60,
                 "200 scored predictions on v2")
        acc = watcher.status["accuracy"]
        assert acc["2"]["accuracy"] > 0.9 > (acc.get("1") or {"accuracy": 0})["accuracy"]
        with watcher.lock:
            on_v2 = [p for p in watcher.predictions if p["version"] == 2]
        assert on_v2 and {"label", "index", "confidence", "latency_ms", "seq", "truth"} <= set(on_v2[-1])

        pub.publish(3, *pkg(3, trained, other, parent=2))  # signed by a key the device does not trust
        wait_for(lambda: (watcher.status.get("model_error") or {}).get("reason") == "unknown_key", 60,
                 "unknown_key in the retained status")
        pub.publish(4, *pkg(4, trained, private, pipe="0000000000000000", parent=2))
        wait_for(lambda: (watcher.status.get("model_error") or {}).get("reason") == "incompatible_pipeline",
                 60, "incompatible_pipeline in the retained status")
        assert watcher.status["model_version"] == 2  # the old model keeps serving
        seen = watcher.telemetry.get("inferences", 0)
        wait_for(lambda: watcher.telemetry.get("inferences", 0) > seen + 20, 30, "inference continuing")
        assert watcher.telemetry["inference_failures"] == 0 and watcher.telemetry["swaps"] == 2

        viewer = mosquitto_broker.url("viewer", "viewer", fleet=fleet)
        status = subprocess.run([sys.executable, "-m", "lepton", "status", "--broker", viewer,
                                 "--fleet", fleet, "--json"], capture_output=True, text=True, timeout=60)
        assert status.returncode == 0, status.stderr
        row = json.loads(status.stdout)["devices"][0]
        assert row["device"] == "cam-1" and row["online"] is True and row["model_version"] == 2
        assert row["model_error"] == "incompatible_pipeline" and row["accuracy"] > 0.9
        assert row["inference_ms_p50"] is not None
    finally:
        device.send_signal(signal.SIGINT)
        try:
            device.wait(30)
        except subprocess.TimeoutExpired:
            device.kill()
            device.wait()
        watcher.close()
        pub.close()
    assert device.returncode in (0, 4), device.stderr[-2000:]  # 4: samples nobody acknowledged in this test

    # restart with the broker gone: the last good model (v2) serves at once, from the spool's model store
    mosquitto_broker.stop()
    offline = subprocess.run([*cmd[:-1], "--offline-ok", "--limit", "50", "--drain-timeout", "1", "--json",
                              "--quiet"], capture_output=True, text=True, timeout=120)
    summary = json.loads(offline.stdout.strip().splitlines()[-1])
    assert summary["model_version"] == 2, (offline.stdout, offline.stderr[-2000:])
