"""amqtt plugins of the embedded broker: authentication with client-id binding, and the ACL.

amqtt's own ``AnonymousAuthPlugin`` with ``allow_anonymous`` marks *every* session anonymous, and the
broker never queues messages for an anonymous session while it is offline. :class:`LeptonAuthPlugin`
marks only clients without a username anonymous; a named client with a valid password gets a real
persistent session whose QoS 1 messages are queued while it is away. It also

* binds client ids to users: a named client's id is its username or starts with ``username/``, so
  nobody can take over another client's session (``/`` cannot occur in a user name, so ``cam/x`` can
  never be claimed by a user ``ca``); an anonymous client may not use any user's id either;
* checks argon2 hashes in a thread (about 70 ms each), never on the event loop;
* throttles failed logins per source address and per username (:class:`LoginThrottle`).

:class:`LeptonAclPlugin` applies ``lepton.broker._acl`` rules to every PUBLISH and every delivery.
Both run on the broker's event loop thread, which owns their state.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from amqtt.contexts import Action
from amqtt.plugins.base import BaseAuthPlugin, BaseTopicPlugin
from amqtt.session import Session

from lepton._fs import write_atomic
from lepton.broker._acl import READ, WRITE, Acl, read_acl_file

log = logging.getLogger(__name__)


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
    # 0600 from the first byte: never readable by others, not even briefly
    write_atomic(path, "".join(f"{u}:{h}\n" for u, h in existing.items()).encode("utf-8"), mode=0o600)


def client_id_allowed(username: str | None, client_id: str | None, users: set[str] | dict[str, str]) -> bool:
    """The client-id binding: ``username`` or ``username/...``; anonymous ids outside every user's space.

    An empty id (clean session only; amqtt assigns a random one) is allowed: it cannot name a session.
    """
    if not client_id:
        return True
    if username:
        return client_id == username or client_id.startswith(username + "/")
    return client_id.split("/", 1)[0] not in users


class LoginThrottle:
    """Backoff for failed logins, keyed by source address and by username. No I/O; the clock is passed in.

    ``free`` failures per key cost nothing; each further one blocks the key for ``base * 2**k`` seconds
    (capped at ``cap``), during which a login is refused without checking its password. A key's count
    is forgotten ``forget`` seconds after its last failure; at most ``max_keys`` keys are remembered.
    """

    def __init__(self, *, free: int = 5, base: float = 0.5, cap: float = 60.0, forget: float = 600.0,
                 max_keys: int = 65536) -> None:
        self.free, self.base, self.cap, self.forget, self.max_keys = free, base, cap, forget, max_keys
        self._state: dict[tuple[str, str], tuple[int, float, float]] = {}  # key -> failures, last, until

    def blocked_for(self, keys: list[tuple[str, str]], now: float) -> float:
        """Seconds the longest-blocked of ``keys`` stays blocked (0: try the password)."""
        wait = 0.0
        for key in keys:
            state = self._state.get(key)
            if state is not None:
                if now - state[1] > self.forget:
                    del self._state[key]
                else:
                    wait = max(wait, state[2] - now)
        return wait

    def failed(self, keys: list[tuple[str, str]], now: float) -> None:
        for key in keys:
            failures, last, _ = self._state.pop(key, (0, now, now))
            if now - last > self.forget:
                failures = 0
            failures += 1
            excess = failures - self.free
            until = now + min(self.cap, self.base * 2 ** (excess - 1)) if excess > 0 else now
            self._state[key] = (failures, now, until)
        while len(self._state) > self.max_keys:  # oldest first (insertion order)
            del self._state[next(iter(self._state))]

    def succeeded(self, keys: list[tuple[str, str]]) -> None:
        for key in keys:
            self._state.pop(key, None)


class LeptonAuthPlugin(BaseAuthPlugin):
    """Password-file authentication with client-id binding and login throttling; optional anonymous access."""

    def __init__(self, context) -> None:  # noqa: ANN001
        super().__init__(context)
        from pwdlib import PasswordHash
        from pwdlib.hashers.argon2 import Argon2Hasher

        self._hasher = PasswordHash((Argon2Hasher(),))
        self._verified: dict[tuple[str, str], bool] = {}  # argon2 costs ~70 ms; reconnect storms repeat it
        self._path = self._get_config_option("password_file", None)
        self._mtime: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._reload()
        self._allow_anonymous = bool(self._get_config_option("allow_anonymous", False))
        self.max_packet_size = int(self._get_config_option("max_packet_size", 0) or 0)
        self.throttle = LoginThrottle()
        self._pending: dict[str, list] = {}  # source address -> [Semaphore, clients using it]
        self._executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="lepton-argon2")

    def _reload(self) -> None:
        """Re-read the password file when it changed, so users can be added without a restart."""
        if not self._path:
            return
        st = Path(self._path).stat()
        mtime = (st.st_mtime_ns, st.st_size, st.st_ino)  # timestamps alone are coarser than a quick append
        if mtime != self._mtime:
            self._users, self._mtime = read_password_file(self._path), mtime
            self._verified.clear()

    async def authenticate(self, *, session: Session) -> bool | None:
        self._reload()
        if not client_id_allowed(session.username, session.client_id, self._users):
            log.warning("refused client id %r for user %r from %s: a client id is the username or starts "
                        "with 'username/'", session.client_id, session.username, session.remote_address)
            return False
        if not session.username:
            if self._allow_anonymous:
                session.is_anonymous = True
                return True
            return False
        key = (session.username, session.password or "")
        if self._verified.get(key):
            return True  # a known good pair passes even while its address is throttled
        keys = [("addr", str(session.remote_address)), ("user", session.username)]
        now = time.monotonic()
        if self.throttle.blocked_for(keys, now) > 0:
            return False
        address = str(session.remote_address)
        if key not in self._verified:
            digest = self._users.get(session.username)
            if digest is None:
                self.throttle.failed(keys, now)
                return False
            # At most two checks per source run at once; more wait their turn (never refused: a demo
            # or a fleet behind one NAT connects many clients at the same moment).
            slot = self._pending.setdefault(address, [asyncio.Semaphore(2), 0])
            slot[1] += 1
            try:
                async with slot[0]:
                    if self.throttle.blocked_for(keys, time.monotonic()) > 0:
                        return False  # blocked while this one waited
                    ok = await asyncio.get_running_loop().run_in_executor(
                        self._executor, self._hasher.verify, session.password or "", digest)
            finally:
                slot[1] -= 1
                if not slot[1]:
                    del self._pending[address]
            if len(self._verified) >= 4096:  # bounded: clients guessing passwords must not grow it forever
                self._verified.clear()
            self._verified[key] = ok
        if self._verified[key]:
            self.throttle.succeeded(keys)
            return True
        self.throttle.failed(keys, time.monotonic())
        return False

    async def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    @dataclass
    class Config:
        password_file: str | Path | None = None
        allow_anonymous: bool = field(default=False)
        # Largest packet (bytes) a client may send; bigger ones close its connection (0: no limit).
        max_packet_size: int = 0


class LeptonAclPlugin(BaseTopicPlugin):
    """The ACL (``lepton.broker._acl``): a PUBLISH needs ``write``, every delivery ``read``.

    A SUBSCRIBE is accepted whatever its filter, as Mosquitto does; only readable messages reach it.
    The file is re-read when it changes.
    """

    def __init__(self, context) -> None:  # noqa: ANN001
        super().__init__(context)
        self._path = self._get_config_option("acl_file", None)
        self._mtime: tuple[int, int, int] | None = None
        self._checked = -1e9
        self.acl = Acl()
        self._reload()

    def _reload(self, *, force: bool = False) -> None:
        # Per message and subscriber the file is looked at at most once a second (a stat per delivery
        # slowed amqtt's processing of PUBACKed messages enough that a burst from a client that
        # disconnects right after was cut short: amqtt drops what it has not processed then). Every
        # CONNECT and SUBSCRIBE looks at it (force), so a user added a moment ago has its grants.
        if not self._path:
            return
        now = time.monotonic()
        if not force and now - self._checked < 1.0:
            return
        self._checked = now
        try:
            st = Path(self._path).stat()
        except OSError:
            self.acl, self._mtime = Acl(), None  # a removed file grants nothing
            return
        mtime = (st.st_mtime_ns, st.st_size, st.st_ino)
        if mtime != self._mtime:
            self.acl, self._mtime = read_acl_file(self._path), mtime

    def allowed(self, session: Session | None, topic: str, access: str) -> bool:
        self._reload()
        if session is None:
            return False
        username = None if session.is_anonymous else session.username
        return self.acl.allowed(username, session.client_id, topic, access)

    async def topic_filtering(self, *, session: Session | None = None, topic: str | None = None,
                              action: Action | None = None) -> bool:
        if action == Action.SUBSCRIBE:
            self._reload(force=True)
            return True
        if topic is None:
            return False
        return self.allowed(session, topic, WRITE if action == Action.PUBLISH else READ)

    @dataclass
    class Config:
        acl_file: str | Path | None = None
