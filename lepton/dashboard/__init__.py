"""The fleet dashboard (``lepton dashboard``, ``pip install 'lepton[dashboard]'``): one page in the
browser, live over SSE, ``/api/fleet`` JSON and ``/metrics`` for Prometheus, from one MQTT viewer
connection. See docs/dashboards.md.

>>> from lepton.dashboard import FleetBoard
>>> FleetBoard(fleet="demo").snapshot(now=0.0)["summary"]["devices"]
0
"""

from lepton.dashboard._board import FleetBoard
from lepton.dashboard._server import DashboardServer

__all__ = ["DashboardServer", "FleetBoard"]
