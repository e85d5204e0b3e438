"""The agent's collaboration decisions (lepton/device/_collaboration.py): I/O-free, so no broker here."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lepton.device._collaboration import Collaboration, collaboration_fields
from lepton.device._config import Counters
from lepton.device._escalation import Answer
from lepton.protocol import decode_infer


@dataclass
class _Prediction:  # the fields of lepton.device.Prediction the collaboration reads
    label: str
    confidence: float
    version: int = 3

    def as_dict(self) -> dict:
        return {"label": self.label, "index": 0, "confidence": self.confidence, "latency_ms": 0.1,
                "version": self.version}


def test_no_escalation_decides_nothing_and_uploads_everything():
    co = Collaboration(device_id="d1")
    assert not co.enabled
    assert co.decide(_Prediction("1", 0.01)) is False
    assert all(co.keep(seq, escalated=False) for seq in range(100))


def test_below_threshold_escalates_the_unsure_and_the_request_carries_the_edge_answer():
    co = Collaboration(device_id="d1", escalate_below=0.5, answer_timeout_ms=200)
    unsure, sure = _Prediction("7", 0.3), _Prediction("1", 0.9)
    assert co.decide(unsure) is True and co.decide(sure) is False

    payload, pushed = co.escalate(5, np.ones((1, 2, 2), np.float32), unsure, "7", pipeline="abc",
                                  now=100.0, wall=1_000.0)

    request = decode_infer(payload)
    assert pushed == [] and co.waiting == 1
    assert (request.seq, request.edge_label, request.edge_confidence, request.edge_version) == (5, "7", 0.3, 3)
    assert request.deadline == 1_000.2 and request.pipeline == "abc"
    assert co.expire(100.1) == []  # its deadline (100.2) has not passed


def test_a_cloud_answer_in_time_wins_and_is_counted_with_its_latency():
    co = Collaboration(device_id="d1", escalate_below=0.5, answer_timeout_ms=200)
    edge = _Prediction("7", 0.3)
    co.escalate(5, np.zeros(2, np.float32), edge, "1", pipeline="p", now=100.0, wall=0.0)

    outcome = co.answered(Answer(seq=5, label="1", confidence=0.99, model_version=9), arrived=100.05)
    c = Counters()
    co.tally(c, outcome)

    assert outcome.answered_by == "cloud" and round(outcome.latency_ms, 6) == 50.0
    assert (c.answered_by_cloud, c.truth_n, c.edge_correct, c.joint_correct) == (1, 1, 0, 1)
    body = co.prediction_body(outcome, edge, escalated=True)
    assert body["label"] == "1" and body["answered_by"] == "cloud" and body["version"] == 9
    assert (body["device"], body["seq"], body["truth"], body["edge_label"]) == ("d1", 5, "1", "7")
    assert co.answered(Answer(seq=5, label="1", confidence=0.9, model_version=9), arrived=100.06) is None


def test_a_late_answer_leaves_the_edge_answer_standing():
    co = Collaboration(device_id="d1", escalate_below=0.5, answer_timeout_ms=200)
    edge = _Prediction("7", 0.3)
    co.escalate(5, np.zeros(2, np.float32), edge, "7", pipeline="p", now=100.0, wall=0.0)

    (expired,) = co.expire(100.3)
    c = Counters()
    co.tally(c, expired)

    assert expired.answered_by == "edge" and expired.label == "7"
    assert (c.answered_by_edge, c.truth_n, c.edge_correct, c.joint_correct) == (1, 1, 1, 1)
    assert co.prediction_body(expired, edge, escalated=True)["confidence"] == 0.3  # the model's own body
    assert co.answered(Answer(seq=5, label="1", confidence=0.9, model_version=9), arrived=100.4) is None


def test_cloud_only_without_an_answer_is_answered_by_none_and_counts_for_accuracy():
    co = Collaboration(device_id="d1", cloud_only=True)
    assert co.decide(None) is True
    outcome = co.local(3, None, "4")  # escalated while offline
    c = Counters()
    co.tally(c, outcome)
    assert outcome.answered_by == "none" and (c.answered_by_none, c.truth_n, c.joint_correct) == (1, 1, 0)


def test_without_a_model_the_edge_answer_does_not_count_for_accuracy():
    co = Collaboration(device_id="d1", escalate_below=0.5)
    c = Counters()
    co.tally(c, co.local(0, None, "4"))
    assert (c.answered_by_none, c.truth_n) == (1, 0)


def test_upload_escalated_keeps_only_the_escalated():
    co = Collaboration(device_id="d1", escalate_below=0.5, upload="escalated")
    assert co.keep(0, escalated=True) is True and co.keep(1, escalated=False) is False


def test_the_pending_limit_pushes_out_the_oldest_as_edge_answers():
    co = Collaboration(device_id="d1", escalate_below=0.5)
    for seq in range(co.pending.limit):
        assert co.escalate(seq, np.zeros(1, np.float32), _Prediction("2", 0.1), None, pipeline="p",
                           now=1.0, wall=0.0)[1] == []
    _, pushed = co.escalate(9999, np.zeros(1, np.float32), _Prediction("2", 0.1), None, pipeline="p",
                            now=1.0, wall=0.0)
    assert [(o.seq, o.answered_by) for o in pushed] == [(0, "edge")]


def test_collaboration_fields_are_flat_numbers_per_captured_sample():
    c = Counters(captured=10, escalated=2, uploaded=5, infer_bytes=100, sample_bytes=900, truth_n=4,
                 edge_correct=2, joint_correct=3)
    fields = collaboration_fields(c, [5.0, 1.0, 3.0], {"timed_out": 1, "late": 2, "unknown": 1, "errors": 0})
    assert fields["escalated_fraction"] == 0.2 and fields["upload_fraction"] == 0.5
    assert fields["bytes_per_sample"] == 100.0 and fields["answer_ms_p50"] == 3.0
    assert fields["answers_late"] == 3 and fields["answers_timed_out"] == 1
    assert (fields["edge_accuracy"], fields["joint_accuracy"]) == (0.5, 0.75)
    assert all(isinstance(v, (int, float)) or v is None for v in fields.values())
