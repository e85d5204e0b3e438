"""Edge-cloud collaboration in the agent, as one I/O-free class: escalate a sample or not, the request
that asks the cloud, the answer the device settles on, how it is counted, and the prediction it publishes.

:class:`Collaboration` composes the rules of :mod:`lepton.device._escalation` (the escalation policy,
the pending answers, the upload policy) into the decisions the capture loop carries out. It never
touches a socket, a thread or a clock: ``now`` (monotonic) and ``wall`` (``time.time()``) are passed
in, and it returns payloads and outcomes; the capture loop (lepton/device/_capture.py) publishes them.
So every rule is unit-tested in microseconds (tests/device/test_collaboration.py).

**Who owns what.** One instance per agent, owned by the capture thread: the policies and the pending
answers are read and written only there. :meth:`Collaboration.tally` writes an agent's
:class:`~lepton.device._config.Counters`; its caller holds the agent's ``_lock``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from lepton.device._config import Counters
from lepton.device._escalation import Answer, EscalationPolicy, Outcome, PendingAnswers, parse_upload_policy
from lepton.protocol import InferRequest, encode_infer

__all__ = ["Collaboration", "collaboration_fields"]


class Collaboration:
    """The capture thread's collaboration decisions, state in, decisions out.

    >>> co = Collaboration(device_id="d1", cloud_only=True, answer_timeout_ms=250)
    >>> co.decide(None), co.keep(0, escalated=True)
    (True, True)
    >>> payload, pushed = co.escalate(0, np.zeros(4, np.float32), None, "3", pipeline="p", now=10.0, wall=0.0)
    >>> [o.answered_by for o in co.expire(10.3)]
    ['none']
    """

    def __init__(
        self,
        *,
        device_id: str,
        escalate_below: float | None = None,
        escalate_rate: float | None = None,
        cloud_only: bool = False,
        upload: str = "all",
        answer_timeout_ms: float = 250.0,
    ) -> None:
        self.device_id = device_id
        self.escalation = EscalationPolicy(below=escalate_below, rate=escalate_rate, cloud_only=cloud_only)
        self.upload = parse_upload_policy(upload)
        self.pending = PendingAnswers()
        self.cloud_only = cloud_only
        self.timeout_s = answer_timeout_ms / 1000.0
        #: fixed by the config: the capture loop reads this, not a property, per sample
        self.enabled = self.escalation.enabled

    def decide(self, prediction: Any) -> bool:
        """Escalate this sample? ``prediction`` is the local model's (None without one)."""
        if not self.enabled:
            return False
        return self.escalation.decide(prediction.confidence if prediction is not None else None)

    def keep(self, seq: int, *, escalated: bool) -> bool:
        """Does the sample with ``seq`` enter the spool (the upload policy)?"""
        return self.upload.keep(self.device_id, seq, escalated=escalated)

    def escalate(
        self, seq: int, x: np.ndarray, prediction: Any, truth: str | None, *, pipeline: str, now: float,
        wall: float,
    ) -> tuple[bytes, list[Outcome]]:
        """The infer request's payload for ``seq``, and the outcomes of older waits it pushed out."""
        request = InferRequest(
            device=self.device_id, seq=seq, x=np.ascontiguousarray(x), pipeline=pipeline,
            edge_label=prediction.label if prediction is not None else None,
            edge_confidence=prediction.confidence if prediction is not None else None,
            edge_version=prediction.version if prediction is not None else None,
            deadline=wall + self.timeout_s,
        )
        payload = encode_infer(request)
        pushed = self.pending.add(
            seq, now=now, deadline=now + self.timeout_s,
            edge_label=request.edge_label, edge_confidence=request.edge_confidence,
            payload=(truth, prediction),
        )
        return payload, pushed

    @staticmethod
    def local(seq: int, prediction: Any, truth: str | None) -> Outcome:
        """The device's own answer for ``seq``, at once (not escalated, or escalated while offline)."""
        if prediction is None:
            return PendingAnswers.local(seq, None, None, truth)
        return PendingAnswers.local(seq, prediction.label, prediction.confidence, truth)

    def answered(self, answer: Answer, *, arrived: float) -> Outcome | None:
        """The outcome of a cloud answer that arrived at ``arrived``; None when nothing waited for it."""
        return self.pending.answer(answer, now=arrived)

    def expire(self, now: float) -> list[Outcome]:
        """The device's own answers for every escalated sample whose deadline passed."""
        return self.pending.expire(now)

    @property
    def waiting(self) -> int:
        return len(self.pending)

    def tally(self, c: Counters, outcome: Outcome) -> None:
        """Count the answer the device settled on in ``c`` (the caller holds the agent's lock)."""
        truth = self.truth_of(outcome)
        if outcome.answered_by == "cloud":
            c.answered_by_cloud += 1
        elif outcome.answered_by == "edge":
            c.answered_by_edge += 1
        else:
            c.answered_by_none += 1
        # Accuracy over the samples the edge answered itself (or every sample with --cloud-only), so
        # edge and joint accuracy compare the same samples; before the first model there is neither.
        if truth is not None and (outcome.edge_label is not None or self.cloud_only):
            c.truth_n += 1
            c.edge_correct += outcome.edge_label is not None and str(outcome.edge_label) == truth
            c.joint_correct += outcome.label is not None and str(outcome.label) == truth

    @staticmethod
    def truth_of(outcome: Outcome) -> str | None:
        return outcome.payload[0] if isinstance(outcome.payload, tuple) else outcome.payload

    def prediction_body(self, outcome: Outcome, prediction: Any, *, escalated: bool) -> dict[str, Any]:
        """The body published on ``devices/{id}/predictions`` for a settled sample (docs/protocol.md)."""
        if prediction is not None and outcome.answered_by != "cloud":
            body = prediction.as_dict()
        else:
            body = {"label": outcome.label, "index": None, "confidence": outcome.confidence,
                    "latency_ms": outcome.latency_ms,
                    "version": outcome.cloud.model_version if outcome.cloud else None}
        body.update(device=self.device_id, seq=outcome.seq, truth=self.truth_of(outcome),
                    answered_by=outcome.answered_by, escalated=escalated, edge_label=outcome.edge_label,
                    edge_confidence=outcome.edge_confidence)
        return body


