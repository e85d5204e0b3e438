#!/usr/bin/env python3
"""Camera node: a grayscale 32x32 view of a camera (or a recorded video), published for training.

devices/camera_node.py --broker mqtt://cam-1@gateway:1883 --password-file cam-1.pw \\
    --fleet plant --id cam-1 --camera 0 --rate 5
devices/camera_node.py ... --video recording.avi --limit 100      # replay a recording instead
"""

from __future__ import annotations

import sys

from _common import parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--camera", type=int, default=0, help="camera index (default 0)")
    src.add_argument("--video", help="read this video file instead of a camera")
    p.add_argument("--preset", default="camera-gray-32", help="preprocessing preset (default camera-gray-32)")
    args = p.parse_args(argv)
    source = f"video:{args.video}" if args.video else f"camera:{args.camera}"
    return run(args, name="camera_node", source=source, pipeline=args.preset, batch_size=8, batch_ms=200)


if __name__ == "__main__":
    sys.exit(main())
