"""broker/add-user.sh: passwords never on a command line, no name reused, private files, no injection."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from lepton.testing import PROJECT_ROOT

SCRIPT = str(PROJECT_ROOT / "broker" / "add-user.sh")
SECRET = "s3cr3t-$(touch PWNED)'\";`touch PWNED2`:x"


@pytest.fixture
def files(tmp_path, require_mosquitto):
    """Password and ACL files in a folder of their own, and a mosquitto_passwd that logs its argv."""
    spy = tmp_path / "bin"
    spy.mkdir()
    real = shutil.which("mosquitto_passwd")
    (spy / "mosquitto_passwd").write_text(f'#!/bin/sh\nprintf "%s\\n" "$*" >> {tmp_path}/argv.log\n'
                                          f'exec {real} "$@"\n')
    (spy / "mosquitto_passwd").chmod(0o755)
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(PROJECT_ROOT / "broker" / "lepton.acl", etc / "lepton.acl")
    env = dict(os.environ, PATH=f"{spy}:{os.environ['PATH']}", LEPTON_PASSWD_FILE=str(etc / "lepton.passwd"),
               LEPTON_ACL_FILE=str(etc / "lepton.acl"))

    env.pop("LEPTON_PREFIX", None)

    def run(*args: str, stdin: str | None = None,
            prefix_env: str | None = None) -> subprocess.CompletedProcess:
        extra = {"LEPTON_PREFIX": prefix_env} if prefix_env is not None else {}
        return subprocess.run(["bash", SCRIPT, *args], env={**env, **extra}, cwd=tmp_path, input=stdin,
                              text=True, capture_output=True, timeout=60)

    run.etc, run.log, run.root = etc, tmp_path / "argv.log", tmp_path  # type: ignore[attr-defined]
    return run


def test_the_password_reaches_mosquitto_passwd_neither_on_its_command_line_nor_in_clear(files):
    from_stdin = files("device", "f1", "cam-1", "-", stdin=SECRET + "\n")
    as_argument = files("device", "f1", "cam-2", "other-" + SECRET)

    assert from_stdin.returncode == 0, from_stdin.stderr
    assert as_argument.returncode == 0, as_argument.stderr
    assert from_stdin.stdout.strip() == f"mqtt://cam-1:{SECRET}@<broker-host>:1883"
    argv = files.log.read_text()
    assert argv.count("-U") == 2 and SECRET not in argv          # mosquitto_passwd -U FILE only
    passwd = (files.etc / "lepton.passwd").read_text()
    assert passwd.startswith("cam-1:$7$") and "\ncam-2:$7$" in passwd and SECRET not in passwd
    assert not list(files.root.glob("PWNED*"))                     # the password is data, never code


def test_every_file_it_creates_is_private_and_no_temporary_file_is_left(files):
    result = files("worker", "f1", "ingest-1")

    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in files.etc.iterdir()) == ["lepton.acl", "lepton.passwd"]  # no passwd.tmp
    assert (files.etc / "lepton.passwd").stat().st_mode & 0o777 == 0o600


def test_an_existing_name_is_refused_so_a_device_never_inherits_a_workers_rights(files):
    assert files("worker", "f1", "ingest-1").returncode == 0
    before = {p.name: p.read_bytes() for p in files.etc.iterdir()}

    again = files("device", "f1", "ingest-1", "attacker-chosen")

    assert again.returncode == 2
    assert "already exists" in again.stderr and "ingest-1" in again.stderr
    assert {p.name: p.read_bytes() for p in files.etc.iterdir()} == before


def test_a_name_with_grants_but_no_password_is_refused_too(files):
    with (files.etc / "lepton.acl").open("a") as acl:
        acl.write("\nuser cam-9\ntopic read lepton/f1/devices/+/samples\n")

    result = files("device", "f1", "cam-9")

    assert result.returncode == 2 and "already has grants" in result.stderr


@pytest.mark.parametrize("args", [
    ("device", "f1", "$(touch PWNED)"), ("device", "f1;touch PWNED", "cam-1"), ("device", "f1", "a/b"),
    ("device", "f1", "cam\nuser evil"), ("root", "f1", "cam-1"), ("device", "f1"),
    ("--prefix", "a b", "device", "f1", "cam-1"), ("--prefix", "$SYS", "device", "f1", "cam-1"),
    ("--prefix", "a/#", "device", "f1", "cam-1"), ("--prefix", "/a", "device", "f1", "cam-1"),
    ("--prefix", "a/", "device", "f1", "cam-1"), ("--prefix", "", "device", "f1", "cam-1"),
    ("--prefix", "x\nuser evil", "device", "f1", "cam-1"), ("--prefix",),
])
def test_bad_roles_and_ids_are_refused_before_anything_is_written(files, args):
    result = files(*args)

    assert result.returncode == 2
    assert not (files.etc / "lepton.passwd").exists()
    assert (files.etc / "lepton.acl").read_text() == (PROJECT_ROOT / "broker" / "lepton.acl").read_text()
    assert not list(Path(files.root).glob("PWNED*"))


def test_an_empty_password_on_stdin_is_refused(files):
    result = files("device", "f1", "cam-1", "-", stdin="\n")

    assert result.returncode == 2 and "empty password" in result.stderr


def _block(acl_text: str, name: str) -> list[str]:
    return acl_text.split(f"\nuser {name}\n", 1)[1].split("\n\n", 1)[0].strip().splitlines()


def test_prefix_grants_the_users_topics_under_that_prefix_only(files):
    flag = files("--prefix", "acme/site-3/lepton", "device", "f1", "cam-1")
    from_env = files("trainer", "f1", "t1", prefix_env="env/site")
    flag_beats_env = files("--prefix", "acme/site-3/lepton", "viewer", "f1", "v1", prefix_env="env/site")

    assert (flag.returncode, from_env.returncode, flag_beats_env.returncode) == (0, 0, 0), flag.stderr
    acl = (files.etc / "lepton.acl").read_text()
    device = _block(acl, "cam-1")
    assert "topic write acme/site-3/lepton/f1/devices/cam-1/samples" in device
    assert "topic read acme/site-3/lepton/f1/models/#" in device
    assert all(line.split(" ", 2)[2].startswith("acme/site-3/lepton/f1/") for line in device)
    assert _block(acl, "t1") == ["topic readwrite env/site/f1/models/#"]
    assert all(line.split(" ", 2)[2].startswith("acme/site-3/lepton/f1/") for line in _block(acl, "v1"))
