"""lepton worker: the cloud ingest worker (device samples -> exactly-once Parquet dataset)."""

from __future__ import annotations

import argparse
import os
import sys

from lepton.cli import _credentials, _exit, _prefix
from lepton.cli._foreground import run_until_signal

DESCRIPTION = """\
Subscribe to every device's samples of a fleet and store them exactly once as Parquet under
DIR/FLEET/data/ (schema: docs/dataset.md). A message is acknowledged to the broker only after all its
samples are fsynced and committed to the index (DIR/FLEET/index.sqlite), or dead-lettered: bad
messages and bad samples are reported on PREFIX/FLEET/deadletter and kept in DIR/FLEET/quarantine/.
After each write the worker publishes the stored seq ranges on devices/ID/acks, so devices can delete
their spool. Its status (retained, Last Will) is on PREFIX/FLEET/workers/NAME/status. PREFIX is
--prefix (env LEPTON_PREFIX, default lepton); one --data folder serves one prefix.

--group NAME splits the stream between several workers with a shared subscription ($share/NAME/...;
Mosquitto, EMQX, VerneMQ; not the embedded amqtt broker). Workers of a group must use the same --data
folder and distinct --name. The exactly-once index is DIR/FLEET/index.sqlite by default (SQLite
locking: workers on one machine, a local filesystem); with --index postgresql://USER@HOST/DB it lives
in PostgreSQL, for workers on several machines that all mount the same --data folder (password in
$PGPASSWORD or ~/.pgpass; docs/dataset.md).

--train-every N / --train-interval S start
`python -m lepton train --data DIR --fleet F --prefix P --model NAME` as a separate process when N new
labelled samples arrived (or S seconds passed with new ones); one run at a time, output in
DIR/FLEET/train.log. --train-arg passes extra flags (repeat it).

Runs until SIGINT/SIGTERM, then writes what it received and exits 0.

environment: LEPTON_BROKER, LEPTON_FLEET, LEPTON_PREFIX, LEPTON_DATA provide defaults for --broker,
--fleet, --prefix, --data.
The broker password comes from --password-file PATH (mode 0600), $LEPTON_PASSWORD or $LEPTON_BROKER;
a password written in --broker works but is visible to every local user. The training child gets
the broker URL in its environment ($LEPTON_BROKER), never on its command line; give it a user of its
own with --train-broker mqtt://trainer@host:1883 --train-password-file PATH (the shipped mosquitto.conf
binds client ids to users, so a child with the worker's user would kick the worker off).

examples:
  lepton worker --broker mqtt://w1@localhost:1883 --password-file w1.pw --fleet f1 --data ./data
  LEPTON_BROKER=mqtt://w2:secret@localhost:1883 lepton worker --fleet f1 --data ./data --group ingest \\
      --name w2
  PGPASSWORD=... lepton worker ... --group ingest --name w3 --index postgresql://lepton@db:5432/lepton
  lepton worker ... --train-every 500 --model digits --key model.key --train-publish --train-arg=--epochs=5
"""


