"""A deployable retrain-and-publish loop built on lepton.cloud's public API.

Every --interval seconds it counts the labelled samples of the fleet's dataset; when at least
--min-new more have arrived since the newest registered version was trained, it trains, gates,
signs and publishes a new version. State lives in the registry (the newest version's report says
how many samples it saw), so a restarted trainer picks up where it left off.

    python cloud_workers/trainer.py --data /srv/lepton/data --fleet demo --model digits \\
        --broker mqtt://trainer@broker:1883 --password-file /etc/lepton/trainer.pw \\
        --key /etc/lepton/lepton.key --interval 600

The broker password comes from --password-file (mode 0600), $LEPTON_PASSWORD, or a whole URL in
$LEPTON_BROKER; one written in --broker works but every local user can read it in /proc/PID/cmdline.

--once runs one check and exits: 0 published (or nothing to do), 5 gate refused, 1 failed; 2 (a bad
id, path or flag) before anything runs, in either mode (codes: lepton.exitcodes).
Failures never stop the loop: it logs them and tries again at the next interval.

Give it a validation set devices cannot write (--val-data, --trusted-devices): without one the gate
is judged on the fleet's own split and every round logs that it is untrusted. Each device's share of
the training set is capped (--max-device-share), and every version stays on the deployed version's
pipeline (a version that cannot be compared with it is refused; this loop never forces one).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from lepton import exitcodes
from lepton.cli._prefix import add_prefix_argument, resolve_prefix
from lepton.cloud import Registry, TrainConfig, train
from lepton.errors import ConfigError, LeptonError
from lepton.protocol import resolve_broker

log = logging.getLogger("lepton.trainer")


def labelled_samples(data: Path, fleet: str) -> int:
    """Labelled rows in the fleet's dataset, reading only the label column."""
    import pyarrow.parquet as pq

    from lepton.cloud._data_config import dataset_files

    total = 0
    for path in dataset_files(data, fleet):
        try:
            column = pq.read_table(path, columns=["label"]).column("label")
        except FileNotFoundError:  # compacted away since listing
            continue
        total += len(column) - column.null_count
    return total


def seen_by_newest(data: Path, model: str) -> int:
    reg = Registry(data)
    versions = reg.versions(model)
    if not versions:
        return 0
    d = reg.get(model, versions[-1]).report.get("data") or {}
    # Everything labelled that the newest version looked at, whichever side or pipeline.
    return int(d.get("rows", 0)) - int(d.get("unlabelled", 0))


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The settings of one round; raises ConfigError on a bad id, path or flag (checked at start-up)."""
    if not args.data.is_dir():
        raise ConfigError(
            f"--data {args.data} is not a directory; point it at the ingest worker's dataset directory"
        )
    return TrainConfig(
        data=args.data,
        fleet=args.fleet,
        prefix=args.prefix,
        model=args.model,
        epochs=args.epochs,
        publish=args.broker is not None,
        broker=args.broker,
        key=args.key,
        tolerance_points=args.tolerance,
        val_data=args.val_data,
        trusted_devices=tuple(d.strip() for d in (args.trusted_devices or "").split(",") if d.strip()),
        max_device_share=args.max_device_share,
    )


def check_and_train(args: argparse.Namespace) -> int:
    have, seen = labelled_samples(args.data, args.fleet), seen_by_newest(args.data, args.model)
    if have - seen < args.min_new:
        log.info(
            "%d labelled samples, %d new since the last version (< %d): nothing to do",
            have,
            have - seen,
            args.min_new,
        )
        return exitcodes.OK
    log.info("%d labelled samples, %d new: training %s", have, have - seen, args.model)
    result = train(train_config(args))
    gate = result.report["gate"]
    validation = result.report.get("validation", {})
    log.info(
        "%s v%d: %s (val accuracy %.4f on %s, %s samples; %s)",
        args.model,
        result.version.version,
        result.status,
        gate["new_accuracy"],
        validation.get("source"),
        validation.get("samples"),
        gate["reason"],
    )
    if not validation.get("trusted"):
        log.warning("%s", validation.get("warning"))
    return exitcodes.GATE_REFUSED if result.status == "refused" else exitcodes.OK


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--fleet", required=True)
    add_prefix_argument(p)
    p.add_argument("--model", required=True)
    p.add_argument(
        "--broker", default=None, help="publish here (env LEPTON_BROKER; without either: train and register)"
    )
    p.add_argument("--password-file", default=None, help="file (mode 0600) holding the broker password")
    p.add_argument("--key", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--tolerance", type=float, default=1.0, help="gate tolerance in accuracy points")
    p.add_argument("--val-data", type=Path, default=None, help="trusted validation set (Parquet file/folder)")
    p.add_argument("--trusted-devices", default=None, metavar="ID,ID", help="devices whose samples validate")
    p.add_argument("--max-device-share", type=float, default=0.34, help="cap on one device's training share")
    p.add_argument("--min-new", type=int, default=200, help="new labelled samples that trigger a retrain")
    p.add_argument("--interval", type=float, default=600.0, help="seconds between checks")
    p.add_argument("--once", action="store_true", help="check (and train) once, then exit")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.prefix = resolve_prefix(args)
        resolved = resolve_broker(args.broker, password_file=args.password_file, environ=os.environ)
    except ConfigError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if resolved is not None and resolved.warning:
        print(f"trainer: warning: {resolved.warning}", file=sys.stderr)
    args.broker = resolved.url.secret_url() if resolved is not None else None
    try:
        train_config(args)  # a bad id, path or flag is a usage error now, not a failed round later
    except ConfigError as exc:
        print(f"trainer: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    if args.once:
        try:
            return check_and_train(args)
        except LeptonError as exc:
            log.error("%s", exc)
            return exitcodes.FAILURE
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    while not stop.is_set():
        try:
            check_and_train(args)
        except Exception:  # noqa: BLE001 - a bad round must not end the service
            log.exception("training round failed; retrying in %.0f s", args.interval)
        stop.wait(args.interval)
    return exitcodes.OK


if __name__ == "__main__":
    sys.exit(main())
