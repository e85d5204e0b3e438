"""Atomic, durable file replacement: the one helper the dataset, registry, model store and broker use.

A file is replaced by writing a temporary file in the same directory, fsyncing it, renaming it over
the target and fsyncing the directory, so after a crash or a power cut the target holds the old bytes
or the new ones, never a mix, and once the call returns the new bytes survive a power cut. A failed
write removes its temporary file and leaves the target as it was.

Temporary files are named ``.{name}.{random}.tmp``: hidden from readers that skip dot files (the
dataset's), and unique, so two writers of one file never write into each other's temporary file
(the last rename wins, whole).

Standard library only: ``lepton.device`` imports it.

>>> import tempfile, pathlib
>>> d = pathlib.Path(tempfile.mkdtemp())
>>> write_atomic(d / "state.json", b"{}", mode=0o600).read_bytes()
b'{}'
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "fsync_dir", "write_atomic"]

#: errno values of a filesystem that cannot fsync a directory (some FUSE and network filesystems):
#: the rename is still atomic there, only its durability is up to the filesystem.
_DIR_FSYNC_UNSUPPORTED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP})


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory, so a rename, creation or unlink inside it survives a power cut."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _create_temp(path: Path, mode: int | None) -> tuple[int, Path]:
    # O_EXCL: never reuse a file someone else is writing. Without ``mode`` the usual 0666 & ~umask,
    # as open() would give the target (mkstemp's 0600 would silently tighten registry files).
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, flags, 0o600 if mode is not None else 0o666)
        except FileExistsError:
            continue
        if mode is not None:
            os.fchmod(fd, mode)  # exactly ``mode``, whatever the umask; never wider, not even briefly
        return fd, tmp


@contextlib.contextmanager
def atomic_file(
    path: str | os.PathLike[str], *, mode: int | None = None, fsync: bool = True, sync_dir: bool = True
) -> Iterator[BinaryIO]:
    """Yield a binary file that replaces ``path`` when the ``with`` block ends without an exception.

    ``mode`` (e.g. ``0o600``) is set on the temporary file before any byte is written. ``fsync=False``
    skips both fsyncs (the rename stays atomic; the caller makes it durable later). ``sync_dir=False``
    leaves only the directory fsync to the caller, who writes several files and syncs their folder once.
    On an exception the temporary file is removed and ``path`` is untouched.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "model.bin"
    >>> with atomic_file(target) as fh:
    ...     _ = fh.write(b"weights")
    >>> target.read_bytes()
    b'weights'
    """
    path = Path(path)
    fd, tmp = _create_temp(path, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    if fsync and sync_dir:
        fsync_dir(path.parent)


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes | bytearray | memoryview,
    *,
    mode: int | None = None,
    fsync: bool = True,
    sync_dir: bool = True,
) -> Path:
    """Replace ``path`` by ``data`` atomically and durably (see :func:`atomic_file`); return the path."""
    with atomic_file(path, mode=mode, fsync=fsync, sync_dir=sync_dir) as fh:
        fh.write(data)
    return Path(path)
