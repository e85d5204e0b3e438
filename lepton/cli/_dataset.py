"""lepton dataset: inspect (stats) and compact the Parquet dataset written by the ingest worker."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lepton.cli import _exit

DESCRIPTION = """\
stats    samples, files and bytes, with counts per device, label and pipeline (--json for scripts).
compact  merge small Parquet files into compact-*.parquet files, atomically and exactly once; safe
         while workers write (it takes the same index lock, so ingest pauses while it merges).

DIR is the worker's --data folder; without --fleet every fleet found under it is processed.
The schema and layout are in docs/dataset.md.

examples:
  lepton dataset stats ./data --fleet f1
  lepton dataset stats ./data --json
  lepton dataset compact ./data --fleet f1
"""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = sub.add_parser("stats", help="counts per device, label, pipeline; bytes; files")
    stats.add_argument("dir", metavar="DIR", help="dataset root (the worker's --data)")
    stats.add_argument("--fleet", default=None, help="one fleet (default: every fleet under DIR)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(handler=run_stats)
    comp = sub.add_parser("compact", help="merge small files atomically (safe while workers run)")
    comp.add_argument("dir", metavar="DIR", help="dataset root (the worker's --data)")
    comp.add_argument("--fleet", default=None, help="one fleet (default: every fleet under DIR)")
    comp.add_argument(
        "--small-rows",
        type=int,
        default=50_000,
        metavar="N",
        help="merge files with fewer rows than N (default 50000)",
    )
    comp.add_argument(
        "--max-rows",
        type=int,
        default=500_000,
        metavar="N",
        help="rows per merged file at most (default 500000)",
    )
    comp.add_argument("--json", action="store_true", help="print one JSON object")
    comp.set_defaults(handler=run_compact)


def _fleets(root: Path, fleet: str | None) -> list[str]:
    from lepton.errors import ConfigError
    from lepton.protocol import validate_id

    if not root.is_dir():
        raise ConfigError(f"dataset folder {root} does not exist; pass the worker's --data folder")
    if fleet is not None:
        validate_id(fleet, kind="fleet", flag="--fleet")
        if not (root / fleet / "data").is_dir():
            raise ConfigError(
                f"no dataset of fleet {fleet!r} in {root} (expected {root / fleet / 'data'}); "
                "check DIR and --fleet"
            )
        return [fleet]
    found = sorted(p.name for p in root.iterdir() if (p / "data").is_dir())
    if not found:
        raise ConfigError(
            f"no dataset under {root}: expected {root}/FLEET/data/*.parquet; pass the worker's --data"
        )
    return found


def run_stats(args: argparse.Namespace) -> int:
    from lepton.cloud._dataset import Dataset

    root = Path(args.dir)
    report = {f: Dataset(root, f).stats() for f in _fleets(root, args.fleet)}
    if args.json:
        print(json.dumps(report if args.fleet is None else report[args.fleet], indent=2, sort_keys=True))
        return _exit.OK
    for fleet, st in report.items():
        print(
            f"fleet {fleet}: {st['samples']} samples in {st['files']} files, {_size(st['bytes'])} "
            f"({_size(st['tensor_bytes'])} of tensors)"
        )
        for title, key in (("device", "devices"), ("label", "labels"), ("pipeline", "pipelines")):
            items = st[key]
            if not items:
                continue
            width = max(len(title), *(len(k) for k in items))
            print(f"  {title:<{width}}  samples")
            for k, v in items.items():
                print(f"  {k:<{width}}  {v:>7}")
    return _exit.OK


def run_compact(args: argparse.Namespace) -> int:
    from lepton.cloud._index import compact

    root = Path(args.dir)
    out = {}
    for fleet in _fleets(root, args.fleet):
        out[fleet] = compact(root / fleet, small_rows=args.small_rows, max_rows=args.max_rows)
        if not args.json:
            r = out[fleet]
            print(
                f"fleet {fleet}: merged {r['files_merged']} of {r['files_before']} files into "
                f"{r['files_written']} ({r['rows']} samples)",
                file=sys.stdout,
            )
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    return _exit.OK


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
