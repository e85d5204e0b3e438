"""lepton broker: the embedded amqtt broker in the foreground, with password-file credentials."""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import logging
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any
from urllib.parse import quote

from lepton.broker._acl import ROLES
from lepton.cli import _exit, _prefix
from lepton.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_DATA = Path(".lepton") / "broker"
DEFAULT_USER = "lepton"

DESCRIPTION = """\
Run the embedded MQTT 3.1.1 broker (amqtt) in the foreground until Ctrl-C or SIGTERM (exit 0).
Good for development, tests and the demo; in production run Mosquitto with the project's
mosquitto.conf (see broker/README.md).

Named clients authenticate against DIR/passwd (argon2 hashes) and get durable persistent sessions:
QoS 1 messages are queued while they are offline. A client's id must be its username or start with
'username/' (nobody takes over another client's session). DIR/acl grants each user its role's topics,
as broker/lepton.acl does on Mosquitto: device (default; its own topics only), worker, trainer (the
worker's training child: models only), viewer (read-only), admin (every topic; development), all
under --prefix P (env LEPTON_PREFIX, default lepton): grants cover P/FLEET/... (admin: P/#).
On the first start, when DIR/passwd does not exist, an admin user 'lepton' with a random password is
created and the ready-to-use URL is printed once. Failed logins are throttled per address and user.
Anonymous clients (--allow-anonymous) get the ACL's anonymous lines; amqtt never queues for them.
Sessions and retained messages live in memory: a restart of this broker forgets them.

examples:
  lepton broker                                 # 127.0.0.1:1883, credentials in .lepton/broker/passwd
  lepton broker --host 0.0.0.0 --port 1884 --json
  lepton broker --add-user cam-01 --fleet demo  # a device (username = device id): print its URL, exit
  lepton broker --add-user ingest-1 --role worker --fleet demo
  lepton broker --add-user trainer:s3cret --role trainer --fleet demo   # with a chosen password
  lepton broker --add-user cam-01 --fleet demo --prefix acme/site-3/lepton  # acme/site-3/lepton/demo/...
  lepton broker --config broker/amqtt.yaml      # your own amqtt configuration
"""


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{value} is not a port number (1-65535, or 0 for any free port)")
    return value


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default=None,
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=_port, default=None,
                        help="TCP port (default 1883; 0 picks a free port)")
    parser.add_argument("--data", default=str(DEFAULT_DATA), metavar="DIR",
                        help=f"folder of the password file DIR/passwd (default {DEFAULT_DATA})")
    parser.add_argument("--allow-anonymous", action="store_true",
                        help="also admit clients without a username (not queued while offline)")
    parser.add_argument("--add-user", metavar="NAME[:PASSWORD]", default=None,
                        help="add a user to DIR/passwd and its role's grants to DIR/acl (random password "
                        "unless given), print its URL and exit")
    parser.add_argument("--role", choices=ROLES, default="device",
                        help="role of --add-user (default device; see broker/README.md)")
    parser.add_argument("--fleet", default=os.environ.get("LEPTON_FLEET"),
                        help="fleet of --add-user's grants (env LEPTON_FLEET; not for --role admin)")
    _prefix.add_prefix_argument(parser)
    parser.add_argument("--replace", action="store_true",
                        help="with --add-user: replace an existing user's password and grants")
    parser.add_argument("--config", metavar="FILE", default=None,
                        help="run with this amqtt YAML/JSON configuration instead (see broker/amqtt.yaml)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON line {"url", "host", "port"} on stdout once listening')
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.broker import BrokerSettings, amqtt_config, free_port, generate_password, write_password_file

    from lepton.broker._acl import add_acl_user, read_acl_file, role_grants
    from lepton.broker._auth import read_password_file

    prefix = _prefix.resolve_prefix(args)
    data = Path(args.data).expanduser()
    passwd = (data / "passwd").resolve()
    acl = (data / "acl").resolve()
    host = args.host or "127.0.0.1"
    port = args.port if args.port is not None else 1883

    if args.add_user is not None:
        name, password = _parse_user(args.add_user)
        if args.role != "admin" and not args.fleet:
            raise ConfigError(f"--add-user {name} --role {args.role} needs --fleet FLEET (or env LEPTON_FLEET)")
        grants = role_grants(args.role, args.fleet or "-", name, prefix=prefix)
        if passwd.exists() and name in read_password_file(passwd) and not args.replace:
            raise ConfigError(f"--add-user {name}: the user exists in {passwd}; choose another name, or "
                              "pass --replace to give it a new password and only the new role")
        password = password or generate_password()
        _ensure_dir(data)
        add_acl_user(acl, name, grants, replace=args.replace)
        write_password_file(passwd, {name: password}, append=True)
        _report(_url(host, port, name, password), host, port, args.json)
        print(f"lepton broker: {name} ({args.role}) added to {passwd} and {acl}; a running broker picks it "
              "up at the next connect", file=sys.stderr)
        return _exit.OK

    if args.config is not None:
        if args.host is not None or args.port is not None:
            raise ConfigError("--config and --host/--port conflict: set the listener's bind address in "
                              f"{args.config}")
        if args.allow_anonymous:
            raise ConfigError("--config and --allow-anonymous conflict: set allow_anonymous in "
                              f"{args.config}")
        config = _load_config(Path(args.config))
        host, port = _bind_of(config, args.config)
        user = None
    else:
        if port == 0:
            port = free_port(host)
        user = None
        if not passwd.exists():
            user = (DEFAULT_USER, generate_password())
            _ensure_dir(data)
            if not acl.exists() or DEFAULT_USER not in read_acl_file(acl).users:
                add_acl_user(acl, DEFAULT_USER, role_grants("admin", "-", DEFAULT_USER, prefix=prefix))
            write_password_file(passwd, {user[0]: user[1]})
        if not acl.exists():
            raise ConfigError(f"{acl} not found: the embedded broker now needs an ACL; grant each user its "
                              "role with `lepton broker --add-user NAME --role ROLE --fleet FLEET --replace`")
        read_acl_file(acl)  # a broken line is one error here, not a traceback in the broker
        config = amqtt_config(BrokerSettings(host=host, port=port, password_file=passwd, acl_file=acl,
                                             allow_anonymous=args.allow_anonymous))
    _check_port_free(host, port)

    url = _url(host, port, *(user or (None, None)))

    def ready() -> None:
        _report(url, host, port, args.json)
        where = f"users from {passwd}" if args.config is None else f"configuration {args.config}"
        print(f"lepton broker: listening on {host}:{port} (amqtt, MQTT 3.1.1), {where}; Ctrl-C stops it",
              file=sys.stderr)
        if user is not None:
            print(f"lepton broker: created {passwd} with user {user[0]!r}; its URL above is shown only once "
                  f"(add users with `lepton broker --add-user NAME`)", file=sys.stderr)
        elif args.config is None and not _has_users(passwd):
            print(f"lepton broker: {passwd} holds no user, so no named client can connect; add one "
                  "with `lepton broker --add-user NAME`", file=sys.stderr)

    asyncio.run(_serve(config, ready, f"{host}:{port}"))
    print("lepton broker: stopped", file=sys.stderr)
    return _exit.OK


async def _serve(config: dict[str, Any], ready, where: str) -> None:  # noqa: ANN001
    from lepton.broker._server import LeptonBroker as Broker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    amqtt_log = logging.getLogger("amqtt.broker")
    level = amqtt_log.level
    # amqtt logs a traceback when it cannot start; the ConfigError below says it in one line.
    amqtt_log.setLevel(logging.CRITICAL)
    try:
        broker = Broker(config)
        await broker.start()
    except Exception as exc:
        root: BaseException = exc
        while (inner := root.__cause__ or root.__context__) is not None:
            root = inner
        detail = str(exc) if root is exc else f"{exc} ({type(root).__name__}: {root})"
        raise ConfigError(f"the embedded broker cannot start on {where}: {detail}") from None
    finally:
        amqtt_log.setLevel(level)
    ready()
    await stop.wait()
    try:
        await broker.shutdown()
    except Exception:  # stopping anyway; amqtt sometimes raises on half-closed clients
        log.debug("amqtt shutdown raised", exc_info=True)


def _has_users(passwd: Path) -> bool:
    from lepton.broker._auth import read_password_file

    try:
        return bool(read_password_file(passwd))
    except (OSError, UnicodeDecodeError):
        return False


def _parse_user(text: str) -> tuple[str, str | None]:
    from lepton.protocol import ID_PATTERN

    name, sep, password = text.partition(":")
    if not ID_PATTERN.fullmatch(name):
        raise ConfigError(f"--add-user {name!r}: a user name is 1-64 characters from A-Z a-z 0-9 _ - "
                          "(a device's user name is its device id)")
    if sep and not password:
        raise ConfigError(f"--add-user {name}: empty password; write NAME:PASSWORD, or just NAME for a "
                          "random one")
    return name, password or None


def _ensure_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create --data folder {path}: {exc.strerror}; choose another --data DIR"
                          ) from None


