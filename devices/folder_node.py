#!/usr/bin/env python3
"""Folder node: publish a labelled image folder once (label = sub-folder), e.g. to seed a dataset.

    devices/folder_node.py --broker mqtt://seed-1@localhost:1883 --password-file seed-1.pw \\
        --fleet demo --id seed-1 --folder images/

Corrupt images are skipped and counted; the node exits 0 once every image was acknowledged by the cloud.
"""

from __future__ import annotations

import sys

from _common import parser, run


def main(argv: list[str] | None = None) -> int:
    p = parser(__doc__)
    p.add_argument("--folder", required=True, help="folder with one sub-folder of images per label")
    p.add_argument("--preset", default="camera-gray-32", help="preprocessing preset (default camera-gray-32)")
    p.add_argument("--pipeline", help="preprocessing spec file (.json/.toml) instead of --preset")
    args = p.parse_args(argv)
    return run(
        args,
        name="folder_node",
        source=f"folder:{args.folder}",
        pipeline=args.pipeline or args.preset,
        once=True,
        batch_size=32,
    )


if __name__ == "__main__":
    sys.exit(main())
