"""lepton dashboard's command line: bad flags exit 2 with one line naming the fix, a taken port too."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from lepton import exitcodes

pytest.importorskip("aiohttp", reason="pip install 'lepton[dashboard]'")


def _run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lepton", "dashboard", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_bad_flags_exit_2_naming_the_fix():
    bad_fleet = _run("--broker", "mqtt://v@127.0.0.1:1", "--fleet", "no/slash")
    assert bad_fleet.returncode == exitcodes.USAGE and "bad --fleet" in bad_fleet.stderr
    bad_prefix = _run("--broker", "mqtt://v@127.0.0.1:1", "--fleet", "f1", "--prefix", "a/#")
    assert bad_prefix.returncode == exitcodes.USAGE and "--prefix" in bad_prefix.stderr
    assert len(bad_prefix.stderr.strip().splitlines()) == 1


def test_a_taken_port_exits_2_and_an_unreachable_broker_3(amqtt_broker, fleet):
    url = amqtt_broker.url("viewer", "viewer", fleet=fleet)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = _run("--broker", url, "--fleet", fleet, "--port", str(taken.getsockname()[1]))
    assert busy.returncode == exitcodes.USAGE and "choose another --port" in busy.stderr, busy.stderr
    gone = _run("--broker", "mqtt://v@127.0.0.1:1", "--fleet", fleet)
    assert gone.returncode == exitcodes.BROKER and "cannot reach broker" in gone.stderr
