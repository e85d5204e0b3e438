"""bench/fleet.py runs end to end, tiny: its table, its JSON, exactly-once and the retained statuses.

It measures nothing here (figures come from the bench itself, never from a test); this only keeps the
script working: real Mosquitto with the project's config, real simulated devices, a real worker.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lepton import exitcodes

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "fleet.py"


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=timeout)


@pytest.mark.mosquitto
@pytest.mark.slow  # ~15 s: a broker, 2 simulator processes, a worker process, two phases
def test_a_tiny_fleet_is_stored_exactly_once_and_reported(tmp_path, require_mosquitto):
    out = tmp_path / "fleet.json"

    done = _run("--devices", "20", "--procs", "2", "--workers", "1", "--rates", "2", "--duration", "1.5",
                "--out", str(out))

    assert done.returncode == 0, done.stdout + done.stderr
    header = done.stdout.splitlines()[0].split()
    assert header[:3] == ["rate/dev", "sink", "target/s"], done.stdout
    result = json.loads(out.read_text())
    assert [r["sink"] for r in result["rows"]] == ["bare", "1 worker"]
    worker = result["rows"][1]
    assert worker["published"] == worker["exactly_once"]["expected"] > 0
    n = worker["published"]
    assert worker["exactly_once"] == {"ok": True, "expected": n, "rows": n, "duplicates": 0, "missing": 0,
                                      "acked_missing": 0, "undrained": 0, "unexpected": 0}
    assert worker["acked"] == worker["published"] and worker["unacked"] == 0
    assert worker["ack_latency_ms"]["samples"] == worker["published"]
    assert result["rows"][0]["taken"] == result["rows"][0]["published"]  # the bare subscriber got them all
    # every device left a retained status: half by a clean stop, the vanished simulator's by Last Will
    assert result["retained_statuses"] == {"devices": 20, "retained": 20, "online": 0,
                                           "offline_clean_stop": 10, "offline_last_will": 10}
    for role in ("broker", "workers", "simulators"):
        assert worker["usage"]["roles"][role]["rss_mib_max"] > 0, role


@pytest.mark.parametrize("args", [["--workers", "0"], ["--rates", "fast"], ["--devices", "0"]])
def test_a_bad_flag_exits_2_in_one_line_naming_the_fix(args):
    done = _run(*args, timeout=60)

    assert done.returncode == exitcodes.USAGE
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fleet.py: error: "), done.stderr
    assert "e.g." in lines[0]
