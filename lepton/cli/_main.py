"""Entry point: builds the parser from the command modules and maps errors to exit codes."""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys

from lepton.cli import _exit
from lepton.errors import BrokerConnectionError, ConfigError, LeptonError

#: command name -> (module under lepton.cli, one-line help). Modules are imported only when run,
#: so `lepton device` never imports the cloud's torch and `lepton --help` stays fast.
COMMANDS: dict[str, tuple[str, str]] = {
    "broker": ("_broker", "run the embedded MQTT broker (amqtt) for development and demos"),
    "device": ("_device", "run an edge device agent: capture, preprocess, spool, publish, infer"),
    "worker": ("_worker", "run a cloud ingest worker: samples -> exactly-once Parquet dataset"),
    "serve": ("_serve", "run a cloud inference worker: devices' infer requests -> cloud model answers"),
    "train": ("_train", "train a model on the dataset, export int8 ONNX, sign and publish it"),
    "models": ("_models", "list, inspect and roll back model versions in the registry"),
    "keys": ("_keys", "generate the Ed25519 key pair that signs models"),
    "dataset": ("_dataset", "inspect (stats) and compact the Parquet dataset"),
    "status": ("_status", "show the fleet from retained status and telemetry topics"),
    "dashboard": ("_dashboard", "serve the fleet live in the browser, with /metrics for Prometheus"),
    "demo": ("_demo", "run the whole edge-cloud loop on one machine"),
}


def build_parser() -> argparse.ArgumentParser:
    from lepton import __version__

    parser = argparse.ArgumentParser(
        prog="lepton",
        description="Lepton: edge-cloud collaborative AI over MQTT. Devices publish feature tensors, "
        "workers store them exactly once, train, and push signed int8 ONNX models back for hot-swap.",
        epilog=f"Run `lepton COMMAND --help` for a command's options. Exit codes: {_exit.summary()}.",
    )
    parser.add_argument("--version", action="version", version=f"lepton {__version__}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="logging verbosity on stderr (default: WARNING)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(f"lepton.cli.{module}")
        except ModuleNotFoundError as exc:
            if exc.name != f"lepton.cli.{module}":
                raise
            p = sub.add_parser(name, help=f"{help_text} [not built yet]")
            p.set_defaults(handler=_not_built(name))
            continue
        p = sub.add_parser(name, help=help_text, description=getattr(mod, "DESCRIPTION", help_text),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.register(p)
    return parser


def _not_built(name: str):
    def handler(args: argparse.Namespace) -> int:
        print(f"lepton {name}: not implemented yet in this version", file=sys.stderr)
        return _exit.NOT_IMPLEMENTED

    return handler


def _honour_ctrl_c() -> None:
    """Every command stops on SIGINT (Ctrl-C, and how the demo and operators stop children). A process
    started in the background of a non-interactive shell (``cmd &`` in a script, CI runners) inherits
    SIGINT *ignored*, and Python then installs no KeyboardInterrupt handler: the command would run on
    and its supervisor would have to SIGKILL it, orphaning what it started. Put the handler back."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def main(argv: list[str] | None = None) -> int:
    _honour_ctrl_c()
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        return _exit.INTERRUPTED
    except ConfigError as exc:
        print(f"lepton {args.command}: error: {exc}", file=sys.stderr)
        return _exit.USAGE
    except BrokerConnectionError as exc:
        print(f"lepton {args.command}: error: {exc}", file=sys.stderr)
        return _exit.BROKER
    except LeptonError as exc:
        print(f"lepton {args.command}: error: {exc}", file=sys.stderr)
        return _exit.FAILURE


if __name__ == "__main__":
    sys.exit(main())
