"""lepton._fs: the one atomic-write helper (issue 11, item 6), and the writers that use it.

Durability is checked with strace: every replaced file is fsynced under its temporary name before the
rename, and its directory after it. A failed write is a real one (the file-size limit makes write()
fail with EFBIG in a child process): the old file stays whole and no temporary file is left.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lepton._fs import atomic_file, write_atomic
from tests.conftest import missing_component

_TMP = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def _strace(script: str, *args: str) -> list[str]:
    """Run ``script`` under strace; return its fsync and rename calls, in order, with fd paths (-y)."""
    if shutil.which("strace") is None:
        missing_component("strace not found (apt-get install -y strace): it shows the fsyncs of atomic writes")
    out = subprocess.run(
        ["strace", "-f", "-qq", "-y", "-s", "512", "-e", "trace=fsync,fdatasync,rename,renameat,renameat2",
         sys.executable, "-c", textwrap.dedent(script), *args],
        capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [line for line in out.stderr.splitlines() if re.search(r"\b(fsync|fdatasync|rename\w*)\(", line)]


def _syscall(line: str) -> str:
    return re.match(r"(?:\[pid\s+\d+\]\s+)?(\w+)\(", line).group(1)


def _fsync_of(line: str, path: Path) -> bool:
    return re.search(rf"fsync\(\d+<{re.escape(str(path))}>\)", line) is not None


def _durable_replacements(calls: list[str]) -> dict[Path, int]:
    """Target file -> how many times it was replaced with: fsync(tmp), rename(tmp -> target), fsync(dir)."""
    done: dict[Path, int] = {}
    for i, line in enumerate(calls):
        m = re.search(r'rename\w*\((?:\w+, )?"([^"]+)", (?:\w+, )?"([^"]+)"', line)
        if not m:
            continue
        src, dst = Path(m.group(1)), Path(m.group(2))
        t = _TMP.match(src.name)
        if not t or t.group("name") != dst.name or src.parent != dst.parent:
            continue
        synced_before = any(_fsync_of(c, src) for c in calls[:i])
        synced_dir_after = any(_fsync_of(c, dst.parent) for c in calls[i:])
        if synced_before and synced_dir_after:
            done[dst] = done.get(dst, 0) + 1
    return done


def test_write_atomic_fsyncs_the_file_then_renames_then_fsyncs_the_directory(tmp_path):
    target = tmp_path.resolve() / "state.json"
    calls = _strace(
        """
        import sys
        from lepton._fs import write_atomic
        write_atomic(sys.argv[1], b"old")
        write_atomic(sys.argv[1], b"new", mode=0o600)
        """,
        str(target),
    )

    assert _durable_replacements(calls) == {target: 2}, calls
    assert target.read_bytes() == b"new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_without_fsync_the_replacement_is_atomic_but_not_synced(tmp_path):
    target = tmp_path.resolve() / "model.v3.onnx"
    calls = _strace(
        """
        import sys
        from lepton._fs import write_atomic
        write_atomic(sys.argv[1], b"staged", fsync=False)
        """,
        str(target),
    )

    assert not [c for c in calls if _syscall(c) in ("fsync", "fdatasync")], calls
    assert [c for c in calls if _syscall(c).startswith("rename") and str(target) in c], calls
    assert target.read_bytes() == b"staged"


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "passwd"
    target.write_bytes(b"old contents\n")
    # A real failure of write(2): the file-size limit (RLIMIT_FSIZE) makes it fail with EFBIG.
    script = textwrap.dedent(
        """
        import errno, resource, signal, sys
        from lepton._fs import write_atomic
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            write_atomic(sys.argv[1], b"x" * 100_000, mode=0o600)
        except OSError as exc:
            assert exc.errno == errno.EFBIG, exc
            print("failed as expected")
        else:
            sys.exit("the write did not fail")
        """
    )
    out = subprocess.run([sys.executable, "-c", script, str(target)], capture_output=True, text=True,
                         timeout=60)

    assert out.returncode == 0 and "failed as expected" in out.stdout, out.stderr
    assert target.read_bytes() == b"old contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["passwd"]


def test_an_exception_inside_atomic_file_leaves_the_old_file_and_no_temporary_file(tmp_path):
    target = tmp_path / "deployed.json"
    target.write_bytes(b"{}")

    with pytest.raises(RuntimeError, match="serializer broke"), atomic_file(target) as fh:
        fh.write(b'{"half": ')
        raise RuntimeError("serializer broke")

    assert target.read_bytes() == b"{}"
    assert [p.name for p in tmp_path.iterdir()] == ["deployed.json"]


def test_mode_is_exact_from_the_first_byte_and_the_default_follows_the_umask(tmp_path):
    seen: list[int] = []
    with atomic_file(tmp_path / "secret", mode=0o600) as fh:
        seen.append(os.stat(fh.name).st_mode & 0o777)  # the temporary file, before any byte is written
        fh.write(b"k")
    old = os.umask(0o022)
    try:
        plain = write_atomic(tmp_path / "plain", b"p")
    finally:
        os.umask(old)

    assert seen == [0o600]
    assert (tmp_path / "secret").stat().st_mode & 0o777 == 0o600
    assert plain.stat().st_mode & 0o777 == 0o644


def test_registry_create_fsyncs_every_file_it_writes_and_the_high_water_mark(tmp_path):
    root = tmp_path.resolve() / "data"
    calls = _strace(
        """
        import sys
        from lepton.cloud import Registry
        reg = Registry(sys.argv[1])
        for _ in range(2):
            reg.create("digits", model=b"int8 bytes", fp32=b"fp32 bytes", input_spec={"shape": [1]},
                       labels=["a"], pipeline={"hash": "p"}, metrics={}, quantization="int8", parent=None,
                       report={"fleet": "f"})
        """,
        str(root),
    )

    done = _durable_replacements(calls)
    model = root / "models" / "digits"
    for version in ("1", "2"):
        for name in ("model.onnx", "model.fp32.onnx", "manifest.json", "report.json"):
            assert done.get(model / version / name) == 1, (version, name, calls)
    # The number is durable before the version is written: version 2 is never handed out twice.
    assert done.get(model / "high_water") == 2, calls


def test_the_model_store_and_the_broker_credentials_are_written_durably(tmp_path):
    root = tmp_path.resolve()
    calls = _strace(
        """
        import sys
        from pathlib import Path
        from lepton.broker._acl import add_acl_user, role_grants
        from lepton.broker._auth import write_password_file
        from lepton.device._modelstore import ModelStore
        root = Path(sys.argv[1])
        write_password_file(root / "broker" / "passwd", {"cam-1": "pw"})
        add_acl_user(root / "broker" / "acl", "cam-1", role_grants("device", "f1", "cam-1"))
        store = ModelStore(root / "store", "digits")
        store.stage(3, b"onnx bytes")
        store.commit(b"manifest", 3)
        """,
        str(root),
    )

    done = _durable_replacements(calls)
    assert done.get(root / "broker" / "passwd") == 1, calls
    assert done.get(root / "broker" / "acl") == 1, calls
    assert done.get(root / "store" / "digits.manifest") == 1, calls
    # The staged ONNX file is renamed without fsync, then fsynced by commit() before the manifest names it.
    onnx = root / "store" / "digits.v3.onnx"
    assert onnx not in done
    commit = next(i for i, c in enumerate(calls) if re.search(r"rename\w*\(.*digits\.manifest\"", c))
    assert any(f"<{onnx}>" in c and _syscall(c) == "fsync" for c in calls[:commit]), calls
    for path in (root / "broker" / "passwd", root / "broker" / "acl", root / "store" / "digits.manifest"):
        assert path.stat().st_mode & 0o777 == 0o600, path
