"""Lepton's exception tree, every room's errors in one place.

This module imports nothing beyond the standard library, so the device side (no torch) and the
protocol can import it. The rooms re-export their own errors (``lepton.device.FrameError``,
``lepton.cloud.ExportError``, ...) from here.

Errors carry their data as attributes (``field``, ``reason``) so callers can branch on them without
parsing text; the message says what was wrong and what to do.
"""

from __future__ import annotations

__all__ = [
    "LeptonError",
    "ProtocolError",
    "ConfigError",
    "BrokerConnectionError",
    "ModelRejected",
    "GateRefused",
    "FrameError",
    "SpoolFull",
    "ExportError",
    "DeliveryError",
    "ChildCrashed",
    "RankZeroFailed",
]


class LeptonError(Exception):
    """Base class of every error Lepton raises on purpose."""


class ProtocolError(LeptonError, ValueError):
    """A payload, topic or id does not follow protocol v1.

    ``field`` names the offending part (e.g. ``"samples[3].x.shape"``); every decoder in
    :mod:`lepton.protocol` raises this and nothing else on bad input.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.detail = message


class ConfigError(LeptonError, ValueError):
    """A setting, path, spec or flag is wrong; raised at start-up, before anything is sent."""


class BrokerConnectionError(LeptonError, ConnectionError):
    """The broker could not be reached or refused the credentials."""

    def __init__(self, message: str, *, url: str | None = None, reason_code: int | None = None) -> None:
        super().__init__(message)
        self.url = url
        self.reason_code = reason_code


class ModelRejected(LeptonError):
    """A model package failed verification; the device keeps its current model.

    ``reason`` is a stable machine-readable code (see :data:`lepton.protocol.REJECT_REASONS`).
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.detail = message


class GateRefused(LeptonError):
    """The evaluation gate kept a newly trained model from being shipped."""

    def __init__(self, message: str, *, new_accuracy: float, deployed_accuracy: float | None) -> None:
        super().__init__(message)
        self.new_accuracy = new_accuracy
        self.deployed_accuracy = deployed_accuracy


# ------------------------------------------------------------------------------------------------
# device room (re-exported by lepton.device)
# ------------------------------------------------------------------------------------------------
class FrameError(LeptonError, ValueError):
    """One frame could not be preprocessed (bad shape, crop outside it); the agent skips and counts it."""


class SpoolFull(LeptonError):
    """``on_full="block"`` and no room appeared before the timeout (or the spool is shutting down)."""


# ------------------------------------------------------------------------------------------------
# cloud room (re-exported by lepton.cloud)
# ------------------------------------------------------------------------------------------------
class ExportError(LeptonError):
    """The model could not be exported, or the export does not match PyTorch."""


class DeliveryError(LeptonError):
    """A model could not be published or fetched through the broker."""


# ------------------------------------------------------------------------------------------------
# orchestration (lepton demo)
# ------------------------------------------------------------------------------------------------
class ChildCrashed(LeptonError):
    """A process ``lepton demo`` started (broker, worker or a device) died; not a usage error.

    ``name`` is the child (``"worker"``, ``"dev-0"``, ...), ``returncode`` its exit code (negative: the
    signal that killed it), ``log`` the file holding its output.
    """

    def __init__(self, name: str, returncode: int, log: object) -> None:
        super().__init__(f"the demo's {name} process exited with code {returncode}; see {log}")
        self.name = name
        self.returncode = returncode
        self.log = log


class RankZeroFailed(LeptonError):
    """Under DDP, a step that only global rank zero runs (export, registry, publish) failed there.

    Raised on the other ranks, so they stop instead of waiting; rank zero raises the original error.
    ``stage`` names the step, ``cause`` is rank zero's ``"Type: message"``, ``rank`` this process.
    """

    def __init__(self, stage: str, cause: str, *, rank: int) -> None:
        super().__init__(f"{stage} failed on global rank 0 (this is rank {rank}): {cause}")
        self.stage = stage
        self.cause = cause
        self.rank = rank
