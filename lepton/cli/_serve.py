"""lepton serve: the cloud inference worker (devices' infer requests -> the cloud model's answers)."""

from __future__ import annotations

import argparse
from pathlib import Path
import os
import sys

from lepton.cli import _credentials, _exit, _prefix
from lepton.cli._foreground import run_until_signal

DESCRIPTION = """\
Answer the infer requests of a fleet's devices (lepton/FLEET/devices/+/infer) with the fleet's model
NAME, run with ONNX Runtime, on lepton/FLEET/devices/ID/answers (protocol: docs/protocol.md, "Cloud
inference"). The model is fetched and hot-swapped the way a device does it: from the retained, signed
manifest and chunks on lepton/FLEET/models/NAME, verified with --public-key before it is served. Publish
the larger cloud model under a name of its own (e.g. `lepton train --model digits-cloud --publish`).

Every request gets one answer: a label with its confidence, or an error code (no_model, wrong_pipeline,
wrong_shape, expired, overloaded, bad_request, inference_failed). The queue holds --max-queue requests;
beyond it requests are shed at once with `overloaded`. Status (retained, Last Will) on
lepton/FLEET/workers/NAME/status: answers per second, latency p50/p99, queue depth, shed count, model
version.

--group G splits the requests between several serve workers with a shared subscription
($share/G/...; Mosquitto, EMQX, VerneMQ). The embedded amqtt broker has no shared subscriptions, so
--group is refused there (exit 2). On Mosquitto (use_username_as_clientid) every worker needs a broker
user of its own (role worker).

With --data DIR (the ingest worker's --data, on the same machine or a shared disk), every answer is
also recorded as a teacher label (DIR/FLEET/labels/, with its confidence and model version): what the
edge found hard, labelled by the cloud model, teaches the next edge model (lepton train --labels).

Runs until SIGINT/SIGTERM, then publishes its offline status and exits 0.

environment: LEPTON_BROKER, LEPTON_FLEET provide defaults for --broker and --fleet. The broker password
comes from --password-file PATH (mode 0600), $LEPTON_PASSWORD or $LEPTON_BROKER.

examples:
  lepton serve --broker mqtt://serve1@localhost:1883 --password-file serve1.pw --fleet f1 \\
      --model digits-cloud --public-key lepton.pub
  lepton serve ... --group cloud --name serve2        # a second worker taking half the requests
  lepton serve ... --data ./data                      # also record answers as teacher labels
"""


def register(parser: argparse.ArgumentParser) -> None:
    env = os.environ
    _credentials.add_broker_arguments(parser, help="broker URL mqtt://USER@HOST:1883 (a worker-role user)")
    _prefix.add_prefix_argument(parser)
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="record every answer as a teacher label in DIR/FLEET/labels/ (the ingest "
                        "worker's --data; lepton train --labels uses them)")
    parser.add_argument("--fleet", default=env.get("LEPTON_FLEET"), help="fleet name (env LEPTON_FLEET)")
    parser.add_argument("--model", required=True, metavar="NAME", help="the fleet's model to serve")
    parser.add_argument("--name", default="serve", help="worker name: client id and status topic (serve)")
    parser.add_argument("--group", default=None, metavar="G", help="shared-subscription group")
    key = parser.add_mutually_exclusive_group()
    key.add_argument("--public-key", metavar="FILE", help="Ed25519 public key (.pub PEM) that signs models")
    key.add_argument("--no-verify", action="store_true", help="serve unsigned models (development only)")
    parser.add_argument("--max-queue", type=int, default=256, metavar="N",
                        help="requests waiting at most; more are answered `overloaded` (256)")
    parser.add_argument("--max-device-queue", type=int, default=None, metavar="N",
                        help="requests of one device waiting at most (default: --max-queue)")
    parser.add_argument("--max-batch", type=int, default=32, metavar="N",
                        help="requests run in one ONNX Runtime call at most (32)")
    parser.add_argument("--max-request-kb", type=int, default=4096, metavar="KB",
                        help="larger requests are answered `bad_request` unread (4096)")
    parser.add_argument("--threads", type=int, default=1, metavar="N", help="ONNX Runtime threads (1)")
    parser.add_argument("--status-interval", type=float, default=2.0, metavar="S",
                        help="retained status period in seconds (2)")
    parser.add_argument("--json", action="store_true", help="one JSON status per line on stdout")
    parser.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.cloud._serve import ServeWorker
    from lepton.cloud._serve_config import ServeConfig
    from lepton.errors import ConfigError, ProtocolError

    broker = _credentials.broker_url(args, "serve")
    assert broker is not None  # required=True: a missing URL raised ConfigError
    if not args.fleet:
        raise ConfigError("--fleet is required (or set LEPTON_FLEET)")
    if args.max_request_kb < 1:
        raise ConfigError("--max-request-kb must be >= 1")
    try:
        config = ServeConfig(
            broker=broker, fleet=args.fleet, model=args.model, name=args.name, group=args.group,
            public_key=args.public_key, verify=not args.no_verify, max_queue=args.max_queue,
            max_device_queue=args.max_device_queue, max_batch=args.max_batch,
            max_payload_bytes=args.max_request_kb * 1024, status_interval=args.status_interval,
            threads=args.threads, prefix=_prefix.resolve_prefix(args),
            data=Path(args.data) if args.data else None,
        )
        worker = ServeWorker(config)
    except ProtocolError as exc:  # a bad id: a usage error, exit 2
        raise ConfigError(str(exc)) from None
    def progress(st: dict) -> str:
        lat = st["latency_ms"]
        return (f"[{args.name}] {args.model} v{st['model_version'] or '-'}"
                f"  answered {st['answered']}  errors {sum(st['errors'].values())}"
                f"  shed {st['shed']}  {st['answers_per_s']:.0f}/s"
                f"  p50 {lat['p50'] if lat['p50'] is not None else '-'} ms"
                f"  p99 {lat['p99'] if lat['p99'] is not None else '-'} ms  queue {st['queue']}")

    tty = run_until_signal(worker, args, progress)
    if not args.quiet:
        st = worker.status()
        print(f"{chr(10) if tty else ''}[{args.name}] stopped: answered {st['answered']}, "
              f"errors {sum(st['errors'].values())}, shed {st['shed']}", file=sys.stderr)
    return _exit.OK
