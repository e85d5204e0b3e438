"""The topic prefix at the CLI edge: ``--prefix P`` and ``$LEPTON_PREFIX``, for every command and program.

Every topic is ``{prefix}/{fleet}/...`` (docs/protocol.md); the default is ``lepton``. The flag beats
the environment; an empty ``$LEPTON_PREFIX`` counts as unset. A bad prefix is a ConfigError (exit 2)
before anything connects, with the rule it broke (the rules are :func:`lepton.protocol.validate_prefix`,
the ones ``Topics`` applies).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping

from lepton.errors import ConfigError
from lepton.protocol._topics import DEFAULT_PREFIX, prefix_problem

ENV_PREFIX = "LEPTON_PREFIX"


def add_prefix_argument(parser) -> None:  # noqa: ANN001 - a parser or an argument group
    """``--prefix P`` on ``parser``; read it back with :func:`resolve_prefix`."""
    parser.add_argument("--prefix", metavar="P", default=None,
                        help=f"topic prefix: topics are P/FLEET/... (env {ENV_PREFIX}; default "
                        f"{DEFAULT_PREFIX}), e.g. acme/site-3/lepton")


def resolve_prefix(args: argparse.Namespace | str | None = None, *,
                   environ: Mapping[str, str] | None = None) -> str:
    """The validated prefix: ``--prefix`` (``args.prefix`` or the string given), else ``$LEPTON_PREFIX``,
    else ``lepton``. Raises ConfigError naming where the bad value came from and the fix.

    >>> resolve_prefix("acme/site-3/lepton")
    'acme/site-3/lepton'
    >>> resolve_prefix(None, environ={})
    'lepton'
    """
    flag = getattr(args, "prefix", None) if isinstance(args, argparse.Namespace) else args
    env = os.environ if environ is None else environ
    if flag is not None:
        value, source = flag, "--prefix"
    elif env.get(ENV_PREFIX):
        value, source = env[ENV_PREFIX], f"${ENV_PREFIX}"
    else:
        return DEFAULT_PREFIX
    problem = prefix_problem(value)
    if problem is not None:
        raise ConfigError(f"bad {source} {value!r}: {problem}; use topic levels joined by '/', "
                          "e.g. --prefix acme/site-3/lepton")
    return value
