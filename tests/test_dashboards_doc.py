"""docs/dashboards.md's snippets are what the code sends and valid as written: the Grafana example report
names only documented telemetry fields, all numbers; the Node-RED flow is importable JSON."""

from __future__ import annotations

import json
import re

from lepton.testing import PROJECT_ROOT
from tests.protocol.test_docs_example import documented_telemetry_fields

DOC = (PROJECT_ROOT / "docs" / "dashboards.md").read_text(encoding="utf-8")


def _json_blocks() -> list[object]:
    return [json.loads(block) for block in re.findall(r"```json\n(.*?)```", DOC, flags=re.S)]


def test_the_grafana_example_is_a_flat_device_telemetry_report():
    report = next(b for b in _json_blocks() if isinstance(b, dict))

    assert report and all(type(v) in (int, float) for v in report.values())
    assert set(report) <= documented_telemetry_fields("device")


def test_the_node_red_flow_reads_the_device_from_the_topic():
    flow = next(b for b in _json_blocks() if isinstance(b, list))
    nodes = {n["id"]: n for n in flow}

    assert nodes["telemetry-in"]["topic"] == "lepton/f1/devices/+/telemetry"
    assert "payload.device" not in json.dumps(flow)  # no strings in telemetry: the topic names the device
    assert all(target in nodes for n in flow for wire in n.get("wires", []) for target in wire)
