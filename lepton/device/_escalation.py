"""Edge-cloud collaboration on the device, as I/O-free rules: which samples go to the cloud model,
which answer a prediction uses, and which samples are uploaded to the dataset.

Nothing here touches a socket, a thread, a clock or a file: every call takes ``now`` when time
matters, so each rule is unit-tested in microseconds (tests/device/test_escalation.py). The agent
(lepton/device/_collaboration.py) composes one instance of each, owned by the capture thread.

* :class:`EscalationPolicy` decides whether a prediction is escalated: below a fixed calibrated
  confidence (``--escalate-below C``), or within a budget (``--escalate-rate R``): a sample is
  escalated when its confidence ranks in the lowest ``R`` of the last ``window`` confidences, so
  the escalated fraction stays near ``R`` as the data drifts, and a burst of hard samples cannot
  escalate everything. ``cloud_only`` escalates every sample (a device without a local model).
* :class:`PendingAnswers` holds escalated samples until the cloud answers or their deadline passes:
  the device then uses the cloud's answer, else its own. It never blocks: the capture loop asks it
  for what is due and goes on.
* :class:`UploadPolicy` decides which samples enter the spool (and so the dataset):
  ``all``, ``escalated``, ``sample:P`` or ``escalated+sample:P``. The random part is a hash of
  ``(device, seq)``, so it is the same on every restart and unbiased by the model: hard-example
  mining from the escalated samples, plus an unbiased random sample of everything.
"""

from __future__ import annotations

import bisect
import hashlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

from lepton.errors import ConfigError

__all__ = [
    "Answer",
    "EscalationPolicy",
    "Outcome",
    "PendingAnswers",
    "UploadPolicy",
    "parse_upload_policy",
]


class EscalationPolicy:
    """Escalate below a fixed confidence, or within a budget that tracks a running quantile.

    >>> p = EscalationPolicy(rate=0.25, window=10)
    >>> [p.decide(c) for c in (0.9, 0.8, 0.95, 0.85)]      # each ranked among those seen before it
    [False, True, False, False]
    >>> p.decide(0.1), p.decide(0.99)
    (True, False)
    """

    def __init__(
        self,
        *,
        below: float | None = None,
        rate: float | None = None,
        cloud_only: bool = False,
        window: int = 1000,
    ) -> None:
        if below is not None and rate is not None:
            raise ConfigError("--escalate-below and --escalate-rate exclude each other: choose one")
        if below is not None and not 0.0 <= below <= 1.0:
            raise ConfigError(f"--escalate-below must be a confidence in [0, 1], got {below}")
        if rate is not None and not 0.0 <= rate <= 1.0:
            raise ConfigError(f"--escalate-rate must be a fraction in [0, 1], got {rate}")
        if window < 10:
            raise ConfigError(f"escalation window must be >= 10 samples, got {window}")
        self.below, self.rate, self.cloud_only = below, rate, cloud_only
        self.window = window
        self._recent: deque[float] = deque()
        self._sorted: list[float] = []
        self.seen = 0
        self.escalated = 0

    @property
    def enabled(self) -> bool:
        return self.cloud_only or self.below is not None or bool(self.rate)

    @property
    def mode(self) -> str:
        if self.cloud_only:
            return "cloud-only"
        if self.below is not None:
            return f"below:{self.below:g}"
        if self.rate:
            return f"rate:{self.rate:g}"
        return "off"

    def decide(self, confidence: float | None) -> bool:
        """Escalate this prediction? ``confidence`` is the calibrated one; None means no local model."""
        self.seen += 1
        if self.cloud_only or confidence is None:
            out = self.cloud_only or self.enabled
        elif self.below is not None:
            out = confidence < self.below
        elif self.rate:
            out = self._rank_decision(float(confidence), self.rate)
        else:
            out = False
        self.escalated += out
        return out

    def _rank_decision(self, c: float, rate: float) -> bool:
        # Escalate when fewer than rate * n of the recent confidences are strictly lower than c.
        n = len(self._sorted)
        below = bisect.bisect_left(self._sorted, c)
        out = n > 0 and below < rate * n
        self._recent.append(c)
        bisect.insort(self._sorted, c)
        if len(self._recent) > self.window:
            old = self._recent.popleft()
            del self._sorted[bisect.bisect_left(self._sorted, old)]
        return bool(out)

    @property
    def threshold(self) -> float | None:
        """The confidence below which a sample is escalated now (None: no local threshold)."""
        if self.below is not None:
            return self.below
        if self.rate and self._sorted:
            k = min(len(self._sorted) - 1, int(self.rate * len(self._sorted)))
            return self._sorted[k]
        return None

    def stats(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "seen": self.seen,
            "escalated": self.escalated,
            "escalated_fraction": round(self.escalated / self.seen, 4) if self.seen else 0.0,
            "threshold": None if self.threshold is None else round(self.threshold, 4),
        }


@dataclass(frozen=True)
class Answer:
    """The cloud's answer to one escalated sample (``devices/{id}/answers``)."""

    seq: int
    label: Any
    confidence: float | None
    model_version: int | None
    cloud_ms: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class Outcome:
    """The prediction a device settles on for one escalated sample."""

    seq: int
    label: Any
    confidence: float | None
    answered_by: str  # "cloud", "edge" (deadline passed or the cloud erred) or "none" (cloud-only, no answer)
    edge_label: Any
    edge_confidence: float | None
    cloud: Answer | None
    latency_ms: float | None  # request sent -> answer in (None without an answer)
    payload: Any = None


