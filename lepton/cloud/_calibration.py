"""Confidence calibration: temperature scaling fitted on the validation split at training time.

A network's softmax confidence is usually over-confident; a device that escalates "samples below
confidence C" needs C to mean what it says. Temperature scaling (Guo et al., 2017) divides the
logits by one scalar ``T`` fitted to minimise the negative log-likelihood on held-out data; it never
changes the argmax, so accuracy is untouched. ``T`` ships in the signed manifest
(``calibration.temperature``) and a device computes ``softmax(logits / T)``.

The fit is numpy only: NLL is convex in ``1 / T``, so a golden-section search on ``1 / T`` finds it.
Honest figures: ``ece_calibrated`` is cross-fitted (``T`` fitted on one half of the validation set,
ECE measured on the other, both ways, averaged), so it is not measured on the data ``T`` was fitted
on. The shipped ``T`` is fitted on the whole validation set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

__all__ = ["calibrate", "expected_calibration_error", "fit_temperature", "softmax"]

_BETA_LO, _BETA_HI = 1.0 / 100.0, 1.0 / 0.05  # T in [0.05, 100]


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, np.float64) / float(temperature)
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _nll(logits: np.ndarray, labels: np.ndarray, beta: float) -> float:
    z = logits * beta
    z = z - z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z).sum(axis=1))
    return float(np.mean(lse - z[np.arange(len(labels)), labels]))


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, iterations: int = 80) -> float:
    """The ``T`` in [0.05, 100] that minimises the NLL of ``softmax(logits / T)``.

    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 3, 2000); logits = rng.normal(size=(2000, 3)); logits[np.arange(2000), y] += 1.0
    >>> round(fit_temperature(logits * 4.0, y) / fit_temperature(logits, y), 1)  # 4x sharper logits: 4x T
    4.0
    """
    logits = np.asarray(logits, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 1.0
    lo, hi = math.log(_BETA_LO), math.log(_BETA_HI)  # search log(beta): better scaled
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = _nll(logits, labels, math.exp(a)), _nll(logits, labels, math.exp(b))
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = _nll(logits, labels, math.exp(a))
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = _nll(logits, labels, math.exp(b))
    return 1.0 / math.exp((lo + hi) / 2)


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, *, bins: int = 15) -> float:
    """ECE: the sample-weighted mean |accuracy - confidence| over equal-width confidence bins."""
    probs = np.asarray(probs, np.float64)
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return 0.0
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    total = 0.0
    for k in range(bins):
        mask = which == k
        if mask.any():
            total += mask.sum() * abs(correct[mask].mean() - conf[mask].mean())
    return float(total / len(labels))


def calibrate(
    session, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, label_map: np.ndarray | None = None
) -> dict[str, Any]:
    """Fit ``T`` on the logits of ``session`` over validation ``batches``; ECE/NLL before and after.

    ``label_map`` maps the dataset's label indices to the model's (``-1``: the model lacks it; such
    samples are left out).
    """
    name = session.get_inputs()[0].name
    logit_parts, label_parts = [], []
    for x, y in batches:
        logit_parts.append(np.asarray(session.run(None, {name: x})[0], np.float64))
        label_parts.append(np.asarray(y, np.int64))
    if not logit_parts:
        return {"method": "temperature", "temperature": 1.0, "samples": 0}
    logits, labels = np.concatenate(logit_parts), np.concatenate(label_parts)
    if label_map is not None:
        labels = label_map[labels]
        keep = labels >= 0
        logits, labels = logits[keep], labels[keep]
    t_all = fit_temperature(logits, labels)
    # Cross-fitted ECE: fit on even rows, measure on odd ones, and the other way round.
    even, odd = np.arange(len(labels)) % 2 == 0, np.arange(len(labels)) % 2 == 1
    cross = []
    for fit, test in ((even, odd), (odd, even)):
        if fit.any() and test.any():
            t = fit_temperature(logits[fit], labels[fit])
            cross.append((expected_calibration_error(softmax(logits[test], t), labels[test]), test.sum()))
    ece_cal = sum(e * n for e, n in cross) / sum(n for _, n in cross) if cross else None
    return {
        "method": "temperature",
        "temperature": round(t_all, 4),
        "samples": int(len(labels)),
        "ece_raw": round(expected_calibration_error(softmax(logits), labels), 4),
        "ece_calibrated": round(float(ece_cal), 4) if ece_cal is not None else None,
        "nll_raw": round(_nll(logits, labels, 1.0), 4),
        "nll_calibrated": round(_nll(logits, labels, 1.0 / t_all), 4),
    }
