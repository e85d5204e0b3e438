"""Fault injection with the real CLI in subprocesses: Mosquitto down mid-run, kill -9, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import cv2
import numpy as np
import pytest

from lepton.cli import _exit
from tests.device._acker import Acker, Watcher


def device_cmd(url: str, fleet: str, device: str, spool, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lepton",
        "device",
        "--broker",
        url,
        "--fleet",
        fleet,
        "--id",
        device,
        "--spool",
        str(spool),
        *extra,
    ]


def password_off_argv(args) -> tuple[list[str], dict[str, str]]:  # noqa: ANN001
    """The --broker URL without its password, and an environment carrying it ($LEPTON_PASSWORD): what
    users should do (a password in argv is readable in /proc and earns a warning line)."""
    from lepton.protocol import BrokerURL

    args, env = list(args), dict(os.environ)
    for i, arg in enumerate(args[:-1]):
        if arg == "--broker" and "://" in args[i + 1]:
            try:
                url = BrokerURL.parse(args[i + 1])
            except ValueError:
                continue
            if url.password:
                env["LEPTON_PASSWORD"] = url.password
                args[i + 1] = str(url)  # str() never shows the password
    return args, env


def run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    args, env = password_off_argv(args)
    return subprocess.run(
        [sys.executable, "-m", "lepton", "device", *args], capture_output=True, text=True, timeout=timeout,
        env=env,
    )


@pytest.mark.mosquitto
@pytest.mark.slow
def test_2000_samples_survive_mosquitto_stopped_and_restarted_mid_run(mosquitto_broker, fleet, tmp_path):
    b = mosquitto_broker
    with Acker(b.url("worker", "acker", fleet=fleet), fleet, client_id=f"acker-{fleet}") as acker:
        time.sleep(0.3)
        proc = subprocess.Popen(
            device_cmd(
                b.url("device", "cam-1", fleet=fleet),
                fleet,
                "cam-1",
                tmp_path / "spool",
                "--source",
                "digits",
                "--rate",
                "250",
                "--limit",
                "2000",
                "--ack-timeout",
                "3",
                "--json",
                "--quiet",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert acker.wait_for("cam-1", 300, timeout=30)
        b.stop()  # several seconds without a broker while the device keeps capturing
        time.sleep(4)
        b.start()
        out, err = proc.communicate(timeout=120)
        summary = json.loads(out)
        assert proc.returncode == _exit.OK, err
        assert acker.wait_for("cam-1", 2000, timeout=10)
    assert summary["captured"] == summary["acked"] == 2000 and summary["spool_depth"] == 0
    assert summary["reconnects"] >= 1  # the outage really happened under the device
    assert acker.seqs("cam-1") == set(range(2000))  # every seq, once each after dedup by seq
    assert acker.reused("cam-1") == []  # and no seq ever carried two different samples
    assert "Traceback" not in err


@pytest.mark.mosquitto
@pytest.mark.slow
def test_kill_9_mid_run_then_restart_loses_nothing_and_reuses_no_seq(mosquitto_broker, fleet, tmp_path):
    b = mosquitto_broker
    url = b.url("device", "cam-2", fleet=fleet)
    with (
        Acker(b.url("worker", "acker", fleet=fleet), fleet, client_id=f"acker-{fleet}") as acker,
        Watcher(b.url("viewer", "viewer", fleet=fleet), fleet) as watch,
    ):
        time.sleep(0.3)
        proc = subprocess.Popen(
            device_cmd(
                url, fleet, "cam-2", tmp_path / "spool", "--source", "digits", "--rate", "400", "--quiet"
            ),
            stderr=subprocess.PIPE,
        )
        assert acker.wait_for("cam-2", 400, timeout=30)
        acker.ack = False  # let unacknowledged samples pile up in the spool...
        time.sleep(0.7)
        os.kill(proc.pid, signal.SIGKILL)  # ...then pull the plug
        proc.wait()
        # The broker publishes the retained Last Will: the device is offline.
        assert watch.wait(
            lambda w: any(s.get("reason") == "connection lost" for s in w.bodies("cam-2", "status"))
        )
        seen_before = max(acker.seqs("cam-2"))
        acker.ack = True
        out = subprocess.run(
            device_cmd(
                url,
                fleet,
                "cam-2",
                tmp_path / "spool",
                "--source",
                "digits",
                "--limit",
                "200",
                "--json",
                "--quiet",
            ),
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert out.returncode == _exit.OK, out.stderr
        summary = json.loads(out.stdout)
        assert acker.wait_for("cam-2", summary["next_seq"], timeout=10)
    assert summary["spool_depth"] == 0 and summary["captured"] == 200
    assert summary["acked"] > 200  # the leftovers of the killed run went out too
    assert acker.seqs("cam-2") == set(range(summary["next_seq"]))  # nothing lost
    assert acker.reused("cam-2") == []  # no seq used twice
    assert summary["next_seq"] > seen_before + 200


@pytest.mark.mosquitto
def test_wrong_password_and_unreachable_broker_exit_3_in_one_line(mosquitto_broker, fleet, tmp_path):
    from lepton.broker import free_port

    good = mosquitto_broker.url("device", "cam-3", fleet=fleet)
    cases = {
        "password": good.replace("mqtt://cam-3:", "mqtt://cam-3:x"),
        "cannot reach broker": f"mqtt://cam-3:pw@127.0.0.1:{free_port()}",
    }
    for words, url in cases.items():
        r = run_cli(
            "--broker",
            url,
            "--fleet",
            fleet,
            "--id",
            "cam-3",
            "--source",
            "digits",
            "--spool",
            str(tmp_path / "s"),
        )
        assert r.returncode == _exit.BROKER, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("lepton device: error: "), r.stderr
        assert words in lines[0] and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--source", "video:/no/clip.mp4"], "video file '/no/clip.mp4' not found"),
        (["--source", "folder:/no/images"], "image folder '/no/images' not found"),
        (["--source", "camera:7"], "camera 7 not found"),
        (["--source", "digits", "--preset", "nope"], "unknown preset 'nope'"),
        (["--source", "digits", "--broker", "localhost:1883"], "bad broker URL"),
        (["--source", "digits", "--broker", "http://localhost"], "scheme must be mqtt:// or mqtts://"),
        (["--source", "digits", "--id", "a/b"], "not a valid device id"),
        (["--source", "digits", "--batch", "0"], "batch size"),
    ],
)
def test_bad_input_exits_2_with_one_clear_line(tmp_path, args, words):
    base = {"--broker": "mqtt://d:pw@127.0.0.1:1", "--fleet": "f1", "--id": "d"}
    for i in range(0, len(args), 2):
        base.pop(args[i], None)
    flat = [x for kv in base.items() for x in kv]
    r = run_cli(*flat, *args, "--spool", str(tmp_path / "s"))
    assert r.returncode == _exit.USAGE
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_corrupt_image_is_skipped_counted_and_reported(amqtt_broker, fleet, tmp_path):
    images = tmp_path / "images"
    for label in ("0", "1"):
        (images / label).mkdir(parents=True)
        for i in range(4):
            cv2.imwrite(str(images / label / f"{i}.png"), np.full((8, 8), 60 * i, np.uint8))
    (images / "1" / "zz-corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\ngarbage")
    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet) as acker:
        time.sleep(0.2)
        r = run_cli(
            "--broker",
            amqtt_broker.url("device", "cam-4", fleet=fleet),
            "--fleet",
            fleet,
            "--id",
            "cam-4",
            "--source",
            f"folder:{images}",
            "--preset",
            "digits",
            "--once",
            "--json",
            "--quiet",
            "--spool",
            str(tmp_path / "s"),
        )
    assert r.returncode == _exit.OK, r.stderr
    summary = json.loads(r.stdout)
    assert summary["captured"] == summary["acked"] == 8 and summary["skipped"] == 1
    assert summary["skipped_items"] == ["1/zz-corrupt.png"]
    assert "skipped 1 unreadable input(s): 1/zz-corrupt.png" in r.stderr
    assert sorted(acker.labels["cam-4"].values()) == ["0"] * 4 + ["1"] * 4


@pytest.mark.mosquitto
def test_sigterm_stops_cleanly_and_says_offline(mosquitto_broker, fleet, tmp_path):
    from lepton.device import Spool

    b = mosquitto_broker
    with (
        Acker(b.url("worker", "acker", fleet=fleet), fleet) as acker,
        Watcher(b.url("viewer", "viewer", fleet=fleet), fleet) as watch,
    ):
        time.sleep(0.3)
        proc = subprocess.Popen(
            device_cmd(
                b.url("device", "cam-5", fleet=fleet),
                fleet,
                "cam-5",
                tmp_path / "s",
                "--source",
                "digits",
                "--rate",
                "200",
                "--json",
                "--quiet",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert acker.wait_for("cam-5", 100, timeout=30)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        assert watch.wait(
            lambda w: w.bodies("cam-5", "status") and not w.bodies("cam-5", "status")[-1]["online"]
        )
    summary = json.loads(out)
    assert proc.returncode in (_exit.OK, _exit.UNACKED) and "Traceback" not in err
    assert summary["stopped_by"] == "SIGTERM" and (proc.returncode == _exit.OK) == (
        summary["spool_depth"] == 0
    )
    final = watch.bodies("cam-5", "status")[-1]
    assert "reason" not in final  # published by the device itself, not the broker's Last Will
    with Spool(tmp_path / "s") as spool:  # consistent and released
        assert spool.depth == summary["spool_depth"] and spool.next_seq == summary["next_seq"]


@pytest.mark.mosquitto
def test_offline_ok_starts_without_broker_and_delivers_when_it_appears(mosquitto_broker, fleet, tmp_path):
    b = mosquitto_broker
    device_url = b.url("device", "cam-6", fleet=fleet)
    with Acker(b.url("worker", "acker", fleet=fleet), fleet, client_id=f"acker-{fleet}") as acker:
        time.sleep(0.3)
        b.stop()
        proc = subprocess.Popen(
            device_cmd(
                device_url,
                fleet,
                "cam-6",
                tmp_path / "s",
                "--source",
                "digits",
                "--limit",
                "50",
                "--offline-ok",
                "--json",
                "--quiet",
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(2)
        assert proc.poll() is None  # running: capturing into the spool
        b.start()
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == _exit.OK, err
        assert acker.wait_for("cam-6", 50, timeout=15)
    assert json.loads(out)["acked"] == 50 and acker.seqs("cam-6") == set(range(50))


def test_exit_4_when_stopping_with_unacknowledged_samples(amqtt_broker, fleet, tmp_path):
    args = [
        "--broker",
        amqtt_broker.url("device", "cam-7", fleet=fleet),
        "--fleet",
        fleet,
        "--id",
        "cam-7",
        "--source",
        "digits",
        "--limit",
        "5",
        "--drain-timeout",
        "0.5",
        "--spool",
        str(tmp_path / "s"),
    ]
    r = run_cli(*args)  # nobody acknowledges: a broker PUBACK is not enough
    assert r.returncode == _exit.UNACKED
    assert "5 unacknowledged (kept in the spool)" in r.stderr and "[drain timeout]" in r.stderr
    with Acker(amqtt_broker.url("worker", "acker", fleet=fleet), fleet):
        time.sleep(0.2)
        again = run_cli(*args[:-4], "--spool", str(tmp_path / "s"), "--json")
    assert again.returncode == _exit.OK, again.stderr
    assert json.loads(again.stdout)["acked"] == 10  # the 5 left over + 5 new
