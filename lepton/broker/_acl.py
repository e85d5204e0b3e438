"""The embedded broker's access rules: the same roles and file format as ``broker/lepton.acl``.

Plain data in, decision out (no I/O besides :func:`read_acl_file`/:func:`add_acl_user`). The file is a
subset of Mosquitto's ``acl_file`` format, so one file and one set of roles serve both brokers::

    topic read lepton/demo/devices/+/status      # before any "user" line: anonymous clients
    user cam-01
    topic write lepton/demo/devices/cam-01/samples
    topic read lepton/demo/models/#
    pattern read lepton/demo/devices/%u/acks     # every user; %u = username, %c = client id

Semantics as Mosquitto 2.0 applies them: anything not granted is denied; ``read`` covers delivery of a
message (live, queued or retained), ``write`` covers PUBLISH (including a Last Will); a SUBSCRIBE is
accepted whatever its filter and only readable messages reach it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lepton._fs import write_atomic
from lepton.errors import ConfigError
from lepton.protocol import DEFAULT_PREFIX, ID_PATTERN
from lepton.protocol._topics import prefix_problem

READ, WRITE = "read", "write"
ACCESS = {"read": frozenset({READ}), "write": frozenset({WRITE}), "readwrite": frozenset({READ, WRITE})}
ROLES = ("device", "worker", "trainer", "viewer", "admin")


def role_grants(role: str, fleet: str, name: str, *, prefix: str = DEFAULT_PREFIX) -> list[str]:
    """ACL lines of ``role`` for user ``name`` in ``fleet`` under ``prefix``: the same grants as
    ``broker/add-user.sh [--prefix P]``.

    >>> role_grants("device", "demo", "cam-01")[0]
    'topic write lepton/demo/devices/cam-01/samples'
    >>> role_grants("device", "demo", "cam-01", prefix="acme/site-3/lepton")[0]
    'topic write acme/site-3/lepton/demo/devices/cam-01/samples'
    """
    for value in (fleet, name):
        if not ID_PATTERN.fullmatch(value):
            raise ConfigError(f"{value!r} is not a valid id: use 1-64 of A-Z a-z 0-9 _ -")
    problem = prefix_problem(prefix)
    if problem is not None:
        raise ConfigError(f"bad --prefix {prefix!r}: {problem}; use topic levels joined by '/', "
                          "e.g. --prefix acme/site-3/lepton")
    p = f"{prefix}/{fleet}"
    if role == "device":
        # A device writes only its own channels in its own fleet, and reads its acks, its answers and its
        # fleet's models: no device reads another's answers or asks the cloud in another's name.
        return [f"topic write {p}/devices/{name}/samples", f"topic write {p}/devices/{name}/status",
                f"topic write {p}/devices/{name}/telemetry", f"topic write {p}/devices/{name}/predictions",
                f"topic read {p}/devices/{name}/acks", f"topic read {p}/models/#",
                f"topic write {p}/devices/{name}/infer", f"topic read {p}/devices/{name}/answers"]
    if role == "worker":
        return [f"topic read {p}/devices/+/samples", f"topic write {p}/devices/+/acks",
                f"topic read {p}/devices/+/status", f"topic read {p}/devices/+/telemetry",
                f"topic readwrite {p}/models/#", f"topic write {p}/deadletter",
                f"topic readwrite {p}/workers/#",
                # lepton serve: only a worker reads requests and answers them
                f"topic read {p}/devices/+/infer", f"topic write {p}/devices/+/answers"]
    if role == "trainer":
        # The worker's training child (lepton train --publish): publishes models, nothing else.
        return [f"topic readwrite {p}/models/#"]
    if role == "viewer":
        return [f"topic read {p}/devices/+/status", f"topic read {p}/devices/+/telemetry",
                f"topic read {p}/devices/+/predictions", f"topic read {p}/workers/+/status",
                f"topic read {p}/workers/+/telemetry",
                f"topic read {p}/models/#", f"topic read {p}/deadletter"]
    if role == "admin":
        # Development only (the embedded broker's first user): every topic of every fleet of ``prefix``.
        return [f"topic readwrite {prefix}/#"]
    raise ConfigError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")


def matches(filter_: str, topic: str) -> bool:
    """MQTT topic-filter matching (``+`` one level, ``#`` the rest); ``$`` topics never match wildcards."""
    if topic.startswith("$") and filter_[:1] in ("+", "#"):
        return False
    f, t = filter_.split("/"), topic.split("/")
    for i, level in enumerate(f):
        if level == "#":
            return True
        if i >= len(t) or (level != "+" and level != t[i]):
            return False
    return len(f) == len(t)


@dataclass(frozen=True)
class _Rule:
    access: frozenset[str]
    filter: str
    pattern: bool = False


@dataclass
class Acl:
    """Parsed rules: ``anonymous`` (before any ``user`` line), per-user rules, and patterns for everyone."""

    anonymous: list[_Rule] = field(default_factory=list)
    users: dict[str, list[_Rule]] = field(default_factory=dict)
    patterns: list[_Rule] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str, *, source: str = "ACL") -> Acl:
        acl, current = cls(), None
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            word, _, rest = line.partition(" ")
            rest = rest.strip()
            if word == "user" and rest:
                current = acl.users.setdefault(rest, [])
                continue
            if word in ("topic", "pattern") and rest:
                access, _, filter_ = rest.partition(" ")
                if access not in ACCESS:  # "topic FILTER" means readwrite, as in Mosquitto
                    access, filter_ = "readwrite", rest
                filter_ = filter_.strip()
                if filter_ and " " not in filter_:
                    rule = _Rule(ACCESS[access], filter_, word == "pattern")
                    if word == "pattern":
                        acl.patterns.append(rule)
                    else:
                        (acl.anonymous if current is None else current).append(rule)
                    continue
            raise ConfigError(f"{source}:{number}: cannot read {line!r}; expected 'user NAME', "
                              "'topic [read|write|readwrite] FILTER' or 'pattern [...] FILTER'")
        return acl

    def allowed(self, username: str | None, client_id: str | None, topic: str, access: str) -> bool:
        """May this client ``read`` (receive) or ``write`` (publish) ``topic``?"""
        rules = self.users.get(username, []) if username else self.anonymous
        for rule in rules:
            if access in rule.access and matches(rule.filter, topic):
                return True
        if username:
            for rule in self.patterns:
                # As Mosquitto: a username or client id holding '+', '#' or '/' never matches a pattern.
                if access not in rule.access or any(c in (client_id or "") + username for c in "+#/"):
                    continue
                if matches(rule.filter.replace("%u", username).replace("%c", client_id or ""), topic):
                    return True
        return False


