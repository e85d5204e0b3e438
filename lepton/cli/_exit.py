"""Numbered exit codes shared by every command: :mod:`lepton.exitcodes`, under its old name."""

from lepton.exitcodes import *  # noqa: F403
from lepton.exitcodes import __all__  # noqa: F401
