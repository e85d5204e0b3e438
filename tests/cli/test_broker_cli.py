"""lepton broker as a real subprocess: start, connect with the printed URL, SIGINT, exit 0."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lepton.broker import free_port
from lepton.errors import BrokerConnectionError
from lepton.protocol import BrokerURL, Topics, connect, new_client
from tests.broker._mqtt import Inbox

START = 60.0  # seconds to wait for the broker's first line (imports + argon2 on a shared machine)


class BrokerProcess:
    """``lepton broker ARGS`` in a subprocess, with its stdout lines readable as they come."""

    def __init__(self, *args: str, cwd: Path) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, "-m", "lepton", "broker", *args], cwd=cwd, env=env,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def first_line(self) -> str:
        try:
            line = self.lines.get(timeout=START)
        except queue.Empty:
            self.proc.kill()
            raise AssertionError(f"no output from lepton broker: {self.proc.communicate()[1]}") from None
        assert line is not None, f"lepton broker exited: {self.proc.wait()} {self.proc.stderr.read()}"
        return line

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        return code, self.proc.stderr.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def run_broker(tmp_path):
    started: list[BrokerProcess] = []

    def start(*args: str) -> BrokerProcess:
        process = BrokerProcess(*args, cwd=tmp_path)
        started.append(process)
        return process

    yield start
    for process in started:
        process.stop()


def round_trip(url: str, fleet: str) -> bytes:
    topics = Topics(fleet=fleet)
    with Inbox(url) as inbox:
        assert inbox.subscribe(topics.telemetry("cam-1"))
        inbox.publish(topics.telemetry("cam-1"), b'{"v":1}')
        return inbox.get().payload


def test_first_start_creates_credentials_prints_the_url_once_and_stops_cleanly(run_broker, tmp_path, fleet):
    broker = run_broker("--port", "0", "--json")

    report = json.loads(broker.first_line())
    url = BrokerURL.parse(report["url"])
    assert (url.host, url.port, url.username) == ("127.0.0.1", report["port"], "lepton")
    assert url.password and report["host"] == "127.0.0.1"
    assert round_trip(report["url"], fleet) == b'{"v":1}'
    code, err = broker.interrupt()
    assert code == 0, err
    assert "stopped" in err
    passwd = tmp_path / ".lepton" / "broker" / "passwd"
    assert passwd.stat().st_mode & 0o777 == 0o600
    assert url.password not in passwd.read_text()  # hashed, never stored in clear

    again = run_broker("--port", "0", "--json")
    second = json.loads(again.first_line())
    assert "@" not in second["url"]  # the password is shown once only
    assert round_trip(report["url"].replace(str(report["port"]), str(second["port"])), fleet) == b'{"v":1}'
    assert again.interrupt()[0] == 0


def test_sigterm_stops_the_broker_with_exit_code_zero(run_broker):
    broker = run_broker("--port", "0")
    url = broker.first_line()  # without --json: the URL alone on stdout
    assert url.startswith("mqtt://lepton:")

    broker.proc.send_signal(signal.SIGTERM)

    assert broker.proc.wait(30) == 0


def test_added_users_connect_and_wrong_passwords_are_refused(run_broker, tmp_path, fleet):
    data = str(tmp_path / "state")
    added = subprocess.run([sys.executable, "-m", "lepton", "broker", "--data", data, "--add-user",
                            "cam-7:p@ss:word", "--role", "admin", "--json"], capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr
    user_url = json.loads(added.stdout)["url"]
    assert BrokerURL.parse(user_url).password == "p@ss:word"
    port = free_port()
    broker = run_broker("--data", data, "--port", str(port), "--json")
    assert json.loads(broker.first_line())["url"] == f"mqtt://127.0.0.1:{port}"  # a user exists: none made

    url = user_url.replace(":1883", f":{port}")
    assert round_trip(url, fleet) == b'{"v":1}'
    wrong = BrokerURL.parse(url).with_credentials("cam-7", "nope")
    with pytest.raises(BrokerConnectionError):
        connect(new_client(wrong, client_id="cam-7"), wrong)
    anonymous = BrokerURL.parse(f"mqtt://127.0.0.1:{port}")
    with pytest.raises(BrokerConnectionError):
        connect(new_client(anonymous, client_id="anon"), anonymous)
    assert broker.interrupt()[0] == 0


def test_allow_anonymous_admits_clients_without_a_username_with_the_acls_anonymous_lines(run_broker, tmp_path,
                                                                                         fleet):
    acl = tmp_path / ".lepton" / "broker" / "acl"
    acl.parent.mkdir(parents=True)
    acl.write_text(f"topic readwrite lepton/{fleet}/devices/cam-1/telemetry\n")  # before any user: anonymous
    broker = run_broker("--port", "0", "--allow-anonymous", "--json")
    port = json.loads(broker.first_line())["port"]

    assert round_trip(f"mqtt://127.0.0.1:{port}", fleet) == b'{"v":1}'
    with pytest.raises(AssertionError, match="nothing arrived"):  # and nothing beyond those lines
        round_trip(f"mqtt://127.0.0.1:{port}", f"{fleet}x")
    assert broker.interrupt()[0] == 0


def test_a_port_in_use_is_one_clear_line_and_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        result = subprocess.run([sys.executable, "-m", "lepton", "broker", "--port", str(port)], cwd=tmp_path,
                                capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1
    assert f"port {port} on 127.0.0.1 is already in use" in result.stderr and "--port" in result.stderr
    assert result.stdout == ""


def test_a_power_user_config_file_is_used(run_broker, tmp_path, fleet):
    port = free_port()
    config = tmp_path / "amqtt.json"
    config.write_text(json.dumps({
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"lepton.broker._auth.LeptonAuthPlugin": {"allow_anonymous": True}},
    }))

    broker = run_broker("--config", str(config), "--json")

    assert json.loads(broker.first_line()) == {"url": f"mqtt://127.0.0.1:{port}", "host": "127.0.0.1",
                                               "port": port}
    assert round_trip(f"mqtt://127.0.0.1:{port}", fleet) == b'{"v":1}'
    assert broker.interrupt()[0] == 0


def test_the_documented_amqtt_yaml_is_a_valid_config(run_broker, tmp_path, fleet):
    """broker/amqtt.yaml starts as it is once its port and password file are pointed somewhere free."""
    from lepton.testing import PROJECT_ROOT

    port = free_port()
    text = (PROJECT_ROOT / "broker" / "amqtt.yaml").read_text()
    assert "127.0.0.1:1883" in text and ".lepton/broker/passwd" in text and ".lepton/broker/acl" in text
    (tmp_path / "amqtt.yaml").write_text(text.replace("127.0.0.1:1883", f"127.0.0.1:{port}"))
    added = subprocess.run([sys.executable, "-m", "lepton", "broker", "--add-user", "w1:pw", "--role", "admin", "--json"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert added.returncode == 0, added.stderr

    broker = run_broker("--config", "amqtt.yaml")

    assert broker.first_line() == f"mqtt://127.0.0.1:{port}"
    assert round_trip(f"mqtt://w1:pw@127.0.0.1:{port}", fleet) == b'{"v":1}'
    assert broker.interrupt()[0] == 0


@pytest.mark.parametrize("content, name, message", [
    (None, "missing.yaml", "cannot read amqtt config"),
    ("listeners: [unclosed", "bad.yaml", "is not valid yaml"),
    ("{not json", "bad.json", "is not valid json"),
    ("just a string", "scalar.yaml", "has no listeners.default section"),
    ("listeners:\n  default:\n    bind: 'nohostport'\n", "bind.yaml", "is not HOST:PORT"),
    ("listeners:\n  default:\n    bind: 127.0.0.1:1\nplugins:\n  lepton.broker._auth.LeptonAuthPlugin:\n"
     "    password_file: nope/passwd\n", "nopw.yaml", "nope/passwd named in nopw.yaml not found"),
    (f"listeners:\n  default:\n    bind: 127.0.0.1:{free_port()}\nplugins:\n  nowhere.Plugin: {{}}\n",
     "plugin.yaml", "No module named 'nowhere'"),
], ids=["missing", "bad-yaml", "bad-json", "scalar", "bind", "no-password-file", "plugin"])  # stable under xdist
def test_an_unusable_config_file_is_one_clear_line(tmp_path, content, name, message):
    if content is not None:
        (tmp_path / name).write_text(content)

    result = subprocess.run([sys.executable, "-m", "lepton", "broker", "--config", name], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr


@pytest.mark.parametrize("args, message", [
    (["--add-user", "bad/name"], "--add-user"),
    (["--add-user", "cam-1:"], "empty password"),
    (["--config", "x.yaml", "--port", "1884"], "conflict"),
])
def test_bad_flags_are_one_clear_line(tmp_path, args, message):
    result = subprocess.run([sys.executable, "-m", "lepton", "broker", *args], cwd=tmp_path,
                            capture_output=True, text=True, timeout=60)

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
