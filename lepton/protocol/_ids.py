"""Validated identifiers: fleet, device and model names."""

from __future__ import annotations

import re

from lepton.errors import ProtocolError

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_id(value: object, *, kind: str = "id") -> str:
    """Return ``value`` if it is a valid Lepton id (``[A-Za-z0-9_-]{1,64}``), else raise ProtocolError.

    >>> validate_id("cam-01", kind="device")
    'cam-01'
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ProtocolError(
            f"{value!r} is not a valid {kind} id: use 1-64 characters from A-Z a-z 0-9 _ -", field=kind
        )
    return value
