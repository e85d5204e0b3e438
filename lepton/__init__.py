"""Lepton: edge-cloud collaborative AI over MQTT.

The top level re-exports the errors and the protocol's core types. Role packages are imported
explicitly so that a device never pulls in cloud dependencies:

* :mod:`lepton.protocol` — the wire contract both sides share;
* :mod:`lepton.device` — the edge runtime (no torch, lightning or pyarrow);
* :mod:`lepton.cloud` — ingest, dataset, training, export and model delivery;
* :mod:`lepton.broker` — the embedded amqtt broker.
"""

from importlib.metadata import PackageNotFoundError, version

from lepton.errors import (
    BrokerConnectionError,
    ConfigError,
    GateRefused,
    LeptonError,
    ModelRejected,
    ProtocolError,
)
from lepton.protocol import BrokerURL, Sample, Topics

try:
    __version__ = version("lepton")
except PackageNotFoundError:  # running from a source tree without an install
    __version__ = "0.0.0+unknown"

__all__ = [
    "BrokerConnectionError",
    "BrokerURL",
    "ConfigError",
    "GateRefused",
    "LeptonError",
    "ModelRejected",
    "ProtocolError",
    "Sample",
    "Topics",
    "__version__",
]
