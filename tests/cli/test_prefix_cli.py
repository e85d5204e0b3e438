"""--prefix / $LEPTON_PREFIX on every command and program: a bad prefix exits 2 with one line naming the
fix, before anything connects; the flag beats the environment."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lepton.cli._prefix import resolve_prefix
from lepton.errors import ConfigError
from lepton.testing import PROJECT_ROOT

PY = sys.executable
# Each with its required flags; nothing listens on port 9 (nothing may connect before the prefix check).
DEV, CW = PROJECT_ROOT / "devices", PROJECT_ROOT / "cloud_workers"
COMMANDS = {
    "device": [PY, "-m", "lepton", "device", "--fleet", "f1", "--id", "cam-1", "--source", "digits"],
    "worker": [PY, "-m", "lepton", "worker", "--fleet", "f1", "--data", "{tmp}"],
    "train": [PY, "-m", "lepton", "train", "--data", "{tmp}", "--fleet", "f1", "--model", "m1"],
    "status": [PY, "-m", "lepton", "status", "--fleet", "f1"],
    "models publish": [PY, "-m", "lepton", "models", "publish", "m1", "--data", "{tmp}"],
    "models rollback": [PY, "-m", "lepton", "models", "rollback", "m1", "--to", "1", "--data", "{tmp}"],
    "models fetch": [PY, "-m", "lepton", "models", "fetch", "m1", "--fleet", "f1"],
    "demo": [PY, "-m", "lepton", "demo"],
    "broker --add-user": [PY, "-m", "lepton", "broker", "--data", "{tmp}", "--add-user", "cam-1",
                          "--fleet", "f1"],
    "devices/camera_node.py": [PY, str(DEV / "camera_node.py"), "--fleet", "f1", "--id", "c"],
    "devices/folder_node.py": [PY, str(DEV / "folder_node.py"), "--fleet", "f1", "--id", "c",
                               "--folder", "{tmp}"],
    "devices/sensor_node.py": [PY, str(DEV / "sensor_node.py"), "--fleet", "f1", "--id", "c"],
    "cloud_workers/ingest_worker.py": [PY, str(CW / "ingest_worker.py"),
                                       "--fleet", "f1", "--data", "{tmp}"],
    "cloud_workers/trainer.py": [PY, str(CW / "trainer.py"), "--data", "{tmp}",
                                 "--fleet", "f1", "--model", "m1", "--once"],
}


def _run(name: str, tmp_path, *, flag: str | None = None, env_prefix: str | None = None):  # noqa: ANN001
    argv = [a.replace("{tmp}", str(tmp_path)) for a in COMMANDS[name]] + (["--prefix", flag] if flag else [])
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEPTON_")}
    env.update(LEPTON_BROKER="mqtt://u:p@127.0.0.1:9", PYTHONPATH=os.environ.get("PYTHONPATH", ""))
    if env_prefix is not None:
        env["LEPTON_PREFIX"] = env_prefix
    return subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("name", list(COMMANDS))
def test_a_bad_prefix_exits_2_with_one_line_naming_the_fix(name, tmp_path):
    result = _run(name, tmp_path, flag="acme site/lepton")

    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "--prefix 'acme site/lepton'" in lines[0] and "e.g. --prefix acme/site-3/lepton" in lines[0]


@pytest.mark.parametrize("name", ["worker", "devices/sensor_node.py", "cloud_workers/ingest_worker.py"])
def test_a_bad_lepton_prefix_variable_is_named_as_such(name, tmp_path):
    result = _run(name, tmp_path, env_prefix="$SYS")

    assert result.returncode == 2, result.stderr
    assert "$LEPTON_PREFIX '$SYS'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_the_flag_beats_the_environment_and_lepton_is_the_default():
    flag = resolve_prefix("acme/site-3/lepton", environ={"LEPTON_PREFIX": "bad prefix"})
    assert flag == "acme/site-3/lepton"
    assert resolve_prefix(None, environ={"LEPTON_PREFIX": "env/p"}) == "env/p"
    assert resolve_prefix(None, environ={"LEPTON_PREFIX": ""}) == "lepton"
    assert resolve_prefix(None, environ={}) == "lepton"
    with pytest.raises(ConfigError, match=r"\$LEPTON_PREFIX"):
        resolve_prefix(None, environ={"LEPTON_PREFIX": "/x"})
