"""The quarantine: raw payloads of dead-lettered messages, de-duplicated and bounded.

A hostile or broken device can replay junk without end; the quarantine must keep the evidence without
letting it fill the disk. Each payload is stored once, under the sha256 of its bytes
(``{device}-{sha256[:32]}.bin`` with its first report beside it as ``.json``), and admission is bounded
per device and in total, in bytes and in files. A payload over its budget is still dead-lettered (the
report is published, the message acknowledged) but not kept: its report says ``"quarantine": null``
and why.

:class:`QuarantineBudget` is the decision, with no I/O; :class:`Quarantine` adds the folder. Both are
owned by the ingest worker's writer thread; nothing else touches them.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

__all__ = ["Quarantine", "QuarantineBudget", "QuarantineLimits"]


@dataclass(frozen=True, kw_only=True)
class QuarantineLimits:
    #: bytes (payloads + reports) kept for one device, and for the whole fleet folder
    device_bytes: int = 64 * 1024 * 1024
    total_bytes: int = 1024 * 1024 * 1024
    #: files (payload + report count as one entry) kept in all
    total_entries: int = 100_000


class QuarantineBudget:
    """Which payloads to keep. ``admit(name, device, size)`` returns ``"new"``, ``"duplicate"`` (already
    kept: nothing to write) or the reason it is refused (``"device quota"``, ``"total quota"``,
    ``"entry limit"``)."""

    def __init__(self, limits: QuarantineLimits) -> None:
        self.limits = limits
        self.names: set[str] = set()
        self.by_device: dict[str, int] = {}
        self.total = 0
        self.refused = 0

    def record(self, name: str, device: str, size: int) -> None:
        """Count an entry that is already on disk (start-up scan)."""
        if name not in self.names:
            self.names.add(name)
            self.by_device[device] = self.by_device.get(device, 0) + size
            self.total += size

    def admit(self, name: str, device: str, size: int) -> str:
        if name in self.names:
            return "duplicate"
        lim = self.limits
        if len(self.names) >= lim.total_entries:
            verdict = "entry limit"
        elif self.by_device.get(device, 0) + size > lim.device_bytes:
            verdict = "device quota"
        elif self.total + size > lim.total_bytes:
            verdict = "total quota"
        else:
            self.record(name, device, size)
            return "new"
        self.refused += 1
        return verdict


def quarantine_name(device: str | None, payload: bytes | bytearray | memoryview) -> str:
    """``{device}-{sha256[:32]}.bin``: the same payload from the same device always gets the same name."""
    return f"{device or 'unknown'}-{hashlib.sha256(payload).hexdigest()[:32]}.bin"


class Quarantine:
    """``DIR/{fleet}/quarantine/`` behind a :class:`QuarantineBudget`.

    Use::

        q = Quarantine(path, QuarantineLimits())
        name, verdict = q.admit("cam-1", payload, report_size=400)   # decide (no I/O)
        q.write(name, payload, report_json); q.sync()                # then write, fsync the folder
    """

    def __init__(self, path: str | Path, limits: QuarantineLimits | None = None) -> None:
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.budget = QuarantineBudget(limits or QuarantineLimits())
        self._unwritten: set[str] = set()  # admitted, not yet on disk (a failed write is admitted again)
        self._scan()

    def _scan(self) -> None:
        for entry in os.scandir(self.path):
            if not entry.name.endswith(".bin") or entry.name.startswith("."):
                continue
            device = entry.name.rsplit("-", 1)[0] if "-" in entry.name else "unknown"
            size = entry.stat().st_size
            report = self.path / (entry.name[:-4] + ".json")
            if report.exists():  # a crash between the two writes leaves the payload alone
                size += report.stat().st_size
            self.budget.record(entry.name, device, size)

    def admit(self, device: str | None, payload: bytes | bytearray | memoryview, *,
              report_size: int = 0) -> tuple[str, str]:
        """``(name, verdict)``; write only when the verdict is ``"new"``."""
        name = quarantine_name(device, payload)
        if name in self._unwritten:
            return name, "new"
        verdict = self.budget.admit(name, device or "unknown", len(payload) + report_size)
        if verdict == "new":
            self._unwritten.add(name)
        return name, verdict

    def unwritten(self, name: str) -> bool:
        """``name`` was admitted as new and is not on disk yet (its write failed or has not run)."""
        return name in self._unwritten

    def write(self, name: str, payload: bytes | bytearray | memoryview, report: bytes) -> None:
        from lepton.cloud._dataset import write_atomic

        write_atomic(self.path / name, bytes(payload), sync_dir=False)
        write_atomic(self.path / (name[:-4] + ".json"), report, sync_dir=False)
        self._unwritten.discard(name)

    def sync(self) -> None:
        from lepton.cloud._dataset import fsync_dir

        fsync_dir(self.path)

    def usage(self) -> dict[str, int]:
        b = self.budget
        return {"entries": len(b.names), "bytes": b.total, "refused": b.refused}
