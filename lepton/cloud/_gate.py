"""The deployment gate: score the deployed version on the new version's validation set, then pass or refuse.

Pure functions, called on global rank zero by the registry callback (``lepton.cloud._training``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from lepton.cloud._data import ParquetDataModule
from lepton.cloud._export import onnx_accuracy, onnx_session
from lepton.cloud._registry import Registry

__all__ = ["evaluate_deployed", "gate_decision"]


def evaluate_deployed(
    registry: Registry, name: str, fleet: str, dm: ParquetDataModule
) -> dict[str, Any] | None:
    """Score the version deployed to ``fleet`` on ``dm``'s validation set with ONNX Runtime.

    Returns None when nothing is deployed, else ``{"version", "comparable", "accuracy"|"reason"}``.
    Class indices are matched by label name, so a new class does not break the comparison.
    """
    deployed = registry.deployed(name, fleet)
    if deployed is None:
        return None
    m, info = deployed.manifest, dm.info
    out: dict[str, Any] = {"version": deployed.version, "comparable": False}
    if m["pipeline"].get("hash") != info.pipeline:
        trained_on = m["pipeline"].get("hash")
        out["reason"] = f"v{deployed.version} was trained on pipeline {trained_on!r}, not {info.pipeline!r}"
        return out
    if list(m["input"].get("shape", []))[1:] != list(info.shape):
        out["reason"] = (
            f"v{deployed.version} takes input shape {m['input'].get('shape')}, data has {list(info.shape)}"
        )
        return out
    index = {lab: i for i, lab in enumerate(info.labels)}
    label_map = np.asarray([index.get(str(lab), -1) for lab in m["labels"]], dtype=np.int64)
    try:
        session = onnx_session(deployed.data())
        acc, n = onnx_accuracy(session, dm.iter_numpy("val"), label_map=label_map)
    except Exception as exc:  # noqa: BLE001 - a broken deployed model must not block a fix
        out["reason"] = f"v{deployed.version} could not be evaluated: {exc}"
        return out
    out.update(comparable=True, accuracy=acc, val_samples=n)
    return out


def gate_decision(
    new_accuracy: float,
    deployed: dict[str, Any] | None,
    tolerance_points: float,
    *,
    force_incomparable: bool = False,
) -> dict[str, Any]:
    """Pass or refuse: new >= deployed - tolerance on the same validation set.

    A version that cannot be compared with the deployed one (another pipeline or input shape, or a
    deployed model that fails to run) is refused unless ``force_incomparable``: shipping it is how a
    device inventing a pipeline hash would take the fleet's model over.
    """
    gate: dict[str, Any] = {
        "new_accuracy": new_accuracy,
        "tolerance_points": tolerance_points,
        "deployed_version": None,
        "deployed_accuracy": None,
        "comparable": deployed is not None and bool(deployed["comparable"]),
        "forced": False,
    }
    if deployed is None:
        return {**gate, "passed": True, "reason": "no deployed version to compare with"}
    gate["deployed_version"] = deployed["version"]
    if not deployed["comparable"]:
        if force_incomparable:
            return {
                **gate,
                "passed": True,
                "forced": True,
                "reason": f"not comparable ({deployed['reason']}); shipped because of --force-incomparable",
            }
        return {
            **gate,
            "passed": False,
            "reason": f"not comparable: {deployed['reason']}; the new version is kept on disk and not "
            "shipped (pass --force-incomparable to ship it anyway)",
        }
    dep = deployed["accuracy"]
    gate["deployed_accuracy"] = dep
    floor = dep - tolerance_points / 100.0
    if new_accuracy + 1e-12 >= floor:
        return {
            **gate,
            "passed": True,
            "reason": f"new accuracy {new_accuracy:.4f} >= deployed v{deployed['version']} {dep:.4f} "
            f"- {tolerance_points:g} points on the same validation set",
        }
    return {
        **gate,
        "passed": False,
        "reason": f"new accuracy {new_accuracy:.4f} < deployed v{deployed['version']} {dep:.4f} "
        f"- {tolerance_points:g} points on the same validation set; the new version is kept "
        "on disk and not shipped",
    }
