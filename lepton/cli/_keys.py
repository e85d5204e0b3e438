"""lepton keys: the Ed25519 key pair that signs models."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lepton.cli import _exit
from lepton.errors import ConfigError

DESCRIPTION = """\
Generate the Ed25519 key pair that signs models. The trainer signs each manifest with the private key
(`lepton train --key DIR/NAME.key`); every device verifies with the public key (DIR/NAME.pub) and
refuses any model not signed by it. Keep NAME.key secret (it is written with mode 0600); copy
NAME.pub to the devices. An existing key is never overwritten.

examples:
  lepton keys generate                       # keys/lepton.key and keys/lepton.pub
  lepton keys generate --out /etc/lepton --name fleet-a --json
"""


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="keys_command", metavar="ACTION", required=True)
    gen = sub.add_parser("generate", help="write a new key pair NAME.key (private) and NAME.pub (public)",
                         description="Write a new Ed25519 key pair NAME.key (private, 0600) and NAME.pub.")
    gen.add_argument("--out", default="keys", metavar="DIR", help="folder for the key files (default ./keys)")
    gen.add_argument("--name", default="lepton", help="file name stem (default lepton)")
    gen.add_argument("--json", action="store_true",
                     help='print one JSON line {"private", "public", "key_id"}')
    gen.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.protocol import ID_PATTERN, generate_keypair, key_id, load_public_key

    if not ID_PATTERN.fullmatch(args.name):
        raise ConfigError(f"--name {args.name!r}: use 1-64 characters from A-Z a-z 0-9 _ -")
    out = Path(args.out).expanduser()
    for path in (out / f"{args.name}.key", out / f"{args.name}.pub"):
        if path.exists():
            raise ConfigError(f"{path} already exists; keep it, delete it on purpose, or choose another "
                              "--out/--name (devices trusting the old .pub would refuse new models)")
    try:
        private, public = generate_keypair(out, name=args.name)
    except OSError as exc:
        raise ConfigError(f"cannot write keys to {out}: {exc.strerror}; choose another --out DIR") from None
    from cryptography.hazmat.primitives import serialization

    raw = load_public_key(public).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    kid = key_id(raw)
    if args.json:
        print(json.dumps({"private": str(private), "public": str(public), "key_id": kid}))
    else:
        print(f"private key  {private}   (secret: give it to the trainer only, `lepton train --key`)")
        print(f"public key   {public}   (copy to every device, `lepton device --public-key`)")
        print(f"key id       {kid}")
    sys.stdout.flush()
    return _exit.OK
