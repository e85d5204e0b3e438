"""lepton device: run one edge device agent."""

from __future__ import annotations

import argparse
import json
import sys

from lepton.cli import _credentials, _exit, _prefix

DESCRIPTION = """\
Run an edge device: capture frames from a source, preprocess them with OpenCV, keep them in a durable
on-disk spool, publish them in batches (QoS 1) and delete them only when the cloud acknowledges them on
devices/{id}/acks. With --model it also runs the fleet's current model on every sample and hot-swaps
newer signed versions.

sources:  camera:N | video:PATH | folder:PATH (label = sub-folder) | digits | digits:I/N (slice I of N)
presets:  digits, camera-gray-32, camera-edges-32, camera-hog, color-hist (or --pipeline spec.json/.toml)

exit codes: 0 everything captured was acknowledged, 2 bad flag/source/spec/URL, 3 broker unreachable or
password refused, 4 stopped with unacknowledged samples (they stay in the spool for the next run).

credentials: the password comes from --password-file PATH (mode 0600), $LEPTON_PASSWORD, or a whole
URL in $LEPTON_BROKER; a password written in --broker works but is visible to every local user.

examples:
  lepton device --broker mqtt://cam-1@localhost:1883 --password-file cam-1.pw --fleet demo --id cam-1 \\
      --source digits --limit 500
  LEPTON_PASSWORD=... lepton device --broker mqtts://gw@broker:8883 --fleet plant --id gw --source camera:0 \\
      --preset camera-gray-32 --rate 5 --model digits --public-key lepton.pub --predictions
  lepton device ... --model digits --public-key lepton.pub --escalate-rate 0.1 \\
      --upload escalated+sample:0.05      # the hard 10 % go to the cloud and to the dataset, plus 5 %
"""