def read_acl_file(path: str | Path) -> Acl:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read ACL file {path}: {reason}; create it with "
                          "`lepton broker --add-user NAME --role ROLE --fleet FLEET`") from None
    return Acl.parse(text, source=str(path))


ACL_HEADER = """\
# Lepton embedded broker ACL (same format and roles as broker/lepton.acl for Mosquitto).
# Lines before the first "user" line apply to anonymous clients (--allow-anonymous) only.
# Anything not granted is denied. `lepton broker --add-user NAME --role ROLE --fleet FLEET` appends
# a "user NAME" block; the running broker re-reads this file when it changes.
"""


def add_acl_user(path: str | Path, name: str, grants: list[str], *, replace: bool = False) -> None:
    """Append a ``user NAME`` block (mode 0600). An existing block is refused unless ``replace``.

    Refusing keeps a new "device" from inheriting a worker's rights by reusing its name.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8") if path.exists() else ACL_HEADER
    acl = Acl.parse(text, source=str(path))
    if name in acl.users:
        if not replace:
            raise ConfigError(f"user {name!r} already has grants in {path}; choose another name, or pass "
                              "--replace to give it only the new role")
        text = _without_block(text, name)
    text = text.rstrip("\n") + f"\n\nuser {name}\n" + "".join(g + "\n" for g in grants)
    _write_private(path, text)


def _without_block(text: str, name: str) -> str:
    out, skipping = [], False
    for line in text.splitlines():
        word, _, rest = line.strip().partition(" ")
        if word == "user":
            skipping = rest.strip() == name
        if not skipping:
            out.append(line)
    return "\n".join(out) + "\n"


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text.encode("utf-8"), mode=0o600)
