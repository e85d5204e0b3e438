"""Broker passwords never reach a command line (/proc/PID/cmdline is readable by every local user).

The real `lepton worker` and `lepton device` (and the worker's `lepton train` child, and the demo's
children) run against real brokers with the password in a 0600 file or the environment; every process's
cmdline is read from /proc and must not hold it. Unsafe password files are refused (exit 2, one line).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lepton.errors import ConfigError
from lepton.protocol import BrokerURL, child_environment, read_password_file, resolve_broker

CLI = [sys.executable, "-m", "lepton"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("LEPTON_BROKER", "LEPTON_PASSWORD",
                                                             "LEPTON_PASSWORD_FILE")}
    return {**env, **extra}


def password_file(path: Path, password: str, mode: int = 0o600) -> Path:
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def split(url: str) -> tuple[str, str]:
    """(URL without the password, password)."""
    parsed = BrokerURL.parse(url)
    assert parsed.password
    return str(parsed), parsed.password


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def descendants(pid: int) -> list[int]:
    """Every living process below ``pid`` (children, grandchildren, ...)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def stop(proc: subprocess.Popen, timeout: float = 30) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ------------------------------------------------------------------------------------------------
# the rules, without I/O beyond one small file
# ------------------------------------------------------------------------------------------------
def test_password_sources_in_order_file_env_url(tmp_path):
    pw = password_file(tmp_path / "pw", "from-file")
    url = "mqtt://cam-1:from-url@h:1883"
    assert resolve_broker(url, environ={}).url.password == "from-url"
    assert resolve_broker(url, environ={"LEPTON_PASSWORD": "from-env"}).url.password == "from-env"
    assert resolve_broker(url, password_file=pw, environ={"LEPTON_PASSWORD": "e"}).url.password == "from-file"
    assert resolve_broker("mqtt://cam-1@h:1883", environ={"LEPTON_PASSWORD_FILE": str(pw)}).url.password \
        == "from-file"
    from_env = resolve_broker(None, environ={"LEPTON_BROKER": url})
    assert from_env.url.password == "from-url" and from_env.warning is None  # env: no warning
    assert resolve_broker(None, environ={}) is None
    # the password in an argv URL still works (compatibility) but says why it should not be there
    warned = resolve_broker(url, environ={})
    assert "visible to every local user" in warned.warning and "from-url" not in warned.warning
    assert resolve_broker("mqtt://cam-1@h:1883", environ={"LEPTON_PASSWORD": "x"}).warning is None
    with pytest.raises(ConfigError, match="names no user"):
        resolve_broker("mqtt://h:1883", environ={"LEPTON_PASSWORD": "x"})


def test_secret_url_round_trips_any_password():
    url = BrokerURL(host="h", port=1, username="u/1", password="p@:/ %#?ü")
    assert BrokerURL.parse(url.secret_url()) == url
    assert "p@" not in str(url)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o620, 0o660])
def test_a_password_file_open_to_group_or_others_is_refused(tmp_path, mode):
    path = password_file(tmp_path / "pw", "secret", mode)
    with pytest.raises(ConfigError, match=f"chmod 600 {path}") as info:
        read_password_file(path)
    assert "secret" not in str(info.value) and "\n" not in str(info.value)


def test_unusable_password_files(tmp_path):
    assert read_password_file(password_file(tmp_path / "ok", "pw with spaces")) == "pw with spaces"
    assert read_password_file(password_file(tmp_path / "ok2", "only\nthe first line")) == "only"
    for path, match in [(tmp_path / "missing", "cannot read"), (tmp_path, "not a regular file"),
                        (password_file(tmp_path / "empty", ""), "empty")]:
        with pytest.raises(ConfigError, match=match):
            read_password_file(path)
    big = password_file(tmp_path / "big", "x" * 5000)
    with pytest.raises(ConfigError, match="only the password"):
        read_password_file(big)


def test_child_environment_carries_exactly_the_given_credentials():
    env = child_environment(BrokerURL.parse("mqtt://w:pw@h:1"),
                            {"PATH": "/bin", "LEPTON_PASSWORD": "other", "LEPTON_PASSWORD_FILE": "/x"})
    assert env == {"PATH": "/bin", "LEPTON_BROKER": "mqtt://w:pw@h:1"}


# ------------------------------------------------------------------------------------------------
# every command with --broker: an unsafe file is refused with exit 2 and one line
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["device", "--fleet", "f", "--id", "d1", "--source", "digits"],
    ["worker", "--fleet", "f", "--data", "{tmp}"],
    ["status", "--fleet", "f"],
    ["train", "--data", "{tmp}", "--fleet", "f", "--model", "m", "--publish"],
    ["models", "publish", "m", "--data", "{tmp}"],
    ["models", "fetch", "m", "--fleet", "f"],
    ["models", "rollback", "m", "--to", "1", "--data", "{tmp}", "--publish"],
    ["demo"],
], ids=lambda a: "-".join(a[:2]))
def test_every_command_refuses_a_world_readable_password_file(tmp_path, argv):
    path = password_file(tmp_path / "pw", "s3cret-value", 0o644)
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    result = subprocess.run([*CLI, *args, "--broker", "mqtt://u@127.0.0.1:1", "--password-file", str(path)],
                            capture_output=True, text=True, timeout=120, env=_env())
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"chmod 600 {path}" in lines[0], result.stderr
    assert "s3cret-value" not in result.stderr + result.stdout


