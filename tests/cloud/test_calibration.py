"""Temperature scaling: the fit, the ECE, and T travelling in the signed manifest."""

from __future__ import annotations

import numpy as np
import pytest

from lepton.cloud._calibration import expected_calibration_error, fit_temperature, softmax
from lepton.errors import ModelRejected
from lepton.protocol import build_package, parse_manifest


def _calibrated_logits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is calibrated by construction: labels are drawn from softmax(logits)."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, 5))
    p = softmax(logits)
    y = np.array([rng.choice(5, p=row) for row in p])
    return logits, y


def test_fit_recovers_the_temperature_that_over_confidence_added():
    logits, y = _calibrated_logits(6000)

    assert fit_temperature(logits, y) == pytest.approx(1.0, abs=0.08)
    assert fit_temperature(logits * 3.0, y) == pytest.approx(3.0, rel=0.08)  # 3x over-confident


def test_ece_is_near_zero_when_calibrated_and_drops_after_scaling():
    logits, y = _calibrated_logits(6000, seed=1)
    sharp = logits * 3.0

    assert expected_calibration_error(softmax(logits), y) < 0.03
    raw = expected_calibration_error(softmax(sharp), y)
    scaled = expected_calibration_error(softmax(sharp, fit_temperature(sharp, y)), y)
    assert raw > 0.1 and scaled < 0.03


def test_scaling_never_changes_the_prediction():
    logits, y = _calibrated_logits(500, seed=2)
    assert (softmax(logits, 0.3).argmax(1) == softmax(logits, 7.0).argmax(1)).all()


def test_trained_model_reports_ece_and_ships_its_temperature(trained_digits):
    _, fleet, version = trained_digits
    cal = version.report["export"]["calibration"]

    assert cal["method"] == "temperature" and 0.05 <= cal["temperature"] <= 100
    assert cal["samples"] == version.report["export"]["val_samples"]
    assert 0 <= cal["ece_calibrated"] <= 1 and 0 <= cal["ece_raw"] <= 1
    assert cal["nll_calibrated"] <= cal["nll_raw"] + 1e-9  # T is the NLL minimiser, T=1 a candidate
    assert version.manifest["calibration"]["temperature"] == cal["temperature"]
    manifest_payload, _ = version_package(version, fleet)
    m, _, _ = parse_manifest(manifest_payload)
    assert m.temperature == cal["temperature"] and m.calibration["ece_raw"] == cal["ece_raw"]


def version_package(version, fleet):
    from lepton.cloud import Registry

    return Registry(version.path.parents[2]).build(version.name, version.version, fleet=fleet)


@pytest.mark.parametrize("bad", [{"temperature": 0}, {"temperature": "2"}, {"temperature": float("inf")}, [1.0]])
def test_a_manifest_with_a_bad_temperature_is_rejected(bad):
    kw = dict(fleet="f", name="m", version=1, data=b"x" * 10, input_spec={"shape": [-1, 2]}, labels=["a"],
              pipeline={"hash": None})
    payload, _ = build_package(**kw)
    # build_package refuses it up front, and a hand-made manifest carrying it is rejected on read
    with pytest.raises((ValueError, TypeError)):
        build_package(**kw, calibration=bad)
    import json
    env = json.loads(payload)
    body = json.loads(env["manifest"])
    body["calibration"] = bad
    env["manifest"] = json.dumps(body)
    with pytest.raises(ModelRejected, match="calibration"):
        parse_manifest(json.dumps(env).encode())