def register(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    _credentials.add_broker_arguments(parser, help="broker URL mqtt://USER@HOST:1883")
    parser.add_argument("--fleet", default=env.get("LEPTON_FLEET"), help="fleet name (env LEPTON_FLEET)")
    _prefix.add_prefix_argument(parser)
    parser.add_argument(
        "--data",
        default=env.get("LEPTON_DATA"),
        metavar="DIR",
        help="dataset root; files go to DIR/FLEET/data (env LEPTON_DATA)",
    )
    parser.add_argument(
        "--name", default="worker", help="worker name: client id and status topic (default worker)"
    )
    parser.add_argument("--group", default=None, metavar="NAME", help="shared-subscription group")
    parser.add_argument(
        "--index", default=env.get("LEPTON_INDEX"), metavar="URL",
        help="exactly-once index in PostgreSQL, postgresql://USER@HOST[:PORT]/DB (env LEPTON_INDEX; "
        "password in $PGPASSWORD); default DIR/FLEET/index.sqlite",
    )
    parser.add_argument(
        "--batch", type=int, default=4096, metavar="N", help="samples per file at most (4096)"
    )
    parser.add_argument(
        "--batch-ms",
        type=float,
        default=100.0,
        metavar="T",
        help="wait at most T ms for more messages before a write (default 100)",
    )
    parser.add_argument(
        "--max-pending",
        type=int,
        default=1000,
        metavar="M",
        help="messages per write at most; match the broker's max_inflight_messages (1000)",
    )
    parser.add_argument(
        "--status-interval",
        type=float,
        default=2.0,
        metavar="S",
        help="retained status period in seconds (default 2)",
    )
    parser.add_argument(
        "--train-every",
        type=int,
        default=None,
        metavar="N",
        help="start training after N new labelled samples",
    )
    parser.add_argument(
        "--train-interval",
        type=float,
        default=None,
        metavar="S",
        help="start training every S seconds if new labelled samples arrived",
    )
    parser.add_argument("--model", default=None, metavar="NAME", help="model to train (with --train-*)")
    parser.add_argument("--key", default=None, metavar="FILE", help="signing key passed to lepton train")
    parser.add_argument(
        "--train-publish",
        action="store_true",
        help="pass --publish to lepton train (the broker URL goes in its environment)",
    )
    parser.add_argument(
        "--train-broker",
        default=None,
        metavar="URL",
        help="the training child's broker user, e.g. mqtt://trainer@host:1883 (env LEPTON_TRAIN_BROKER; "
        "default: the worker's own, which brokers binding client ids to users let it kick the worker with)",
    )
    parser.add_argument(
        "--train-password-file",
        default=None,
        metavar="PATH",
        help="the --train-broker password (mode 0600; or a whole URL in LEPTON_TRAIN_BROKER)",
    )
    parser.add_argument(
        "--train-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for lepton train (repeatable), e.g. --train-arg=--epochs=5",
    )
    bounds = parser.add_argument_group("bounds (what one device can cost the worker)")
    bounds.add_argument(
        "--max-payload-kb", type=int, default=4096, metavar="KB",
        help="larger messages are dead-lettered unread; keep it at the broker's max_packet_size (4096)",
    )
    bounds.add_argument(
        "--max-queue-mb", type=int, default=256, metavar="MB",
        help="received, unwritten payload bytes at most; beyond: QoS 1 waits, QoS 0 is dropped (256)",
    )
    bounds.add_argument(
        "--quarantine-mb", type=int, default=1024, metavar="MB",
        help="quarantined payloads kept in all, de-duplicated by hash (1024)",
    )
    bounds.add_argument(
        "--quarantine-device-mb", type=int, default=64, metavar="MB",
        help="quarantined payloads kept per device (64); beyond, dead letters are reported, not kept",
    )
    parser.add_argument("--json", action="store_true", help="progress as one JSON status per line on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.cloud._ingest import IngestWorker
    from lepton.cloud._ingest_config import WorkerConfig
    from lepton.errors import ConfigError

    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "worker")
    train_broker = None
    if (args.train_broker or args.train_password_file) and not args.train_publish:
        raise ConfigError("--train-broker and --train-password-file need --train-publish")
    if args.train_publish:
        from lepton.protocol import resolve_broker

        resolved = resolve_broker(args.train_broker, password_file=args.train_password_file,
                                  environ={"LEPTON_BROKER": os.environ.get("LEPTON_TRAIN_BROKER", "")})
        if resolved is None and args.train_password_file:
            raise ConfigError("--train-password-file needs --train-broker URL (or LEPTON_TRAIN_BROKER)")
        if resolved is not None and resolved.warning:
            print(f"lepton worker: warning: {resolved.warning.replace('--broker', '--train-broker')}",
                  file=sys.stderr)
        train_broker = resolved.url.secret_url() if resolved is not None else None
    for flag in ("fleet", "data"):
        if not getattr(args, flag):
            raise ConfigError(f"--{flag} is required (or set LEPTON_{flag.upper()})")
    config = WorkerConfig(
        broker=broker,
        fleet=args.fleet,
        prefix=prefix,
        data=args.data,
        name=args.name,
        group=args.group,
        index=args.index,
        batch=args.batch,
        batch_ms=args.batch_ms,
        max_pending=args.max_pending,
        status_interval=args.status_interval,
        train_every=args.train_every,
        train_interval=args.train_interval,
        model=args.model,
        key=args.key,
        train_publish=args.train_publish,
        train_broker=train_broker,
        train_args=tuple(args.train_arg),
        max_payload_bytes=args.max_payload_kb * 1024,
        max_queue_bytes=args.max_queue_mb * 1024 * 1024,
        quarantine_bytes=args.quarantine_mb * 1024 * 1024,
        quarantine_device_bytes=args.quarantine_device_mb * 1024 * 1024,
    )
    worker = IngestWorker(config)
    def progress(st: dict) -> str:
        return (
            f"[{args.name}] stored {st['stored']}  dup {st['duplicates']}  "
            f"dead {st['dead_letters']}  files {st['files']}  {st['samples_per_s']:.0f}/s  "
            f"queue {st['queue']}"
        )

    tty = run_until_signal(worker, args, progress)
    stats = worker.stats
    if not args.quiet:
        end = "\n" if tty else ""
        print(
            f"{end}[{args.name}] stopped: stored {stats.stored}, duplicates {stats.duplicates}, "
            f"dead letters {stats.dead_letters}, files {stats.files}",
            file=sys.stderr,
        )
    return _exit.OK