def test_a_password_in_the_broker_flag_still_works_with_a_warning(amqtt_broker, fleet):
    url = amqtt_broker.url("viewer", "viewer-1", fleet=fleet)
    bare, password = split(url)
    warned = subprocess.run([*CLI, "status", "--broker", url, "--fleet", fleet, "--timeout", "1", "--json"],
                            capture_output=True, text=True, timeout=60, env=_env())
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr.count("warning:") == 1 and "--password-file" in warned.stderr
    assert password not in warned.stderr
    for env in (_env(LEPTON_PASSWORD=password), _env(LEPTON_BROKER=url)):
        argv = ["status", "--fleet", fleet, "--timeout", "1", "--json"]
        argv += ["--broker", bare] if "LEPTON_PASSWORD" in env else []
        quiet = subprocess.run([*CLI, *argv], capture_output=True, text=True, timeout=60, env=env)
        assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
    refused = subprocess.run([*CLI, "status", "--broker", bare, "--fleet", fleet, "--timeout", "1"],
                             capture_output=True, text=True, timeout=60, env=_env(LEPTON_PASSWORD="wrong"))
    assert refused.returncode == 3, refused.stderr


# ------------------------------------------------------------------------------------------------
# real processes: no password in any cmdline, the training child's included
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_worker_device_and_training_child_keep_passwords_off_their_command_lines(broker, fleet, tmp_path):
    from lepton.cloud._delivery import fetch_model
    from lepton.protocol import generate_keypair, load_public_key

    private, public = generate_keypair(tmp_path / "keys")
    worker_bare, worker_pw = split(broker.url("worker", "w1", fleet=fleet))
    device_bare, device_pw = split(broker.url("device", "dev-1", fleet=fleet))
    # the training child has a user of its own (client ids are bound to users): its password too
    trainer_bare, trainer_pw = split(broker.url("trainer", "t1", fleet=fleet))
    worker_file = password_file(tmp_path / "w.pw", worker_pw)
    worker = subprocess.Popen(
        [*CLI, "worker", "--broker", worker_bare, "--password-file", str(worker_file),
         "--fleet", fleet, "--data", str(tmp_path / "data"), "--name", "w1", "--batch-ms", "20",
         "--train-every", "150", "--model", "m1", "--key", str(private), "--train-publish",
         "--train-arg=--epochs=2", "--train-arg=--quiet", "--quiet", "--train-broker", trainer_bare,
         "--train-password-file", str(password_file(tmp_path / "t.pw", trainer_pw))],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env())
    device = None
    try:
        device = subprocess.Popen(
            [*CLI, "device", "--broker", device_bare, "--fleet", fleet, "--id", "dev-1", "--source", "digits",
             "--limit", "200", "--rate", "400", "--spool", str(tmp_path / "spool"), "--quiet", "--json"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(LEPTON_PASSWORD=device_pw))
        seen: dict[int, str] = {}
        child_env: dict[str, str] = {}
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not child_env:
            for pid in [worker.pid, device.pid, *descendants(worker.pid), *descendants(device.pid)]:
                line = cmdline(pid)
                if line:
                    seen[pid] = line
                if " train " in line and pid != worker.pid:
                    child_env = environ(pid)
            assert worker.poll() is None, worker.stderr.read().decode()
            time.sleep(0.05)
        out, err = device.communicate(timeout=120)
        assert device.returncode == 0, err.decode()
        # The training child publishes before the worker stops: stopping the worker stops its child too.
        deadline = time.monotonic() + 240
        while any(" train " in cmdline(pid) for pid in descendants(worker.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if device is not None and device.poll() is None:
            device.kill()
        children = descendants(worker.pid)
        stop(worker)
    # the training child ran; it got the URL in its environment, never in its argv
    assert child_env, f"no `lepton train` child seen; processes: {seen}"
    train_lines = [line for line in seen.values() if " train " in line]
    assert train_lines and all("--publish" in line and "--broker" not in line for line in train_lines)
    assert BrokerURL.parse(child_env["LEPTON_BROKER"]).password == trainer_pw
    assert "LEPTON_PASSWORD" not in child_env and "LEPTON_PASSWORD_FILE" not in child_env
    assert len(seen) >= 3  # worker, device, training child (at least)
    for pid, line in seen.items():
        assert worker_pw not in line and device_pw not in line and trainer_pw not in line, (pid, line)
    # ...and with those credentials it published the model it trained
    deadline = time.monotonic() + 240
    while any(cmdline(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    log = (tmp_path / "data" / fleet / "train.log").read_text()
    package = fetch_model(broker.url("viewer", "viewer-1", fleet=fleet), fleet, "m1",
                          load_public_key(public), timeout=30)
    assert package.manifest.version >= 1, log


@pytest.mark.slow
def test_demo_children_get_their_credentials_in_the_environment(tmp_path):
    demo = subprocess.Popen([*CLI, "demo", "--devices", "2", "--duration", "60", "--workdir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=_env(),
                            start_new_session=True)
    try:
        lines: dict[int, str] = {}
        passwords: set[str] = set()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(passwords) < 3:  # the worker and both devices
            for pid in descendants(demo.pid):
                line = cmdline(pid)
                url = environ(pid).get("LEPTON_BROKER")
                if line:
                    lines[pid] = line
                if url and (" worker " in line or " device " in line):
                    passwords.add(BrokerURL.parse(url).password)
            assert demo.poll() is None, demo.stderr.read().decode()
            time.sleep(0.1)
    finally:
        stop(demo, timeout=60)
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    assert len(passwords) == 3 and None not in passwords, lines
    for pid, line in lines.items():
        assert not any(p in line for p in passwords), (pid, line)