def _load_config(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"cannot read amqtt config {path}: {reason}; pass a YAML or JSON file like "
                          "broker/amqtt.yaml") from None
    try:
        if path.suffix.lower() == ".json":
            config = json.loads(text)
        else:
            import yaml

            config = yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise many types; the message is what matters
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"amqtt config {path} is not valid {path.suffix.lstrip('.') or 'YAML'} ({first}); "
                          "start from broker/amqtt.yaml") from None
    if not isinstance(config, dict) or not isinstance(config.get("listeners"), dict) \
            or not isinstance(config["listeners"].get("default"), dict):
        raise ConfigError(f"amqtt config {path} has no listeners.default section; start from "
                          "broker/amqtt.yaml")
    plugins = config.get("plugins")
    auth = plugins.get("lepton.broker._auth.LeptonAuthPlugin") if isinstance(plugins, dict) else None
    if isinstance(auth, dict) and auth.get("password_file") and not Path(auth["password_file"]).is_file():
        raise ConfigError(f"password file {auth['password_file']} named in {path} not found; create it with "
                          "`lepton broker --add-user NAME` (run from the same folder)")
    if isinstance(plugins, dict):  # a plugin that cannot load is a config error, found before any bind
        for name in plugins:
            module, _, attr = str(name).rpartition(".")
            try:
                if not hasattr(importlib.import_module(module or attr), attr):
                    raise ImportError(f"module {module!r} has no {attr!r}")
            except ImportError as exc:
                raise ConfigError(f"plugin {name} named in {path} cannot be loaded ({exc}); fix its "
                                  "dotted name or install its package") from None
    return config


