"""``lepton`` command line: one module per command group, ``--json`` on everything that reports.

Exit codes (see :mod:`lepton.cli._exit`): 0 success, 1 failure, 2 usage or configuration error,
3 broker unreachable or credentials refused, 4 not everything acknowledged, 5 evaluation gate refused
the model, 6 not implemented yet, 130 interrupted.
"""

from lepton.cli._main import main

__all__ = ["main"]