def register(parser: argparse.ArgumentParser) -> None:
    conn = parser.add_argument_group("connection")
    _credentials.add_broker_arguments(
        conn, help="mqtt://USER@HOST:PORT or mqtts://... (user = device id on Mosquitto)"
    )
    conn.add_argument("--fleet", required=True, help="fleet name (topics PREFIX/FLEET/...)")
    _prefix.add_prefix_argument(conn)
    conn.add_argument(
        "--id", required=True, dest="device_id", metavar="ID", help="device id (also the client id)"
    )
    conn.add_argument("--ca-certs", metavar="FILE", help="CA bundle for mqtts:// (default: system store)")
    conn.add_argument(
        "--offline-ok",
        action="store_true",
        help="start even if the broker is unreachable: spool and retry in the background",
    )

    cap = parser.add_argument_group("capture and preprocessing")
    cap.add_argument(
        "--source",
        required=True,
        metavar="SPEC",
        help="camera:N, video:PATH, folder:PATH, digits or digits:I/N",
    )
    pipe = cap.add_mutually_exclusive_group()
    pipe.add_argument("--pipeline", metavar="FILE", help="preprocessing spec (.json or .toml)")
    pipe.add_argument(
        "--preset",
        metavar="NAME",
        help="named preprocessing spec (default: digits for the digits source, camera-gray-32 otherwise)",
    )
    cap.add_argument("--rate", type=float, metavar="HZ", help="capture at most HZ samples per second")
    cap.add_argument(
        "--limit", type=int, metavar="N", help="stop after N samples are captured and acknowledged"
    )
    cap.add_argument("--once", action="store_true", help="read a finite source once instead of replaying it")

    pub = parser.add_argument_group("publishing and spool")
    pub.add_argument("--batch", type=int, default=32, metavar="N", help="samples per envelope (default 32)")
    pub.add_argument(
        "--batch-ms",
        type=float,
        default=50.0,
        metavar="T",
        help="send a partial batch once its oldest sample is T ms old (default 50)",
    )
    pub.add_argument(
        "--max-message-kb",
        type=float,
        default=1000.0,
        metavar="KB",
        help="split a batch into envelopes of at most KB kilobytes (default 1000: Mosquitto 2.1 refuses "
        "packets over 2,000,000 bytes; use 120 for AWS IoT Core)",
    )
    pub.add_argument("--spool", metavar="DIR", help="spool directory (default ~/.lepton/spool/FLEET/ID)")
    pub.add_argument(
        "--spool-max-mb", type=float, default=256.0, metavar="MB", help="spool bound (default 256)"
    )
    pub.add_argument(
        "--on-full",
        choices=["drop-oldest", "block"],
        default="drop-oldest",
        help="when the spool is full: drop the oldest samples (counted) or block capture",
    )
    pub.add_argument(
        "--fsync",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="spool is power-loss safe: one fsync per group commit of samples (default). --no-fsync "
        "survives a crash or kill -9 but a power cut can lose samples the device believed spooled",
    )
    pub.add_argument(
        "--ack-timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="resend unacknowledged samples after S seconds without ack progress (default 10)",
    )
    pub.add_argument(
        "--drain-timeout",
        type=float,
        metavar="S",
        help="after --limit/--once, wait at most S seconds for acks (default: until acked)",
    )
    pub.add_argument("--telemetry-interval", type=float, default=5.0, metavar="S", help="default 5")

    model = parser.add_argument_group("on-device inference")
    model.add_argument(
        "--model", metavar="NAME", help="serve the fleet's model NAME and hot-swap new versions"
    )
    key = model.add_mutually_exclusive_group()
    key.add_argument("--public-key", metavar="FILE", help="Ed25519 public key (.pub PEM) that signs models")
    key.add_argument("--no-verify", action="store_true", help="accept unsigned models (development only)")
    model.add_argument("--predictions", action="store_true", help="publish every prediction as JSON")

    joint = parser.add_argument_group(
        "edge-cloud collaboration (a `lepton serve` worker answers on devices/{id}/answers)"
    )
    how = joint.add_mutually_exclusive_group()
    how.add_argument("--escalate-below", type=float, metavar="C",
                     help="ask the cloud about predictions whose calibrated confidence is below C")
    how.add_argument("--escalate-rate", type=float, metavar="R",
                     help="ask the cloud about the least confident fraction R of the predictions (a budget "
                     "that holds as the data drifts)")
    how.add_argument("--cloud-only", action="store_true",
                     help="no local model: the cloud answers every sample")
    joint.add_argument("--answer-timeout-ms", type=float, default=250.0, metavar="MS",
                       help="how long an escalated sample waits for the cloud before the device's own "
                       "answer stands (default 250); local inference never waits")
    joint.add_argument("--upload", default="all", metavar="POLICY",
                       help="which samples enter the dataset: all (default), escalated, sample:P or "
                       "escalated+sample:P (the hard ones plus an unbiased random fraction P)")

    out = parser.add_argument_group("output")
    out.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.device import DeviceAgent, DeviceConfig
    from lepton.errors import ConfigError

    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "device")
    if args.spool_max_mb <= 0:
        raise ConfigError("--spool-max-mb must be > 0")
    if args.model is None and (args.public_key or args.no_verify) or (
            args.predictions and args.model is None and not args.cloud_only):
        raise ConfigError("--public-key, --no-verify and --predictions need --model NAME (or --cloud-only "
                          "for --predictions)")
    pipeline = (
        args.pipeline or args.preset or ("digits" if args.source.startswith("digits") else "camera-gray-32")
    )
    config = DeviceConfig(
        broker=broker,
        fleet=args.fleet,
        prefix=prefix,
        device_id=args.device_id,
        source=args.source,
        pipeline=pipeline,
        rate_hz=args.rate,
        limit=args.limit,
        once=args.once,
        batch_size=args.batch,
        batch_ms=args.batch_ms,
        max_message_bytes=int(args.max_message_kb * 1000),
        spool_dir=args.spool,
        spool_max_bytes=int(args.spool_max_mb * 1024 * 1024),
        on_full=args.on_full,
        fsync=args.fsync,
        ack_timeout=args.ack_timeout,
        drain_timeout=args.drain_timeout,
        telemetry_interval=args.telemetry_interval,
        require_broker=not args.offline_ok,
        model=args.model,
        public_key=args.public_key,
        verify=not args.no_verify,
        predictions=args.predictions,
        ca_certs=args.ca_certs,
        escalate_below=args.escalate_below,
        escalate_rate=args.escalate_rate,
        cloud_only=args.cloud_only,
        answer_timeout_ms=args.answer_timeout_ms,
        upload=args.upload,
    )
    if args.pipeline is None and args.preset is not None:
        from lepton.device import PRESETS

        if args.preset not in PRESETS:
            raise ConfigError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    agent = DeviceAgent(config)
    live = not args.quiet and sys.stderr.isatty()
    summary = agent.run(on_progress=_progress if live else None)
    if live:
        sys.stderr.write("\n")
    if args.json:
        print(json.dumps(summary.as_dict(), sort_keys=True))
    elif not args.quiet:
        print(_final_line(summary), file=sys.stderr)
    if summary.skipped:
        shown = ", ".join(summary.skipped_items[:3]) + (" ..." if len(summary.skipped_items) > 3 else "")
        print(
            f"lepton device: warning: skipped {summary.skipped} unreadable input(s): {shown}", file=sys.stderr
        )
    return _exit.OK if summary.ok else _exit.UNACKED


def _progress(agent) -> None:  # noqa: ANN001
    c = agent.counters
    version = getattr(agent.runtime, "version", None)
    model = (
        f"  model v{version}" if version is not None else ("  model -" if agent.runtime is not None else "")
    )
    link = "" if agent.connected else "  [offline]"
    line = (
        f"captured {c.captured}  acked {c.acked}  spool {agent.spool.depth}  dropped {agent.spool.dropped}"
        f"{model}{link}"
    )
    sys.stderr.write("\r" + line[:120].ljust(79))
    sys.stderr.flush()


def _final_line(s) -> str:  # noqa: ANN001
    if s.ok:
        state = "all acknowledged"
    elif s.spool_depth:
        state = f"{s.spool_depth} unacknowledged (kept in the spool)"
    else:
        state = f"{s.dropped_this_run} dropped by a full spool before they were acknowledged"
    model = f", model v{s.model_version}" if s.model_version is not None else ""
    j = s.collaboration
    if j.get("escalation") not in (None, "off"):
        model += (f", escalated {j['escalated']} ({j['escalation']}): cloud answered {j['answered_by_cloud']}, "
                  f"edge {j['answered_by_edge']}; uploaded {j['uploaded']} ({j['upload']})")
    return (
        f"lepton device {s.device}: captured {s.captured}, published {s.published} ({s.resent} resent), "
        f"acked {s.acked}, dropped {s.dropped}, skipped {s.skipped}{model}; {state} [{s.stopped_by}]"
    )
