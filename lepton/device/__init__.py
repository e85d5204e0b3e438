"""The edge runtime: sources, OpenCV preprocessing, durable spool, publisher, inference and hot-swap.

Never imports torch, lightning, pyarrow or onnx: a device installs ``lepton[device]`` only.
"""

from lepton.device._runtime import ModelRuntime, Prediction

__all__: list[str] = ["ModelRuntime", "Prediction"]
