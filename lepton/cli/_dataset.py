"""lepton dataset: inspect (stats) and compact the Parquet dataset written by the ingest worker."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lepton.cli import _exit

DESCRIPTION = """\
stats    samples, files and bytes, with counts per device, label and pipeline (--json for scripts).
label    import human labels for stored samples from a CSV (header device,seq,label); they are
         kept in DIR/FLEET/labels/ (the data files are not rewritten) and win over device and
         teacher labels by default (lepton train --labels). Pairs the dataset does not hold are
         reported and not imported.
compact  merge small Parquet files into compact-*.parquet files, atomically and exactly once; safe
         while workers write (it takes the same index lock, so ingest pauses while it merges).

DIR is the worker's --data folder; without --fleet every fleet found under it is processed.
The schema and layout are in docs/dataset.md.

examples:
  lepton dataset stats ./data --fleet f1
  lepton dataset stats ./data --json
  lepton dataset label ./data --fleet f1 --csv reviewed.csv
  lepton dataset compact ./data --fleet f1
"""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    stats = sub.add_parser("stats", help="counts per device, label, pipeline; bytes; files")
    stats.add_argument("dir", metavar="DIR", help="dataset root (the worker's --data)")
    stats.add_argument("--fleet", default=None, help="one fleet (default: every fleet under DIR)")
    stats.add_argument("--json", action="store_true", help="print one JSON object")
    stats.set_defaults(handler=run_stats)
    lab = sub.add_parser("label", help="import human labels (device,seq,label) from a CSV")
    lab.add_argument("dir", metavar="DIR", help="dataset root (the worker's --data)")
    lab.add_argument("--fleet", required=True, help="the fleet the samples belong to")
    lab.add_argument("--csv", required=True, metavar="FILE", help="CSV with the header device,seq,label")
    lab.add_argument("--json", action="store_true", help="print one JSON object")
    lab.set_defaults(handler=run_label)
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


def run_label(args: argparse.Namespace) -> int:
    from lepton.cloud._index import open_index
    from lepton.cloud._labels import LabelRow, LabelStore, read_label_csv

    root = Path(args.dir)
    (fleet,) = _fleets(root, args.fleet)
    rows, problems = read_label_csv(args.csv)
    by_device: dict[str, list[tuple[int, str]]] = {}
    for device, seq, label in rows:
        by_device.setdefault(device, []).append((seq, label))
    if (root / fleet / "index.sqlite").is_file() or (root / fleet / "index.json").is_file():
        # the worker's index (SQLite, or the PostgreSQL one its index.json names): one query per device
        index = open_index(root / fleet)
        try:
            known = {d: index.known(d, [q for q, _ in items]) for d, items in by_device.items()}
        finally:
            index.close()
    else:  # files written without a worker: read their (device, seq) columns
        known = _pairs_in_files(root, fleet, by_device)
    now = time.time()
    keep = [LabelRow(d, q, lab, "human", ts=now) for d, items in by_device.items() for q, lab in items
            if q in known[d]]
    unknown = [(d, q) for d, items in by_device.items() for q, _ in items if q not in known[d]]
    path = LabelStore(root, fleet).append(keep, writer="import")
    report: dict[str, Any] = {
        "fleet": fleet,
        "imported": len(keep),
        "unknown": len(unknown),
        "unknown_examples": [f"{d}/{q}" for d, q in unknown[:10]],
        "bad_rows": len(problems),
        "bad_row_examples": problems[:10],
        "file": str(path) if path else None,
    }
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print(f"fleet {fleet}: imported {len(keep)} human labels" + (f" into {path}" if path else ""))
        if unknown:
            print(f"  {len(unknown)} (device, seq) pairs are not in the dataset and were not imported, "
                  f"e.g. {', '.join(report['unknown_examples'])}")
        for line in problems[:10]:
            print(f"  skipped {line}")
        if len(problems) > 10:
            print(f"  ... and {len(problems) - 10} more bad rows")
    # Every row imported: 0. Some rows left out (unknown pairs, bad rows): 1, with the report above.
    return _exit.OK if not unknown and not problems else _exit.FAILURE


def _pairs_in_files(root: Path, fleet: str, wanted: dict[str, list]) -> dict[str, set[int]]:
    import pyarrow.parquet as pq

    from lepton.cloud._dataset import Dataset

    want = {d: {q for q, _ in items} for d, items in wanted.items()}
    found: dict[str, set[int]] = {d: set() for d in wanted}
    for path in Dataset(root, fleet).files():
        t = pq.read_table(path, columns=["device", "seq"]).to_pydict()
        for d, q in zip(t["device"], t["seq"], strict=True):
            if q in want.get(d, ()):
                found[d].add(q)
    return found


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


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
