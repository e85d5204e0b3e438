"""lepton demo: the whole edge-cloud loop on one machine."""

from __future__ import annotations

import argparse
import json
import sys

from lepton.cli import _exit, _prefix

DESCRIPTION = """\
Run the whole Lepton loop on this machine with real processes talking MQTT:
an embedded amqtt broker, N device agents streaming their slice of the UCI handwritten digits
(scikit-learn's load_digits), and an ingest worker that stores every sample exactly once, retrains
a CNN with PyTorch Lightning, compresses it to int8 ONNX, signs it and publishes it; the devices
verify and hot-swap each new model while they keep inferring.

Edge accuracy is prequential: each device predicts every new sample with the model it serves at that
moment, before the sample reaches the cloud, so no prediction is scored on training data.

Ctrl-C stops every child process cleanly. Everything it writes stays under --workdir (a temporary
folder by default; its path is printed at the end).

examples:
  lepton demo
  lepton demo --devices 5 --duration 120 --json
  lepton demo --joint --json      # edge + cloud models, escalation, joint accuracy
  lepton demo --dashboard         # and watch it at http://127.0.0.1:8050/
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--devices", type=int, default=3, help="number of device processes (default 3)")
    parser.add_argument("--duration", type=float, default=110.0,
                        help="stop after this many seconds even if devices are still streaming (default 110)")
    parser.add_argument("--broker", default=None,
                        help="use this broker (mqtt://user:pass@host:port) instead of the embedded one; "
                        "every process uses this one user, so it must be allowed on all topics (the "
                        "embedded broker, or Mosquitto without the project's per-device ACL); the fleet "
                        "is then demo-<random> so earlier runs' retained models do not interfere; its "
                        "password: --password-file PATH (mode 0600) or $LEPTON_PASSWORD, not in the URL "
                        "(argv is readable by every local user); children get it in their environment")
    parser.add_argument("--password-file", metavar="PATH", default=None,
                        help="read the --broker password from this file (mode 0600)")
    parser.add_argument("--rate", type=float, default=10.0, help="samples per second per device (default 10)")
    parser.add_argument("--train-every", type=int, default=300,
                        help="retrain after this many new labelled samples (default 300)")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model (default 10)")
    parser.add_argument("--joint", action="store_true",
                        help="edge-cloud collaboration: a tiny edge model, a cloud model (trained once "
                        "--cloud-after samples are stored) served by `lepton serve`, and devices that "
                        "escalate their least confident --escalate-rate samples; the devices loop over "
                        "their slice until the cloud has answered 200 samples, or --duration")
    parser.add_argument("--escalate-rate", type=float, default=0.2, metavar="R",
                        help="with --joint: the share of samples each device asks the cloud about (0.2)")
    parser.add_argument("--cloud-after", type=int, default=600, metavar="N",
                        help="with --joint: train the cloud model once N samples are stored (600)")
    parser.add_argument("--dashboard", nargs="?", type=int, const=8050, default=None, metavar="PORT",
                        help="also serve the fleet dashboard on http://127.0.0.1:PORT/ (default 8050; 0 picks "
                        "a free port) and print its URL")
    parser.add_argument("--workdir", default=None, help="folder for broker, dataset, spools, models and logs")
    _prefix.add_prefix_argument(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout at the end")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from lepton._demo import DemoConfig, run_demo
    from lepton.cli import _credentials
    from lepton.errors import ChildCrashed

    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "demo", required=False, env_url=False)
    config = DemoConfig(devices=args.devices, duration=args.duration, broker=broker, rate=args.rate,
                        train_every=args.train_every, epochs=args.epochs, prefix=prefix,
                        joint=args.joint, escalate_rate=args.escalate_rate, cloud_after=args.cloud_after,
                        dashboard_port=args.dashboard,
                        workdir=Path(args.workdir) if args.workdir else None)
    try:
        result = run_demo(config, as_json=args.json)
    except ChildCrashed as exc:  # a failure of the demo, not of its flags: exit 7, not 2
        lead = "" if args.json else "\n"  # after the progress line
        print(f"{lead}lepton demo: error: {exc}", file=sys.stderr)
        return _exit.CHILD_FAILED
    if args.json:
        print(json.dumps(result, sort_keys=True))
    else:
        _print_summary(result)
    if result.get("interrupted"):
        return _exit.INTERRUPTED
    if not result.get("model_version"):
        lead = "" if args.json else "\n"
        print(f"{lead}lepton demo: error: no model reached the devices within --duration {args.duration:g} s "
              f"({result.get('samples_ingested') or 0} samples ingested); raise --duration, or see the "
              f"training log in {result.get('workdir')}/logs", file=sys.stderr)
        return _exit.FAILURE
    return _exit.OK


def _print_summary(r: dict) -> None:
    acc = r.get("edge_accuracy")
    acc_text = "-" if acc is None else f"{acc:.3f}"
    lines = [
        "",
        "lepton demo summary",
        f"  devices                {len(r['devices'])}",
        f"  samples ingested       {r.get('samples_ingested')}",
        f"  model version          {r.get('model_version')}",
        f"  first model deployed   {r.get('time_to_first_model_s')} s after start",
        f"  edge accuracy          {acc_text} over {r.get('edge_accuracy_samples')} predictions of the "
        f"final model (all versions: {r.get('edge_accuracy_all_versions')})",
        f"  model size             {r.get('model_size_bytes')} bytes "
        f"({r.get('compression_ratio')} of the fp32 export)",
        f"  shipped                {r.get('model_quantization')}: {r.get('quantization_reason')}",
        *([f"  joint accuracy         {r.get('joint_accuracy')} (edge alone {r.get('edge_only_accuracy')}) "
           f"over {r.get('joint_accuracy_samples')} samples; cloud model v{r.get('cloud_model_version')}",
           f"  escalated              {r.get('escalated_fraction')} of samples, {r.get('cloud_answers')} "
           f"answered by the cloud, answer p99 {r.get('answer_p99_ms')} ms",
           f"  bytes sent             {r.get('upload_bytes_fraction')} of uploading every sample once"]
          if "joint_accuracy" in r else []),
        f"  duration               {r.get('duration_s')} s",
        f"  files                  {r.get('workdir')}",
    ]
    print("\n".join(lines), file=sys.stderr)
