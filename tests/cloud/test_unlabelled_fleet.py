"""Learning from an unlabelled fleet (issue 12, item 10), end to end on Mosquitto.

People label a small seed set; the first edge model (tiny) and the cloud model learn from it alone.
Devices then stream *unlabelled* digits with escalation on; `lepton serve --data` answers the hard
ones and records its answers as teacher labels; a person labels a few more. The next edge model trains
on human and teacher labels only (no device sends a label), passes the gate on a trusted validation
set devices cannot write, and beats the first edge model on held-out digits.
"""

from __future__ import annotations

import numpy as np
import pytest

from lepton.cloud import IngestWorker, Registry, TrainConfig, WorkerConfig, train
from lepton.cloud._export import ExportConfig, onnx_session
from lepton.cloud._labels import LabelRow, LabelStore
from lepton.cloud._serve import ServeWorker
from lepton.cloud._serve_config import ServeConfig
from lepton.device import DeviceAgent
from lepton.protocol import load_private_key

from .conftest import DIGITS_HASH, write_dataset


class Unlabelled:
    """A source of digits frames without their labels (what a real camera fleet sends)."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    def __iter__(self):
        return ((f, None) for f in self.frames)


def accuracy(version, x: np.ndarray, y: np.ndarray) -> float:
    sess = onnx_session(version.data())
    pred = sess.run(None, {sess.get_inputs()[0].name: x})[0].argmax(1)
    labels = np.array([int(v) for v in version.manifest["labels"]])
    return float(np.mean(labels[pred] == y))


@pytest.mark.slow
@pytest.mark.mosquitto
def test_the_next_edge_model_learns_from_teacher_and_human_labels_only(
        mosquitto_broker, fleet, keypair, digits_arrays, tmp_path):
    from lepton.device._sources import DigitsSource

    broker = mosquitto_broker
    x, y = digits_arrays
    frames = DigitsSource().images  # the same digits as uint8 frames, in the same order as x
    order = np.random.default_rng(7).permutation(len(x))
    seed, val, stream, test = order[:180], order[180:480], order[480:1480], order[1480:]
    root = tmp_path / "data"
    # The seed: samples people labelled (label store, source "human"), and a trusted validation file.
    write_dataset(root, fleet, x[seed], [None] * len(seed), devices=1, name="seed")
    LabelStore(root, fleet).append([LabelRow("dev-0", i, str(y[j]), "human") for i, j in enumerate(seed)])
    val_file = write_dataset(tmp_path / "val", fleet, x[val], list(y[val]), devices=1,
                             seq_start=100_000) / fleet / "data"  # (device, seq) of its own
    common = dict(data=root, fleet=fleet, val_data=val_file, epochs=12, max_device_share=1.0)
    fast = ExportConfig(quantize=False, latency_runs=5)

    edge1 = train(TrainConfig(model="digits", target="tiny", label_sources=("human",), export=fast,
                              **common)).version
    cloud = train(TrainConfig(model="digits-cloud", target="cloud", label_sources=("human",), export=fast,
                              **common)).version
    reg = Registry(root)
    for v in (edge1, cloud):  # signed, retained, and recorded as deployed (the gate compares with it)
        reg.publish(v.name, v.version, url=broker.url("trainer", "trainer", fleet=fleet), fleet=fleet,
                    private_key=load_private_key(keypair[0]))

    with ServeWorker(ServeConfig(broker=broker.url("worker", "serve1", fleet=fleet), fleet=fleet,
                                 model="digits-cloud", name="serve1", public_key=keypair[1], data=root,
                                 labels_flush_s=0.2)) as serve, \
            IngestWorker(WorkerConfig(broker=broker.url("worker", "w1", fleet=fleet), fleet=fleet, data=root,
                                      name="w1", batch_ms=10)):
        assert serve.wait_model(cloud.version, timeout=30)
        agent = DeviceAgent(broker=broker.url("device", "cam-1", fleet=fleet), fleet=fleet, device_id="cam-1",
                            source=Unlabelled(frames[stream]), pipeline="digits", spool_dir=tmp_path / "spool",
                            fsync=False, model="digits", public_key=keypair[1], escalate_rate=0.5,
                            upload="escalated+sample:0.1", answer_timeout_ms=2000, drain_timeout=60)
        agent.start()
        import time

        deadline = time.monotonic() + 30
        while agent.runtime.version is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert agent.runtime.version == edge1.version
        summary = agent.run(handle_signals=False)
    j = summary.collaboration
    assert summary.ok and j["answered_by_cloud"] >= 0.9 * j["escalated"] >= 400, j
    assert agent.pipeline.hash == DIGITS_HASH

    # A person labels 60 of the uploaded samples (stream order: seq i is stream[i]).
    stored = {r.seq for r in LabelStore(root, fleet).rows() if r.source == "teacher"}
    csv_file = tmp_path / "more.csv"
    chosen = sorted(stored)[:60]
    csv_file.write_text("device,seq,label\n" + "".join(f"cam-1,{s},{y[stream[s]]}\n" for s in chosen))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "lepton", "dataset", "label", str(root), "--fleet", fleet,
                           "--csv", str(csv_file)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr

    result = train(TrainConfig(model="digits", target="tiny", label_sources=("human", "teacher"),
                               min_teacher_confidence=0.0, export=fast, **common))
    r = result.report
    assert r["labels"]["rows"]["device"] == 0 and r["labels"]["rows"]["teacher"] >= 300, r["labels"]
    assert r["gate"]["passed"] and r["gate"]["deployed_version"] == edge1.version, r["gate"]
    assert r["validation"]["trusted"] is True and r["validation"]["source"] == "val-data"
    before, after = accuracy(edge1, x[test], y[test]), accuracy(result.version, x[test], y[test])
    assert after > before, (before, after)
