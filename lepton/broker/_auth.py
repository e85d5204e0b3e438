"""amqtt authentication that keeps named sessions durable.

amqtt's own ``AnonymousAuthPlugin`` with ``allow_anonymous`` marks *every* session anonymous, and the
broker never queues messages for an anonymous session while it is offline. This plugin marks only
clients without a username anonymous; a named client with a valid password gets a real persistent
session whose QoS 1 messages are queued while it is away.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from amqtt.plugins.base import BaseAuthPlugin
from amqtt.session import Session


def hash_password(password: str) -> str:
    """Argon2 hash in the format amqtt's password files use."""
    from pwdlib import PasswordHash
    from pwdlib.hashers.argon2 import Argon2Hasher

    return PasswordHash((Argon2Hasher(),)).hash(password)


def read_password_file(path: str | Path) -> dict[str, str]:
    users: dict[str, str] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#") and ":" in line:
            name, digest = line.split(":", 1)
            users[name] = digest
    return users


def write_password_file(path: str | Path, users: dict[str, str], *, append: bool = False) -> None:
    """Write ``{user: password}`` as an amqtt password file (argon2), mode 0600.

    With ``append`` existing users are kept (a user given again gets the new password).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = read_password_file(path) if append and path.exists() else {}
    existing.update({u: hash_password(p) for u, p in users.items()})
    path.touch(mode=0o600)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(f"{u}:{h}\n" for u, h in existing.items()), encoding="utf-8")
    tmp.chmod(0o600)
    tmp.replace(path)


class LeptonAuthPlugin(BaseAuthPlugin):
    """Password-file authentication; optional anonymous access for clients that send no username."""

    def __init__(self, context) -> None:  # noqa: ANN001
        super().__init__(context)
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher

        self._hasher = PasswordHash((Argon2Hasher(),))
        self._verified: dict[tuple[str, str], bool] = {}  # argon2 costs ~70 ms; reconnect storms repeat it
        self._path = self._get_config_option("password_file", None)
        self._mtime = -1.0
        self._users: dict[str, str] = {}
        self._reload()
        self._allow_anonymous = bool(self._get_config_option("allow_anonymous", False))

    def _reload(self) -> None:
        """Re-read the password file when it changed, so users can be added without a restart."""
        if not self._path:
            return
        mtime = Path(self._path).stat().st_mtime
        if mtime != self._mtime:
            self._users, self._mtime = read_password_file(self._path), mtime
            self._verified.clear()

    async def authenticate(self, *, session: Session) -> bool | None:
        self._reload()
        if not session.username:
            if self._allow_anonymous:
                session.is_anonymous = True
                return True
            return False
        digest = self._users.get(session.username)
        if digest is None:
            return False
        key = (session.username, session.password or "")
        if key not in self._verified:
            if len(self._verified) >= 4096:  # bounded: clients guessing passwords must not grow it forever
                self._verified.clear()
            self._verified[key] = self._hasher.verify(session.password or "", digest)
        return self._verified[key]

    @dataclass
    class Config:
        password_file: str | Path | None = None
        allow_anonymous: bool = field(default=False)
