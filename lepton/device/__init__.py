"""The edge runtime: sources, OpenCV preprocessing, durable spool, publisher, inference and hot-swap.

Never imports torch, lightning, pyarrow or onnx: a device installs ``lepton[device]`` only.

    from lepton.device import DeviceAgent
    DeviceAgent(broker="mqtt://cam-1:pw@localhost:1883", fleet="demo", device_id="cam-1",
                source="digits", pipeline="digits", limit=100).run()
"""

from lepton.device._agent import DeviceAgent
from lepton.device._config import DeviceConfig, RunSummary, default_spool_dir
from lepton.device._pipeline import OPS, PRESETS, FrameError, Pipeline, load_pipeline
from lepton.device._runtime import ModelRuntime, Prediction
from lepton.device._sources import IMAGE_SUFFIXES, Source, open_source
from lepton.device._spool import ON_FULL_POLICIES, Spool, SpooledSample, SpoolFull

__all__: list[str] = [
    "DeviceAgent",
    "DeviceConfig",
    "FrameError",
    "IMAGE_SUFFIXES",
    "ModelRuntime",
    "ON_FULL_POLICIES",
    "OPS",
    "PRESETS",
    "Pipeline",
    "Prediction",
    "RunSummary",
    "Source",
    "Spool",
    "SpoolFull",
    "SpooledSample",
    "default_spool_dir",
    "load_pipeline",
    "open_source",
]
