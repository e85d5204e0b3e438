"""The last good model on disk, so a device that restarts without a broker serves at once.

One file per model, ``{store_dir}/{model}.lepton-model``, replaced atomically (write a temporary
file, fsync, ``os.replace``, fsync the directory): a crash leaves either the old or the new package,
never a mix. The file holds the retained manifest payload exactly as received (so its signature can
be checked again at start-up) followed by the ONNX bytes::

    b"LEPTONPKG1\\n" | uint32 big-endian manifest length | manifest payload | onnx bytes

Nothing read back is trusted: the runtime verifies it like a package from the broker.
"""

from __future__ import annotations

import logging
import os
import struct
import tempfile
from pathlib import Path

from lepton.protocol import validate_id

log = logging.getLogger(__name__)

MAGIC = b"LEPTONPKG1\n"
_LEN = struct.Struct(">I")


class ModelStore:
    """Keeps the last verified package of one model in ``directory``."""

    def __init__(self, directory: str | Path, model: str) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{validate_id(model, kind='model')}.lepton-model"

    def save(self, manifest_payload: bytes, data: bytes) -> Path:
        """Write the package atomically; return its path."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name + ".", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC)
                f.write(_LEN.pack(len(manifest_payload)))
                f.write(manifest_payload)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(self.directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError:  # some filesystems refuse fsync on a directory; the rename is still atomic
            pass
        return self.path

    def load(self) -> tuple[bytes, bytes] | None:
        """Return ``(manifest_payload, onnx_bytes)``, or None when there is no readable package."""
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read the stored model %s: %s", self.path, exc)
            return None
        head = len(MAGIC) + _LEN.size
        if len(blob) < head or not blob.startswith(MAGIC):
            log.warning("ignoring %s: not a Lepton model package", self.path)
            return None
        (n,) = _LEN.unpack_from(blob, len(MAGIC))
        if head + n > len(blob):
            log.warning("ignoring %s: truncated", self.path)
            return None
        return blob[head:head + n], blob[head + n:]

    def clear(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
