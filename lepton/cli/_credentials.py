"""Broker credentials at the CLI edge: ``--broker``, ``--password-file``, and the environment.

A password in argv is readable by every local user (``/proc/PID/cmdline`` is world-readable); a
process's environment and a 0600 file are not. So every command that takes ``--broker`` also takes
``--password-file PATH`` and reads ``$LEPTON_BROKER`` / ``$LEPTON_PASSWORD`` / ``$LEPTON_PASSWORD_FILE``
(see lepton.protocol._mqtt.resolve_broker), and children get their URL through the environment.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Literal, overload

from lepton.errors import ConfigError

HELP_TAIL = (" Put the password in a 0600 --password-file or $LEPTON_PASSWORD rather than in the URL "
             "(argv is readable by every local user); env LEPTON_BROKER holds a whole URL.")


def add_broker_arguments(parser, *, help: str = "broker URL mqtt://USER@HOST:PORT or mqtts://...") -> None:  # noqa: A002, ANN001, E501
    """``--broker URL`` and ``--password-file PATH`` on ``parser`` (a parser or an argument group)."""
    parser.add_argument("--broker", metavar="URL", default=None,
                        help=help + " (env LEPTON_BROKER)." + HELP_TAIL)
    parser.add_argument("--password-file", metavar="PATH", default=None,
                        help="read the broker password from this file (mode 0600, first line; "
                        "env LEPTON_PASSWORD_FILE)")


@overload
def broker_url(args: argparse.Namespace, command: str, *, required: Literal[True] = True,
               needed_for: str = "", env_url: Literal[True] = True) -> str: ...
@overload
def broker_url(args: argparse.Namespace, command: str, *, required: bool = True,
               needed_for: str = "", env_url: bool = True) -> str | None: ...
def broker_url(args: argparse.Namespace, command: str, *, required: bool = True,
               needed_for: str = "", env_url: bool = True) -> str | None:
    """The broker URL with its password (a string for the config objects), or ``None`` if optional.

    ``env_url=False``: no ``--broker`` means none, whatever ``$LEPTON_BROKER`` says.
    Prints a one-line warning when the password was written in ``--broker`` on the command line.
    Raises ConfigError (exit 2) for a missing URL or an unsafe or unreadable password file.
    """
    from lepton.protocol._mqtt import resolve_broker

    if not env_url and getattr(args, "broker", None) is None:  # e.g. demo: no --broker = its own broker
        if getattr(args, "password_file", None):
            raise ConfigError("--password-file needs --broker URL")
        return None
    resolved = resolve_broker(getattr(args, "broker", None),
                              password_file=getattr(args, "password_file", None), environ=os.environ)
    if resolved is None:
        if required:
            raise ConfigError(f"--broker URL is required{needed_for} (or set LEPTON_BROKER), "
                              "e.g. --broker mqtt://USER@localhost:1883 --password-file PATH")
        if getattr(args, "password_file", None):
            raise ConfigError("--password-file needs --broker URL (or LEPTON_BROKER)")
        return None
    if resolved.warning:
        print(f"lepton {command}: warning: {resolved.warning}", file=sys.stderr)
    return resolved.url.secret_url()
