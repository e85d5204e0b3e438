"""The exit codes of every Lepton command and program, in one table.

``lepton`` (every command), the programs in ``devices/`` and ``cloud_workers/``, and ``lepton demo``
all exit with these numbers, so a supervisor can act on them the same way everywhere: 2 means fix the
configuration, 3 retry later. Standard library only: the device programs import it too.

>>> from lepton import exitcodes
>>> exitcodes.USAGE, exitcodes.describe(exitcodes.BROKER)
(2, 'broker unreachable or credentials refused')
"""

from __future__ import annotations

__all__ = [
    "BROKER",
    "CHILD_FAILED",
    "FAILURE",
    "GATE_REFUSED",
    "INTERRUPTED",
    "NOT_IMPLEMENTED",
    "OK",
    "TABLE",
    "UNACKED",
    "USAGE",
    "describe",
    "summary",
]

OK = 0
FAILURE = 1  # anything else that went wrong (the message says what)
USAGE = 2  # bad flag, id, path or config: argparse uses 2 as well
BROKER = 3  # broker unreachable or credentials refused
UNACKED = 4  # a device stopped with samples the cloud has not acknowledged
GATE_REFUSED = 5  # lepton train: the evaluation gate kept the new model
NOT_IMPLEMENTED = 6
CHILD_FAILED = 7  # lepton demo: a broker, worker or device process it started died
INTERRUPTED = 130  # SIGINT (Ctrl-C), as shells report it

#: code -> meaning, in order; the README's table and ``lepton --help`` come from here.
TABLE: dict[int, str] = {
    OK: "ok",
    FAILURE: "failure",
    USAGE: "usage or configuration error (bad flag, id, path or setting)",
    BROKER: "broker unreachable or credentials refused",
    UNACKED: "samples left unacknowledged",
    GATE_REFUSED: "evaluation gate refused the model",
    NOT_IMPLEMENTED: "not built yet",
    CHILD_FAILED: "a child process of lepton demo (broker, worker, device) crashed",
    INTERRUPTED: "interrupted",
}


def describe(code: int) -> str:
    """What an exit code means (``"exit code N"`` for one Lepton does not use)."""
    return TABLE.get(code, f"exit code {code}")


def summary() -> str:
    """The table in one line: ``0 ok, 1 failure, 2 usage ...``."""
    short = {USAGE: "usage/config error", BROKER: "broker error", CHILD_FAILED: "demo child crashed"}
    return ", ".join(f"{code} {short.get(code, text)}" for code, text in TABLE.items())