def _bind_of(config: dict[str, Any], path: str) -> tuple[str, int]:
    bind = str(config["listeners"]["default"].get("bind", "0.0.0.0:1883"))
    host, _, port = bind.rpartition(":")
    try:
        number = int(port)
    except ValueError:
        raise ConfigError(f"amqtt config {path}: listeners.default.bind {bind!r} is not HOST:PORT") from None
    return host.strip("[]") or "0.0.0.0", number


def _check_port_free(host: str, port: int) -> None:
    """Fail in one line before amqtt would print a traceback."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server does
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno in (98, 48):  # EADDRINUSE on Linux, macOS
                raise ConfigError(f"port {port} on {host} is already in use (another broker?); stop it or "
                                  "choose another --port") from None
            raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror}; check --host and --port"
                              ) from None


def _url(host: str, port: int, user: str | None = None, password: str | None = None) -> str:
    if host in ("0.0.0.0", "::", ""):
        host = "127.0.0.1"  # what a client on this machine dials; others use this machine's address
    shown = f"[{host}]" if ":" in host else host
    cred = f"{quote(user, safe='')}:{quote(password, safe='')}@" if user and password else ""
    return f"mqtt://{cred}{shown}:{port}"


def _report(url: str, host: str, port: int, as_json: bool) -> None:
    if as_json:
        print(json.dumps({"url": url, "host": host, "port": port}), flush=True)
    else:
        print(url, flush=True)