def collaboration_fields(c: Counters, latencies_ms: Sequence[float], pending: dict[str, int]) -> dict[str, Any]:
    """Flat numbers (Grafana's MQTT data source plots them as they are): escalation, answers, bytes.

    >>> collaboration_fields(Counters(captured=4, escalated=1), [], {})["escalated_fraction"]
    0.25
    """
    lat = sorted(latencies_ms)
    n = c.captured

    def pct(q: float) -> float | None:
        return round(lat[min(len(lat) - 1, int(q / 100 * len(lat)))], 3) if lat else None

    return {
        "escalated": c.escalated,
        "escalated_fraction": round(c.escalated / n, 4) if n else 0.0,
        "answered_by_cloud": c.answered_by_cloud,
        "answered_by_edge": c.answered_by_edge,
        "answered_by_none": c.answered_by_none,
        "answers_timed_out": pending.get("timed_out", 0),
        "answers_late": pending.get("late", 0) + pending.get("unknown", 0),
        "answers_failed": pending.get("errors", 0),
        "answer_ms_p50": pct(50),
        "answer_ms_p99": pct(99),
        "uploaded": c.uploaded,
        "upload_fraction": round(c.uploaded / n, 4) if n else 0.0,
        "infer_bytes": c.infer_bytes,
        "sample_bytes": c.sample_bytes,
        "bytes_per_sample": round((c.infer_bytes + c.sample_bytes) / n, 1) if n else 0.0,
        "truth_samples": c.truth_n,
        "edge_accuracy": round(c.edge_correct / c.truth_n, 4) if c.truth_n else None,
        "joint_accuracy": round(c.joint_correct / c.truth_n, 4) if c.truth_n else None,
    }
