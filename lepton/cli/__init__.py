"""``lepton`` command line: one module per command group, ``--json`` on everything that reports.

Exit codes: :mod:`lepton.exitcodes` (the same table for the ``devices/`` and ``cloud_workers/``
programs).
"""

from lepton.cli._main import main

__all__ = ["main"]
