"""One place that imports OpenCV for the device, quietly.

OpenCV prints ``[ WARN:0@...]`` lines on stderr when a camera index does not exist or a codec is
missing. Lepton reports those conditions itself in one clear line, so OpenCV's own chatter is turned
down to errors before the first import (``OPENCV_LOG_LEVEL`` set by the user still wins).
"""

from __future__ import annotations

import os
from typing import Any

_cv2: Any = None


def cv2() -> Any:
    """The ``cv2`` module, imported on first use with its log level set to ERROR."""
    global _cv2
    if _cv2 is None:
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
        import cv2 as module

        try:
            module.utils.logging.setLogLevel(module.utils.logging.LOG_LEVEL_ERROR)
        except AttributeError:  # very old or trimmed builds: the environment variable already did it
            pass
        _cv2 = module
    return _cv2
