"""What each install brings: the edge extra stays light (bench/install_size.py measures it)."""

from __future__ import annotations

import configparser
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: Never on the edge: the cloud's training stack, and the demo's scikit-learn with scipy under it.
HEAVY = {"torch", "pytorch-lightning", "lightning", "pyarrow", "scikit-learn", "sklearn", "scipy", "pandas"}


def _requirements(section: str, key: str) -> set[str]:
    cfg = configparser.ConfigParser()  # resolves %(device)s the way setuptools does
    cfg.read(ROOT / "setup.cfg")
    lines = [line.strip() for line in cfg[section][key].splitlines()]
    return {re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0].lower() for line in lines if line}


def test_the_device_install_is_the_protocol_plus_opencv_onnxruntime_and_cryptography():
    base = _requirements("options", "install_requires")
    device = _requirements("options.extras_require", "device")

    assert not (base | device) & HEAVY, sorted((base | device) & HEAVY)
    assert base | device == {
        "numpy", "msgpack", "paho-mqtt", "opencv-python-headless", "onnxruntime", "cryptography",
    }


def test_scikit_learn_comes_with_the_demo_extra_and_everything_that_includes_it():
    assert _requirements("options.extras_require", "demo") == {"scikit-learn"}
    for extra in ("all", "test"):
        assert "scikit-learn" in _requirements("options.extras_require", extra), extra
    # the cloud never imports it either (the trainer reads Parquet, not sklearn datasets)
    assert "scikit-learn" not in _requirements("options.extras_require", "cloud")


def test_the_digits_source_without_scikit_learn_names_the_fix_and_exits_2():
    # scikit-learn blocked as if lepton[device] were installed alone; the broker is never reached
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None\n"
        "from lepton.cli._main import main\n"
        "sys.exit(main(['device', '--broker', 'mqtt://cam-1@127.0.0.1:1', '--fleet', 'f1', '--id', 'cam-1',"
        " '--source', 'digits', '--limit', '5']))\n"
    )
    env = {**os.environ, "LEPTON_PASSWORD": "unused", "PYTHONPATH": str(ROOT)}

    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)

    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, lines  # one line, naming the fix
    assert "scikit-learn is not installed" in lines[0] and "pip install 'lepton[demo]'" in lines[0]
    assert "--source folder:PATH" in lines[0]
