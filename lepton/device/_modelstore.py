"""The last good model on disk, so a device that restarts without a broker serves at once.

Two kinds of files per model in ``store_dir``:

* ``{model}.v{version}.onnx`` — the ONNX bytes of a version, written before it is loaded, because
  ONNX Runtime builds a session from a file path almost without holding Python's GIL (from bytes
  it holds it for milliseconds on a large model, which would stall inference during a swap);
* ``{model}.manifest`` — the retained manifest payload exactly as received (so its signature can be
  checked again at start-up). Replacing it is the commit point: it names the version whose ``.onnx``
  is the last good model. Older ``.onnx`` files are removed after each commit.

Every write goes through :func:`lepton._fs.write_atomic` (a temporary file, fsync, ``os.replace``, fsync
of the directory; :meth:`stage` defers the fsyncs to :meth:`commit`): a crash leaves the
old or the new model, never a mix. Nothing read back is trusted: the runtime verifies it like a
package from the broker.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

from lepton._fs import atomic_file, write_atomic
from lepton.errors import ModelRejected
from lepton.protocol import parse_manifest, validate_id

log = logging.getLogger(__name__)


class ModelStore:
    """Keeps the last verified package of one model in ``directory``."""

    def __init__(self, directory: str | Path, model: str) -> None:
        self.directory = Path(directory)
        self.model = validate_id(model, kind="model")
        self.manifest_path = self.directory / f"{self.model}.manifest"
        self._onnx_name = re.compile(rf"^{re.escape(self.model)}\.v(\d+)\.onnx$")

    def onnx_path(self, version: int) -> Path:
        return self.directory / f"{self.model}.v{int(version)}.onnx"

    # -- writing ----------------------------------------------------------------------------------
    def stage(self, version: int, data: bytes | Sequence[bytes]) -> Path:
        """Write a version's ONNX bytes (not yet the last good model); return the file's path.

        ``data`` may be the model's parts in order (a package's ``parts``): they are written one
        after the other, never joined. Not fsynced yet: :meth:`commit` does it, so a swap does not
        wait for the disk.
        """
        path = self.onnx_path(version)
        if isinstance(data, (bytes, bytearray, memoryview)):
            self._write_atomic(path, data, durable=False)
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        with atomic_file(path, mode=0o600, fsync=False) as fh:
            _write_parts(fh.fileno(), data)
        return path

    def commit(self, manifest_payload: bytes, version: int) -> None:
        """Make the staged ``version`` the last good model (durably), then remove older files."""
        with open(self.onnx_path(version), "rb") as f:
            os.fsync(f.fileno())
        self._write_atomic(self.manifest_path, manifest_payload)
        for path in self._onnx_files():
            if path != self.onnx_path(version):
                self._unlink(path)

    def discard(self, version: int) -> None:
        """Remove a staged version that did not load (unless it is the committed one)."""
        if self.committed_version() != version:
            self._unlink(self.onnx_path(version))

    def save(self, manifest_payload: bytes, data: bytes) -> Path:
        """Stage and commit in one go (used when the bytes are already verified)."""
        manifest, _, _ = parse_manifest(manifest_payload)
        path = self.stage(manifest.version, data)
        self.commit(manifest_payload, manifest.version)
        return path

    # -- reading ----------------------------------------------------------------------------------
    def committed_version(self) -> int | None:
        try:
            return parse_manifest(self.manifest_path.read_bytes())[0].version
        except (OSError, ModelRejected):
            return None

    def load(self) -> tuple[bytes, bytes, Path] | None:
        """Return ``(manifest_payload, onnx_bytes, onnx_path)``, or None when nothing usable is stored."""
        try:
            payload = self.manifest_path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the stored manifest %s: %s", self.manifest_path, exc)
            return None
        try:
            version = parse_manifest(payload)[0].version
        except ModelRejected as exc:
            log.warning("ignoring the stored manifest %s: %s", self.manifest_path, exc)
            return None
        path = self.onnx_path(version)
        try:
            return payload, path.read_bytes(), path
        except OSError as exc:
            log.warning("the stored manifest names v%d but %s is unreadable: %s", version, path, exc)
            return None

    def clear(self) -> None:
        self._unlink(self.manifest_path)
        for path in self._onnx_files():
            self._unlink(path)

    # -- helpers ----------------------------------------------------------------------------------
    def _onnx_files(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if self._onnx_name.match(p.name)]
        except FileNotFoundError:
            return []

    def _write_atomic(self, path: Path, data: bytes | bytearray | memoryview, *,
                      durable: bool = True) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        write_atomic(path, data, mode=0o600, fsync=durable)  # 0600 as before (mkstemp's mode)

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


_IOV_MAX = max(16, os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024)


def _write_parts(fd: int, parts: Sequence[bytes]) -> None:
    """Write ``parts`` one after the other with as few ``writev`` calls as the system allows: one
    system call (and one release of the GIL) for a whole model, not one per chunk."""
    views = [memoryview(p) for p in parts if len(p)]
    start = 0
    while start < len(views):
        written = os.writev(fd, views[start:start + _IOV_MAX])
        while start < len(views) and written >= len(views[start]):
            written -= len(views[start])
            start += 1
        if written:  # a short write stopped inside a part
            views[start] = views[start][written:]