class PendingAnswers:
    """Escalated samples waiting for the cloud, each with a deadline. Bounded; never blocks."""

    def __init__(self, *, limit: int = 1024) -> None:
        if limit < 1:
            raise ConfigError(f"pending answer limit must be >= 1, got {limit}")
        self.limit = limit
        self._waiting: OrderedDict[int, tuple[float, float, Any, float | None, Any]] = OrderedDict()
        self.answered = self.timed_out = self.late = self.unknown = self.errors = self.overflow = 0

    def __len__(self) -> int:
        return len(self._waiting)

    def add(
        self, seq: int, *, now: float, deadline: float, edge_label: Any, edge_confidence: float | None,
        payload: Any = None,
    ) -> list[Outcome]:
        """Wait for ``seq``; returns the outcomes of the oldest waits pushed out by the limit (edge answers)."""
        out = []
        while len(self._waiting) >= self.limit:
            old, (sent, _, label, conf, pl) = self._waiting.popitem(last=False)
            self.overflow += 1
            out.append(self.local(old, label, conf, pl))
        self._waiting[int(seq)] = (now, deadline, edge_label, edge_confidence, payload)
        return out

    def answer(self, ans: Answer, *, now: float) -> Outcome | None:
        """The outcome when ``ans`` matches a waiting sample in time; None for late/unknown answers."""
        entry = self._waiting.pop(int(ans.seq), None)
        if entry is None:
            self.unknown += 1  # late (after its deadline), duplicate, or never asked
            return None
        sent, deadline, label, conf, payload = entry
        if now > deadline:
            self.late += 1
            return self.local(ans.seq, label, conf, payload)
        latency = (now - sent) * 1000.0
        if ans.error is not None or ans.label is None:
            self.errors += 1
            o = self.local(ans.seq, label, conf, payload)
            return Outcome(**{**o.__dict__, "cloud": ans, "latency_ms": latency})
        self.answered += 1
        return Outcome(seq=ans.seq, label=ans.label, confidence=ans.confidence, answered_by="cloud",
                       edge_label=label, edge_confidence=conf, cloud=ans, latency_ms=latency, payload=payload)

    def expire(self, now: float) -> list[Outcome]:
        """Outcomes (the edge's own answers) of every sample whose deadline has passed."""
        due = [seq for seq, (_, deadline, *_rest) in self._waiting.items() if deadline < now]
        out = []
        for seq in due:
            _, _, label, conf, payload = self._waiting.pop(seq)
            self.timed_out += 1
            out.append(self.local(seq, label, conf, payload))
        return out

    def next_deadline(self) -> float | None:
        return min((d for _, d, *_ in self._waiting.values()), default=None)

    @staticmethod
    def local(seq: int, label: Any, conf: float | None, payload: Any) -> Outcome:
        by = "edge" if label is not None else "none"
        return Outcome(seq=seq, label=label, confidence=conf, answered_by=by, edge_label=label,
                       edge_confidence=conf, cloud=None, latency_ms=None, payload=payload)

    def stats(self) -> dict[str, int]:
        return {"waiting": len(self._waiting), "answered": self.answered, "timed_out": self.timed_out,
                "late": self.late, "unknown": self.unknown, "errors": self.errors, "overflow": self.overflow}


UPLOAD_MODES = ("all", "escalated", "sample", "escalated+sample")


@dataclass(frozen=True)
class UploadPolicy:
    """Which samples enter the spool. ``fraction`` is the random part of ``sample``/``escalated+sample``."""

    mode: str = "all"
    fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.mode not in UPLOAD_MODES:
            raise ConfigError(f"--upload {self.mode!r}: choose all, escalated, sample:P or escalated+sample:P")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"--upload {self.spec}: P must be a fraction in [0, 1]")

    @property
    def spec(self) -> str:
        return self.mode if "sample" not in self.mode else f"{self.mode}:{self.fraction:g}"

    @property
    def needs_escalation(self) -> bool:
        return self.mode.startswith("escalated")

    def keep(self, device: str, seq: int, *, escalated: bool) -> bool:
        if self.mode == "all":
            return True
        if self.needs_escalation and escalated:
            return True
        if "sample" in self.mode:
            digest = hashlib.blake2b(f"upload\x00{device}\x00{seq}".encode(), digest_size=8).digest()
            return int.from_bytes(digest, "big") / float(2**64) < self.fraction
        return False


def parse_upload_policy(text: str) -> UploadPolicy:
    """``all`` | ``escalated`` | ``sample:P`` | ``escalated+sample:P``.

    >>> parse_upload_policy("escalated+sample:0.05")
    UploadPolicy(mode='escalated+sample', fraction=0.05)
    """
    text = (text or "").strip()
    mode, sep, frac = text.partition(":")
    if mode in ("all", "escalated") and not sep:
        return UploadPolicy(mode)
    if mode in ("sample", "escalated+sample") and sep:
        try:
            p = float(frac)
        except ValueError:
            raise ConfigError(f"--upload {text!r}: P in {mode}:P must be a number, e.g. {mode}:0.05") from None
        return UploadPolicy(mode, p)
    raise ConfigError(f"--upload {text!r}: choose all, escalated, sample:P or escalated+sample:P (P a fraction)")
