"""lepton models: list, show, roll back and fetch model versions."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lepton.cli import _credentials, _exit, _prefix
from lepton.errors import ConfigError

DESCRIPTION = """\
The model registry lives next to the dataset: DIR/models/NAME/VERSION/ holds the shipped model.onnx,
its manifest fields, the training report, and the signed package last published.

  list       every model and version, with status (published, kept, refused), accuracy and size
  show       one version in full (default: the newest)
  rollback   re-publish an old version's weights as a NEW, higher version (parent = the old one),
             so devices move forward to it like to any update; versions never go down
  publish    publish a stored version as it is (no gate), e.g. after a failed publication
  fetch      rebuild the current model of a fleet from the broker's retained messages and verify it

examples:
  lepton models list --data ./data
  lepton models show digits --data ./data --version 3 --json
  lepton models rollback digits --to 2 --data ./data --publish \\
      --broker mqtt://trainer@localhost:1883 --password-file trainer.pw --fleet demo --key keys/lepton.key
  lepton models fetch digits --broker mqtt://viewer@localhost:1883 --password-file viewer.pw --fleet demo \\
      --public-key keys/lepton.pub --out digits.onnx
"""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--data", required=True, metavar="DIR", help="dataset directory (holds models/)")
    common.add_argument("--json", action="store_true", help="print JSON on stdout")

    p = sub.add_parser("list", parents=[common], help="list models and versions")
    p.set_defaults(handler=run_list)

    p = sub.add_parser("show", parents=[common], help="show one version")
    p.add_argument("name")
    p.add_argument("--version", type=int, default=None, help="version (default: the newest)")
    p.set_defaults(handler=run_show)

    p = sub.add_parser("rollback", parents=[common], help="re-publish an old version as a new, higher one")
    p.add_argument("name")
    p.add_argument("--to", type=int, required=True, metavar="V", help="the version whose weights to restore")
    p.add_argument("--publish", action="store_true", help="publish the new version (else only store it)")
    _credentials.add_broker_arguments(p, help="with --publish: broker URL mqtt://USER@HOST:PORT")
    p.add_argument("--fleet", help="fleet to publish to (default: the fleet V was trained for)")
    _prefix.add_prefix_argument(p)
    p.add_argument("--key", metavar="FILE", help="Ed25519 private key that signs the manifest")
    p.add_argument("--chunk-size", type=int, default=None, metavar="BYTES", help="bytes per chunk message")
    p.set_defaults(handler=run_rollback)

    p = sub.add_parser(
        "publish",
        parents=[common],
        help="publish a stored version (no gate; e.g. after a failed publication)",
    )
    p.add_argument("name")
    p.add_argument("--version", type=int, default=None, help="version (default: the newest)")
    _credentials.add_broker_arguments(p)
    p.add_argument("--fleet", help="fleet to publish to (default: the fleet the version was trained for)")
    _prefix.add_prefix_argument(p)
    p.add_argument("--key", metavar="FILE", help="Ed25519 private key that signs the manifest")
    p.add_argument("--chunk-size", type=int, default=None, metavar="BYTES", help="bytes per chunk message")
    p.set_defaults(handler=run_publish)

    p = sub.add_parser("fetch", help="rebuild and verify the current model from retained messages")
    p.add_argument("name")
    _credentials.add_broker_arguments(p)
    p.add_argument("--fleet", required=True)
    _prefix.add_prefix_argument(p)
    p.add_argument(
        "--public-key", metavar="FILE", help="verify the signature with this key (else hashes only)"
    )
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for the model (default 10)")
    p.add_argument("--out", metavar="FILE", help="write the ONNX bytes here")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON on stdout")
    p.set_defaults(handler=run_fetch)


def _check_ids(args: argparse.Namespace) -> None:
    """A bad model NAME or --fleet is a usage error, found before the registry or broker is touched."""
    from lepton.protocol import validate_id

    if getattr(args, "name", None) is not None:
        validate_id(args.name, kind="model", flag="NAME")
    if getattr(args, "fleet", None) is not None:
        validate_id(args.fleet, kind="fleet", flag="--fleet")


def _registry(args: argparse.Namespace):
    from lepton.cloud._registry import Registry

    _check_ids(args)
    data = Path(args.data)
    if not data.is_dir():
        raise ConfigError(f"--data {data} is not a directory; point it at the dataset directory")
    return Registry(data)


def run_list(args: argparse.Namespace) -> int:
    reg = _registry(args)
    models: dict[str, dict[str, Any]] = {}
    for name in reg.names():
        deployed = {fleet: e["version"] for fleet, e in reg.deployments(name).items()}
        models[name] = {"deployed": deployed, "versions": [v.summary() for v in reg.list(name)]}
    if args.json:
        print(json.dumps({"models": models}, sort_keys=True))
        return _exit.OK
    if not models:
        print(f"no models under {reg.models}", file=sys.stderr)
        return _exit.OK
    print(f"{'model':<16} {'ver':>4} {'status':<14} {'quant':<6} {'bytes':>9} {'val acc':>8} "
          f"{'parent':>6}  deployed")
    for name, m in models.items():
        for v in m["versions"]:
            fleets = ",".join(f for f, ver in m["deployed"].items() if ver == v["version"])
            acc = f"{v['val_accuracy']:.4f}" if v["val_accuracy"] is not None else "-"
            parent = v["parent"] if v["parent"] is not None else "-"
            print(
                f"{name:<16} {v['version']:>4} {v['status']:<14} {v['quantization'] or '-':<6} "
                f"{v['size_bytes'] or 0:>9} {acc:>8} {parent:>6}  {fleets}"
            )
    return _exit.OK


def run_show(args: argparse.Namespace) -> int:
    reg = _registry(args)
    mv = reg.get(args.name, args.version)
    out = {
        "manifest": mv.manifest,
        "report": mv.report,
        "path": str(mv.path),
        "deployed_to": [f for f, e in reg.deployments(args.name).items() if e["version"] == mv.version],
    }
    if args.json:
        print(json.dumps(out, sort_keys=True, default=str))
    else:
        s = mv.summary()
        for key in (
            "name",
            "version",
            "status",
            "parent",
            "quantization",
            "size_bytes",
            "sha256",
            "val_accuracy",
            "labels",
            "pipeline",
            "fleet",
            "gate",
        ):
            print(f"{key:<13} {s[key]}")
        print(f"{'deployed to':<13} {', '.join(out['deployed_to']) or '-'}")
        print(f"{'path':<13} {mv.path}")
    return _exit.OK


def run_rollback(args: argparse.Namespace) -> int:
    from lepton.protocol import DEFAULT_CHUNK_SIZE, load_private_key

    reg = _registry(args)
    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "models", needed_for=" with --publish") if args.publish else None
    src = reg.get(args.name, args.to)
    fleet = args.fleet or src.report.get("fleet")
    if args.publish and not fleet:
        raise ConfigError(f"v{args.to} records no fleet; pass --fleet")
    key = load_private_key(args.key) if args.key else None
    new = reg.rollback(args.name, args.to)
    publication = None
    if args.publish:
        result = reg.publish(
            args.name,
            new.version,
            url=broker,
            fleet=fleet,
            prefix=prefix,
            private_key=key,
            chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        )
        publication = result.to_dict()
    new = reg.get(args.name, new.version)
    if args.json:
        print(
            json.dumps(
                {"version": new.version, "parent": args.to, "status": new.status, "publication": publication},
                sort_keys=True,
            )
        )
    else:
        where = f"published to fleet {fleet}" if publication else "stored (add --publish to ship it)"
        print(f"{args.name} v{new.version} = weights of v{args.to}: {where}")
    return _exit.OK


def run_publish(args: argparse.Namespace) -> int:
    from lepton.protocol import DEFAULT_CHUNK_SIZE, load_private_key

    _check_ids(args)
    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "models")
    reg = _registry(args)
    mv = reg.get(args.name, args.version)
    fleet = args.fleet or mv.report.get("fleet")
    if not fleet:
        raise ConfigError(f"v{mv.version} records no fleet; pass --fleet")
    key = load_private_key(args.key) if args.key else None
    result = reg.publish(
        args.name,
        mv.version,
        url=broker,
        fleet=fleet,
        prefix=prefix,
        private_key=key,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
    )
    if args.json:
        print(
            json.dumps(
                {"version": mv.version, "fleet": fleet, "prefix": prefix, "publication": result.to_dict()},
                sort_keys=True,
            )
        )
    else:
        print(
            f"{args.name} v{mv.version} published to fleet {fleet} ({prefix}/{fleet}/...): "
            f"{result.chunks} chunks, "
            f"signed={key is not None}, cleared {result.cleared or 'nothing'}"
        )
    return _exit.OK


def run_fetch(args: argparse.Namespace) -> int:
    from lepton.cloud._delivery import fetch_model

    _check_ids(args)
    prefix = _prefix.resolve_prefix(args)
    broker = _credentials.broker_url(args, "models")
    package = fetch_model(broker, args.fleet, args.name, args.public_key, timeout=args.timeout, prefix=prefix)
    if args.out:
        Path(args.out).write_bytes(package.data)
    m = package.manifest
    if args.json:
        print(json.dumps({"manifest": m.to_dict(), "signed_by": package.signed_by}, sort_keys=True))
    else:
        print(
            f"{m.name} v{m.version}: {m.size} bytes in {len(m.chunks)} chunks, {m.quantization}, "
            f"sha256 {m.sha256[:16]}, signed by {package.signed_by or '(not checked)'}"
            + (f", written to {args.out}" if args.out else "")
        )
    return _exit.OK
