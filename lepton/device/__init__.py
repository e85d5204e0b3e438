"""The edge runtime: sources, OpenCV preprocessing, durable spool, publisher, inference and hot-swap.

Never imports torch, lightning, pyarrow or onnx: a device installs ``lepton[device]`` only.
"""

__all__: list[str] = []
