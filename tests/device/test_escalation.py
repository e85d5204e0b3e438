"""The device's collaboration rules, I/O-free: escalation, pending answers, upload policy."""

from __future__ import annotations

import doctest

import numpy as np
import pytest

from lepton.device import _escalation
from lepton.device._escalation import (
    Answer,
    EscalationPolicy,
    PendingAnswers,
    UploadPolicy,
    parse_upload_policy,
)
from lepton.errors import ConfigError


def test_doctests():
    assert doctest.testmod(_escalation).failed == 0


def test_fixed_threshold_escalates_below_it_only():
    p = EscalationPolicy(below=0.6)
    got = [p.decide(c) for c in (0.59, 0.6, 0.95, 0.1)]
    assert got == [True, False, False, True]
    assert p.stats()["escalated_fraction"] == 0.5 and p.threshold == 0.6


@pytest.mark.parametrize("rate", [0.05, 0.2, 0.5])
def test_the_budget_tracks_its_rate_as_the_data_drifts(rate):
    rng = np.random.default_rng(0)
    p = EscalationPolicy(rate=rate, window=500)
    # 5000 easy samples, then the scene changes and every confidence drops by 0.3 for 5000 more.
    easy = rng.beta(8, 2, 5000)
    hard = np.clip(rng.beta(8, 2, 5000) - 0.3, 0, 1)
    first = sum(p.decide(c) for c in easy)
    p.decide(hard[0])
    second = [p.decide(c) for c in hard[1:]]

    assert abs(first / 5000 - rate) < 0.02
    # After one window the budget holds again on the shifted data (a fixed threshold would not).
    assert abs(np.mean(second[1000:]) - rate) < 0.02


def test_a_fixed_threshold_does_not_hold_a_budget_under_drift():
    rng = np.random.default_rng(1)
    p = EscalationPolicy(below=0.6)
    easy = [p.decide(c) for c in rng.beta(8, 2, 3000)]
    hard = [p.decide(c) for c in np.clip(rng.beta(8, 2, 3000) - 0.3, 0, 1)]
    assert np.mean(hard) > 3 * np.mean(easy)  # the contrast the budget policy exists for


def test_cloud_only_escalates_everything_and_off_nothing():
    assert all(EscalationPolicy(cloud_only=True).decide(c) for c in (None, 0.99))
    off = EscalationPolicy()
    assert not off.enabled and not any(off.decide(c) for c in (0.0, 0.5))


@pytest.mark.parametrize("kw, words", [({"below": 0.5, "rate": 0.1}, "exclude each other"),
                                       ({"below": 1.5}, r"in \[0, 1\]"), ({"rate": -0.1}, "fraction")])
def test_bad_escalation_settings_name_the_fix(kw, words):
    with pytest.raises(ConfigError, match=words):
        EscalationPolicy(**kw)


def test_the_cloud_answer_wins_in_time_and_the_edge_answer_otherwise():
    pend = PendingAnswers()
    pend.add(1, now=0.0, deadline=0.2, edge_label="3", edge_confidence=0.4)
    pend.add(2, now=0.0, deadline=0.2, edge_label="5", edge_confidence=0.3)
    pend.add(3, now=0.0, deadline=0.2, edge_label="7", edge_confidence=0.2)

    cloud = pend.answer(Answer(1, "8", 0.97, 4, cloud_ms=3.0), now=0.05)
    assert (cloud.label, cloud.answered_by, cloud.edge_label) == ("8", "cloud", "3")
    assert cloud.latency_ms == pytest.approx(50.0)
    erred = pend.answer(Answer(2, None, None, 4, error="overloaded"), now=0.06)
    assert (erred.label, erred.answered_by, erred.cloud.error) == ("5", "edge", "overloaded")
    assert pend.expire(0.1) == []
    (timed_out,) = pend.expire(0.25)
    assert (timed_out.seq, timed_out.label, timed_out.answered_by) == (3, "7", "edge")
    assert pend.answer(Answer(3, "1", 0.9, 4), now=0.3) is None  # too late: already settled
    assert pend.answer(Answer(99, "1", 0.9, 4), now=0.3) is None  # never asked
    assert pend.stats() == {"waiting": 0, "answered": 1, "timed_out": 1, "late": 0, "unknown": 2,
                            "errors": 1, "overflow": 0}


def test_pending_is_bounded_and_a_device_without_model_answers_none():
    pend = PendingAnswers(limit=2)
    assert pend.add(1, now=0, deadline=1, edge_label=None, edge_confidence=None) == []
    pend.add(2, now=0, deadline=1, edge_label=None, edge_confidence=None)
    (pushed,) = pend.add(3, now=0, deadline=1, edge_label=None, edge_confidence=None)
    assert (pushed.seq, pushed.answered_by) == (1, "none") and len(pend) == 2
    assert pend.next_deadline() == 1


@pytest.mark.parametrize(
    "text, mode, frac",
    [("all", "all", 0.0), ("escalated", "escalated", 0.0), ("sample:0.1", "sample", 0.1),
     ("escalated+sample:0.05", "escalated+sample", 0.05)],
)
def test_upload_specs_parse(text, mode, frac):
    assert parse_upload_policy(text) == UploadPolicy(mode, frac)


@pytest.mark.parametrize("text", ["", "some", "sample", "sample:x", "sample:1.5", "escalated:0.1"])
def test_bad_upload_specs_name_the_choices(text):
    with pytest.raises(ConfigError, match="--upload"):
        parse_upload_policy(text)


def test_upload_sampling_is_stable_and_near_its_fraction():
    pol = parse_upload_policy("escalated+sample:0.05")
    kept = [pol.keep("cam-1", s, escalated=False) for s in range(20000)]
    assert abs(np.mean(kept) - 0.05) < 0.005
    assert kept == [pol.keep("cam-1", s, escalated=False) for s in range(20000)]  # same after a restart
    assert all(pol.keep("cam-1", s, escalated=True) for s in range(100))
    assert not parse_upload_policy("escalated").keep("cam-1", 1, escalated=False)
