"""lepton serve: the I/O-free cores in microseconds, then the worker against both real brokers.

The broker tests use the session's real digits model (``trained_digits``), signed and published as
retained chunks like every model, and check what a device sees on its answers topic.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pytest

from lepton.cloud._serve import ServeWorker
from lepton.cloud._serve_config import ServeConfig
from lepton.cloud._serve_core import ModelInfo, ServeCore, serve_telemetry
from lepton.errors import ConfigError
from lepton.protocol import (
    InferRequest,
    Topics,
    decode_answer,
    decode_json,
    encode_infer,
    load_private_key,
)
from lepton.testing import PROJECT_ROOT
from tests.broker._mqtt import Inbox
from tests.cloud.conftest import DIGITS_HASH

T = Topics(fleet="demo")
DEVICE_TOPIC = T.infer("cam-1")
INFO = ModelInfo(name="digits", version=3, labels=tuple(str(i) for i in range(10)), sample_shape=(1, 8, 8),
                 dtype=np.dtype(np.float32), pipeline=DIGITS_HASH)


def request(seq: int = 1, *, device: str = "cam-1", x=None, pipeline=DIGITS_HASH, deadline=None) -> bytes:
    x = np.zeros((1, 8, 8), np.float32) if x is None else x
    return encode_infer(InferRequest(device=device, seq=seq, x=x, pipeline=pipeline, deadline=deadline))


def core(**kw) -> ServeCore:
    return ServeCore(worker="w1", model="digits", topics=T, **kw)


# ------------------------------------------------------------------------------------------------
# ServeCore: admission, checks, answers
# ------------------------------------------------------------------------------------------------
def test_a_queued_request_is_answered_with_the_label_of_its_scores_and_the_cloud_side_latency():
    c = core()

    assert c.submit(DEVICE_TOPIC, request(7), now=100.0, model=INFO) is None
    batch, refused = c.take(now=100.010, model=INFO)
    scores = np.full(10, -5.0)
    scores[4] = 3.0
    device, answer = c.answer(batch[0], scores, now=100.025, model=INFO)

    assert refused == [] and device == "cam-1"
    assert (answer.seq, answer.label, answer.index, answer.version, answer.error) == (7, "4", 4, 3, None)
    assert answer.confidence == pytest.approx(np.exp(3) / (np.exp(3) + 9 * np.exp(-5)))
    assert answer.latency_ms == pytest.approx(25.0)
    assert c.status(now=100.5)["latency_ms"]["p50"] == pytest.approx(25.0)


def test_probabilities_that_already_sum_to_one_are_used_as_they_are():
    c = core()
    c.submit(DEVICE_TOPIC, request(1), now=0.0, model=INFO)
    (item,), _ = c.take(now=0.0, model=INFO)

    _, answer = c.answer(item, np.array([0.1, 0.7, 0.2, 0, 0, 0, 0, 0, 0, 0]), now=0.0, model=INFO)

    assert (answer.label, answer.confidence) == ("1", pytest.approx(0.7))


def test_a_bad_request_is_answered_bad_request_with_its_seq_when_readable_else_with_none():
    c = core()

    _, forged = c.submit(DEVICE_TOPIC, request(5, device="cam-2"), now=0.0, model=INFO)
    _, garbage = c.submit(DEVICE_TOPIC, b"\xc1not msgpack", now=0.0, model=INFO)

    assert (forged.seq, forged.error) == (5, "bad_request") and "cam-2" in forged.message
    assert (garbage.seq, garbage.error) == (None, "bad_request") and "payload" in garbage.message
    assert c.depth == 0 and c.status(now=0.0)["errors"] == {"bad_request": 2}


def test_a_full_queue_sheds_with_overloaded_and_so_does_a_full_device_share():
    c = core(max_queue=3, max_device_queue=2)

    results = [c.submit(T.infer("cam-1"), request(i), now=0.0, model=INFO) for i in range(3)]
    other = c.submit(T.infer("cam-2"), request(9, device="cam-2"), now=0.0, model=INFO)
    full = c.submit(T.infer("cam-3"), request(1, device="cam-3"), now=0.0, model=INFO)

    assert results[:2] == [None, None] and results[2][1].error == "overloaded"      # cam-1's share is 2
    assert "cam-1" in results[2][1].message
    assert other is None                                                            # cam-2 still gets in
    assert full[1].error == "overloaded" and "queue holds 3" in full[1].message     # the whole queue
    st = c.status(now=0.0)
    assert (st["shed"], st["queue"], st["queue_max"], st["received"]) == (2, 3, 3, 5)


def test_requests_that_cannot_run_are_refused_with_their_code_when_taken():
    early, c = core(), core()
    early.submit(DEVICE_TOPIC, request(1), now=0.0)
    c.submit(DEVICE_TOPIC, request(2, pipeline="0123456789abcdef"), now=0.0)
    c.submit(DEVICE_TOPIC, request(3, x=np.zeros((8, 8), np.float32)), now=0.0)
    c.submit(DEVICE_TOPIC, request(4, deadline=5.0), now=1.0)
    c.submit(DEVICE_TOPIC, request(5), now=1.0)
    c.submit(DEVICE_TOPIC, request(6), now=1.0)

    _, no_model = early.take(now=2.0, model=None)
    runnable, refused = c.take(now=6.0, model=INFO, max_batch=1)

    assert [(a.seq, a.error) for _, a in no_model] == [(1, "no_model")]
    assert [(a.seq, a.error) for _, a in refused] == \
        [(2, "wrong_pipeline"), (3, "wrong_shape"), (4, "expired")]
    assert [p.request.seq for p in runnable] == [5] and c.depth == 1   # max_batch counts runnable ones
    assert "[8, 8]" in refused[1][1].message and "[1, 8, 8]" in refused[1][1].message


def test_a_request_already_past_its_deadline_is_answered_at_once_and_takes_no_queue_slot():
    c = core(max_queue=1)

    _, answer = c.submit(DEVICE_TOPIC, request(1, deadline=99.0), now=100.0, model=INFO)

    assert answer.error == "expired" and c.depth == 0


def test_the_status_reports_throughput_and_nearest_rank_percentiles():
    c = core()
    for i in range(100):
        c.submit(DEVICE_TOPIC, request(i), now=10.0, model=INFO)
    batch, _ = c.take(now=10.0, model=INFO, max_batch=100)
    for i, item in enumerate(batch):
        c.answer(item, np.arange(10.0), now=10.0 + (i + 1) / 1000, model=INFO)  # 1 ms .. 100 ms

    st = c.status(now=11.0)

    assert (st["latency_ms"]["p50"], st["latency_ms"]["p99"]) == (pytest.approx(50.0), pytest.approx(99.0))
    assert st["answers_per_s"] == pytest.approx(100 / 10)   # over the last 10 s
    assert c.status(now=30.0)["answers_per_s"] == 0


def test_the_telemetry_is_the_status_numbers_flat_with_one_count_per_error_code():
    c = core()
    c.submit(DEVICE_TOPIC, request(1), now=0.0, model=INFO)
    c.submit(DEVICE_TOPIC, b"\xc1", now=0.0, model=INFO)
    (item,), _ = c.take(now=0.0, model=INFO)
    c.answer(item, np.arange(10.0), now=0.004, model=INFO)
    status = {"worker": "w1", "fleet": "demo", "role": "serve", "online": True, "group": None,
              "model": "digits", "model_sha256": "ab", "model_error": None, "model_version": 3,
              "model_pending": {"version": 4, "chunks": 1, "of": 3}, "swaps": 1,
              "teacher_labels": {"written": 5, "dropped": 0, "files": 1}, **c.status(now=0.5)}

    flat = serve_telemetry(status)

    assert (flat["errors"], flat["errors_bad_request"], flat["errors_overloaded"]) == (1, 1, 0)
    assert (flat["latency_ms_p50"], flat["latency_n"]) == (pytest.approx(4.0), 1)
    assert (flat["model_pending_version"], flat["model_pending_of"]) == (4, 3)
    assert flat["teacher_labels_written"] == 5
    assert (flat["model_version"], flat["swaps"], flat["received"]) == (3, 1, 2)
    assert not {"worker", "model", "model_sha256", "model_error", "latency_ms"} & set(flat)


def test_the_teacher_label_writer_writes_every_answer_it_is_given_before_it_closes(tmp_path):
    from lepton.cloud._labels import LabelStore
    from lepton.cloud._serve_labels import TeacherLabelWriter

    c = core()
    for seq in range(3):
        c.submit(DEVICE_TOPIC, request(seq), now=0.0, model=INFO)
    batch, _ = c.take(now=0.0, model=INFO)
    replies = [c.answer(p, np.arange(10.0), now=0.0, model=INFO) for p in batch]
    config = ServeConfig(broker="mqtt://w:pw@127.0.0.1:1883", fleet="demo", model="digits", verify=False,
                         data=tmp_path, labels_flush_s=60.0)
    writer = TeacherLabelWriter(config)

    writer.put(replies[:2])
    writer.put([])
    writer.put(replies[2:])
    writer.close()  # the last batch is written on close, not after labels_flush_s

    rows = sorted(LabelStore(tmp_path, "demo").rows(), key=lambda r: r.seq)
    assert [(r.device, r.seq, r.label, r.source) for r in rows] == \
        [("cam-1", seq, "9", "teacher") for seq in range(3)]
    assert (writer.written, writer.dropped, writer.files) == (3, 0, 1)


# ------------------------------------------------------------------------------------------------
# ServeConfig (the model's assembly rules are the device's: tests/protocol/test_assembler.py)
# ------------------------------------------------------------------------------------------------
def test_serve_config_refuses_what_would_fail_later():
    url = "mqtt://w:pw@127.0.0.1:1883"
    with pytest.raises(ConfigError, match="--public-key"):
        ServeConfig(broker=url, fleet="f", model="m")
    with pytest.raises(ConfigError, match="--max-queue"):
        ServeConfig(broker=url, fleet="f", model="m", verify=False, max_queue=0)


# ------------------------------------------------------------------------------------------------
# against real brokers
# ------------------------------------------------------------------------------------------------
def publish_model(broker, fleet, trained, keypair, name="digits"):
    from lepton.cloud import Registry, publish_package

    root, _, version = trained
    payload, chunks = Registry(root).build("digits", version.version, fleet=fleet,
                                           private_key=load_private_key(keypair[0]))
    publish_package(broker.url("trainer", "trainer", fleet=fleet), fleet, payload, chunks,
                    public_key=keypair[1])
    return version


def serve(broker, fleet, keypair, *, name="serve1", **kw) -> ServeWorker:
    return ServeWorker(ServeConfig(broker=broker.url("worker", name, fleet=fleet), fleet=fleet,
                                   model="digits", name=name, public_key=keypair[1], status_interval=0.5,
                                   **kw))


def answers_for(inbox: Inbox, seqs, timeout: float = 20.0) -> dict:
    """Collect answers until every seq in ``seqs`` has one; fail on a second answer to a seq."""
    want, got = set(seqs), {}
    deadline = time.monotonic() + timeout
    while want - set(got):
        left = deadline - time.monotonic()
        assert left > 0, f"no answer for {len(want - set(got))} of {len(want)} requests"
        answer = decode_answer(inbox.get(left).payload)
        assert answer.seq not in got, f"two answers for seq {answer.seq}"
        got[answer.seq] = answer
    return got


def local_predictions(version, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(version.data(), providers=["CPUExecutionProvider"])
    out = session.run(None, {session.get_inputs()[0].name: x.astype(np.float32)})[0]
    return np.argmax(out, axis=1)


def test_serve_answers_real_digits_with_the_hot_swapped_model_and_errors_otherwise(
        broker, fleet, trained_digits, keypair, digits_arrays):
    x, y = digits_arrays
    n = 300
    topics = Topics(fleet=fleet)
    with serve(broker, fleet, keypair) as worker, Inbox(broker.url("device", "cam-a", fleet=fleet)) as cam:
        assert cam.subscribe(topics.answers("cam-a"), qos=0)
        cam.publish(topics.infer("cam-a"), request(0, device="cam-a"), qos=0)
        before = answers_for(cam, [0])[0]
        version = publish_model(broker, fleet, trained_digits, keypair)
        assert worker.wait_model(version.version, timeout=30)

        for i in range(n):
            cam.publish(topics.infer("cam-a"), request(i + 1, device="cam-a", x=x[i]), qos=0)
        got = answers_for(cam, range(1, n + 1))
        flat = np.zeros((64,), np.float32)
        cam.publish(topics.infer("cam-a"), request(n + 1, device="cam-a", x=flat), qos=0)
        cam.publish(topics.infer("cam-a"), request(n + 2, device="cam-a", pipeline="ffffffffffffffff"), qos=0)
        cam.publish(topics.infer("cam-a"), request(n + 3, device="cam-a", deadline=time.time() - 1), qos=0)
        errors = answers_for(cam, [n + 1, n + 2, n + 3])
        status = worker.status()

    labels = np.array([int(got[i + 1].label) for i in range(n)])
    local = local_predictions(version, x[:n])
    accuracy = float(np.mean(labels == y[:n]))
    assert (before.error, before.version) == ("no_model", None)
    assert all(a.ok and a.version == version.version and a.worker == "serve1" for a in got.values())
    assert np.array_equal(labels, local)                          # the cloud ran exactly the published model
    assert accuracy >= 0.9, accuracy
    assert [errors[n + k].error for k in (1, 2, 3)] == ["wrong_shape", "wrong_pipeline", "expired"]
    assert status["model_version"] == version.version and status["answered"] == n
    latency = status["latency_ms"]
    assert latency["p50"] is not None and latency["p99"] >= latency["p50"] and latency["n"] == n
    assert status["errors"] == {"expired": 1, "no_model": 1, "wrong_pipeline": 1, "wrong_shape": 1}


def test_a_flood_beyond_a_tiny_queue_is_shed_with_overloaded_answers_never_silence(
        broker, fleet, trained_digits, keypair, digits_arrays):
    x, _ = digits_arrays
    topics = Topics(fleet=fleet)
    n = 400
    version = publish_model(broker, fleet, trained_digits, keypair)
    with serve(broker, fleet, keypair, max_queue=2, max_batch=1) as worker, \
            Inbox(broker.url("device", "cam-a", fleet=fleet)) as cam:
        assert worker.wait_model(version.version, timeout=30)
        assert cam.subscribe(topics.answers("cam-a"), qos=0)
        payloads = [request(i, device="cam-a", x=x[i % len(x)]) for i in range(n)]
        for payload in payloads:
            cam.client.publish(topics.infer("cam-a"), payload, qos=0)
        got = answers_for(cam, range(n), timeout=60)
        time.sleep(0.6)  # one status period
        retained = _retained_status(broker, fleet, "serve1")

    shed = [a for a in got.values() if a.error == "overloaded"]
    served = [a for a in got.values() if a.ok]
    assert shed and served and len(shed) + len(served) == n
    assert retained["shed"] == len(shed) and retained["answered"] == len(served)
    assert retained["queue_max"] == 2 and retained["online"] is True


def _retained_status(broker, fleet, name) -> dict:
    with Inbox(broker.url("viewer", "viewer", fleet=fleet)) as viewer:
        assert viewer.subscribe(Topics(fleet=fleet).worker_status(name))
        return decode_json(viewer.get().payload)


def test_a_device_reads_only_its_own_answers_and_cannot_ask_in_another_devices_name(
        broker, fleet, keypair):
    topics = Topics(fleet=fleet)
    with serve(broker, fleet, keypair), \
            Inbox(broker.url("device", "cam-a", fleet=fleet)) as cam_a, \
            Inbox(broker.url("device", "cam-b", fleet=fleet)) as cam_b:
        assert cam_a.subscribe(topics.answers("cam-a"), qos=0)
        for spy in (topics.answers("cam-a"), topics.all_devices("answers"), topics.infer("cam-a")):
            cam_b.subscribe(spy, qos=0)   # Mosquitto grants the SUBSCRIBE; the ACL withholds delivery
        cam_b.publish(topics.infer("cam-a"), request(666, device="cam-a"), qos=1)   # forged
        cam_a.publish(topics.infer("cam-a"), request(1, device="cam-a"), qos=1)     # the positive control
        first = decode_answer(cam_a.get().payload)
        time.sleep(0.3)

        leaked = cam_b.drain()
        rest = [decode_answer(m.payload).seq for m in cam_a.drain()]

    assert (first.seq, first.error) == (1, "no_model")   # answered, with the error: no model published
    assert leaked == [] and 666 not in rest


def test_group_splits_requests_between_two_serve_workers_on_mosquitto(
        mosquitto_broker, fleet, trained_digits, keypair, digits_arrays):
    x, _ = digits_arrays
    topics = Topics(fleet=fleet)
    n = 200
    version = publish_model(mosquitto_broker, fleet, trained_digits, keypair)
    with serve(mosquitto_broker, fleet, keypair, name="serve1", group="g") as w1, \
            serve(mosquitto_broker, fleet, keypair, name="serve2", group="g") as w2, \
            Inbox(mosquitto_broker.url("device", "cam-a", fleet=fleet)) as cam:
        assert w1.wait_model(version.version, timeout=30) and w2.wait_model(version.version, timeout=30)
        assert cam.subscribe(topics.answers("cam-a"), qos=0)
        for i in range(n):
            cam.client.publish(topics.infer("cam-a"), request(i, device="cam-a", x=x[i]), qos=0)
        got = answers_for(cam, range(n), timeout=30)
        time.sleep(0.3)
        extra = cam.drain()

    by_worker = {w: sum(a.worker == w for a in got.values()) for w in ("serve1", "serve2")}
    assert extra == []                                           # each request answered once, by one worker
    assert by_worker["serve1"] > 0 and by_worker["serve2"] > 0 and sum(by_worker.values()) == n
    assert all(a.ok for a in got.values())


def test_group_is_refused_on_amqtt_which_has_no_shared_subscriptions(amqtt_broker, fleet, keypair):
    worker = serve(amqtt_broker, fleet, keypair, group="g")

    with pytest.raises(ConfigError, match="shared subscriptions"):
        worker.start()


def test_the_cli_answers_a_request_and_stops_cleanly_on_sigterm(amqtt_broker, fleet, tmp_path):
    topics = Topics(fleet=fleet)
    url = amqtt_broker.url("worker", "serve-cli", fleet=fleet)
    user, password = url.split("//")[1].split("@")[0].split(":")
    pw = tmp_path / "pw"
    pw.write_text(password + "\n")
    pw.chmod(0o600)
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    env.pop("LEPTON_PASSWORD", None)
    cmd = [sys.executable, "-m", "lepton", "serve", "--broker", f"mqtt://{user}@127.0.0.1:{amqtt_broker.port}",
           "--password-file", str(pw), "--fleet", fleet, "--model", "digits", "--name", "cli",
           "--no-verify", "--quiet"]
    with Inbox(amqtt_broker.url("device", "cam-a", fleet=fleet)) as cam:
        assert cam.subscribe(topics.answers("cam-a"), qos=0)
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        try:
            answer = None
            deadline = time.monotonic() + 30
            while answer is None and time.monotonic() < deadline and proc.poll() is None:
                cam.publish(topics.infer("cam-a"), request(uuid.uuid4().int % 1000, device="cam-a"), qos=0)
                try:
                    answer = decode_answer(cam.get(0.5).payload)
                except AssertionError:
                    continue
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)

    assert answer is not None, err
    assert (answer.error, answer.worker) == ("no_model", "cli")
    assert proc.returncode == 0, err


def test_the_cli_refuses_bad_ids_and_missing_keys_with_exit_2_and_one_line():
    env = dict(os.environ, PYTHONPATH=str(PROJECT_ROOT))
    base = [sys.executable, "-m", "lepton", "serve", "--broker", "mqtt://w@127.0.0.1:1", "--model", "digits"]

    bad_id = subprocess.run(base + ["--fleet", "a/b", "--no-verify"], env=env, capture_output=True, text=True)
    no_key = subprocess.run(base + ["--fleet", "f"], env=env, capture_output=True, text=True)
    helped = subprocess.run(base[:4] + ["--help"], env=env, capture_output=True, text=True)

    for result, hint in ((bad_id, "fleet id"), (no_key, "--public-key")):
        assert result.returncode == 2 and hint in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert helped.returncode == 0 and "examples:" in helped.stdout
    assert "lepton serve --broker" in helped.stdout


def test_answers_are_recorded_as_calibrated_teacher_labels_with_data(
        amqtt_broker, fleet, trained_digits, keypair, digits_arrays, tmp_path):
    from lepton.cloud._calibration import softmax
    from lepton.cloud._labels import LabelStore

    x, _ = digits_arrays
    n = 40
    topics = Topics(fleet=fleet)
    version = publish_model(amqtt_broker, fleet, trained_digits, keypair)
    with serve(amqtt_broker, fleet, keypair, data=tmp_path, labels_flush_s=0.2) as worker, \
            Inbox(amqtt_broker.url("device", "cam-a", fleet=fleet)) as cam:
        assert worker.wait_model(version.version, timeout=30)
        assert cam.subscribe(topics.answers("cam-a"), qos=0)
        for i in range(n):
            cam.publish(topics.infer("cam-a"), request(i, device="cam-a", x=x[i]), qos=0)
        got = answers_for(cam, range(n))
    # stop() wrote the last batch: one teacher label per answer, with the answer's confidence and version
    rows = {r.seq: r for r in LabelStore(tmp_path, fleet).rows()}
    assert set(rows) == set(range(n))
    assert all(r.source == "teacher" and r.device == "cam-a" and r.model_version == version.version
               for r in rows.values())
    assert all(rows[s].label == got[s].label and rows[s].confidence == got[s].confidence for s in rows)
    # the confidence is calibrated with the manifest's temperature
    import onnxruntime as ort

    t = version.manifest["calibration"]["temperature"]
    sess = ort.InferenceSession(version.data(), providers=["CPUExecutionProvider"])
    logits = sess.run(None, {sess.get_inputs()[0].name: x[:1]})[0]
    assert got[0].confidence == pytest.approx(float(softmax(logits, t).max()), rel=1e-5)
