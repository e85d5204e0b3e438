"""Validated identifiers: fleet, device and model names."""

from __future__ import annotations

import re

from lepton.errors import ConfigError, ProtocolError

ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def validate_id(value: object, *, kind: str = "id", flag: str | None = None) -> str:
    """Return ``value`` if it is a valid Lepton id (``[A-Za-z0-9_-]{1,64}``), else raise ProtocolError.

    With ``flag`` (the setting it came from, e.g. ``"--fleet"``) a bad id is a usage error instead:
    :class:`~lepton.errors.ConfigError` naming the flag, so commands exit 2.

    >>> validate_id("cam-01", kind="device")
    'cam-01'
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        rule = "use 1-64 characters from A-Z a-z 0-9 _ -"
        if flag is not None:
            raise ConfigError(f"{flag} {value!r} is not a valid {kind} id: {rule}")
        raise ProtocolError(f"{value!r} is not a valid {kind} id: {rule}", field=kind)
    return value
