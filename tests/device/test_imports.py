"""The edge stays light: importing lepton.device and building an agent pulls in no cloud dependency."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

FORBIDDEN = ("torch", "lightning", "pytorch_lightning", "pyarrow", "onnx", "lepton.cloud", "amqtt", "duckdb",
             "psycopg")


def test_building_an_agent_imports_no_torch_lightning_pyarrow_or_onnx(tmp_path):
    code = textwrap.dedent(f"""
        import json, sys
        import lepton.device
        from lepton.device import DeviceAgent, Pipeline
        agent = DeviceAgent(broker="mqtt://d1:pw@127.0.0.1:1", fleet="f", device_id="d1", source="digits",
                            pipeline="camera-gray-32", spool_dir={str(tmp_path)!r})
        agent.pipeline(next(iter(agent.source))[0])
        agent.spool.append(agent.pipeline(next(iter(agent.source))[0]))
        agent.close()
        print(json.dumps(sorted(sys.modules)))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    modules = json.loads(out.stdout)
    leaked = [m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN)]
    assert leaked == []
    assert (
        "cv2" in modules and "paho.mqtt.client" in modules and "sqlite3" in modules
    )  # really built and used
