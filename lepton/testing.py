"""Real brokers for tests and benchmarks: the embedded amqtt broker and a Mosquitto process.

Both handles share one shape, so a test or benchmark runs the same code against each::

    with MosquittoBroker() as broker:
        url = broker.url("worker", "w1", fleet="f1")   # creates credentials, grants the role's topics
        ...
        broker.restart()                               # persistence on: sessions and queues survive

Mosquitto runs the project's own ``mosquitto.conf`` with only the port and file paths rewritten, and
users are added with the project's ``broker/add-user.sh``, so both are exercised by every test run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lepton.broker import BrokerSettings, EmbeddedBroker, free_port, write_password_file
from lepton.broker._acl import ACL_HEADER, role_grants
from lepton.broker._embedded import MAX_PACKET_SIZE
from lepton.protocol import DEFAULT_PREFIX

__all__ = [
    "AmqttBroker",
    "MosquittoBroker",
    "PROJECT_ROOT",
    "PostgresServer",
    "count_syscalls",
    "mosquitto_available",
    "postgres_bin_dir",
    "wait_for_port",
]

PROJECT_ROOT = Path(__file__).resolve().parents[1]

_STRACE_C_ROW = re.compile(r"\s*[\d.]+\s+[\d.]+\s+\d+\s+(\d+)\s+(?:\d+\s+)?(\w+)\s*$")


def count_syscalls(summary: str, names: tuple[str, ...] = ("fsync", "fdatasync")) -> int:
    """Calls of ``names`` in an ``strace -c`` summary table (``% time, seconds, usecs/call, calls,
    [errors,] syscall``): how the spool's tests and bench/device.py count fsyncs."""
    return sum(int(m.group(1)) for line in summary.splitlines()
               if (m := _STRACE_C_ROW.match(line)) and m.group(2) in names)


def mosquitto_available() -> bool:
    return shutil.which("mosquitto") is not None and shutil.which("mosquitto_passwd") is not None


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


class _Credentials:
    def __init__(self) -> None:
        self._users: dict[str, str] = {}

    def password(self, name: str) -> tuple[str, bool]:
        """Return (password, created_now)."""
        if name in self._users:
            return self._users[name], False
        self._users[name] = secrets.token_urlsafe(12)
        return self._users[name], True


class AmqttBroker:
    """The embedded amqtt broker (in this process, its own thread) on a free port."""

    kind = "amqtt"
    supports_shared_subscriptions = False

    def __init__(self, *, allow_anonymous: bool = True, workdir: str | Path | None = None,
                 max_packet_size: int = MAX_PACKET_SIZE) -> None:
        self.host, self.port = "127.0.0.1", free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lepton-amqtt-"))
        self.password_file = self.workdir / "passwd"
        self.acl_file = self.workdir / "acl"
        write_password_file(self.password_file, {})
        # Anonymous clients are test tools here (amqtt's own behaviour is under test): every topic.
        self.acl_file.write_text(ACL_HEADER + ("topic readwrite #\n" if allow_anonymous else ""))
        self._creds = _Credentials()
        self._granted: set[tuple[str, str, str, str]] = set()
        self._settings = BrokerSettings(host=self.host, port=self.port, password_file=self.password_file,
                                        acl_file=self.acl_file, allow_anonymous=allow_anonymous,
                                        max_packet_size=max_packet_size)
        self._broker: EmbeddedBroker | None = None

    def url(self, role: str = "worker", name: str = "worker", *, fleet: str = "test",
            prefix: str = DEFAULT_PREFIX) -> str:
        """Credentials for ``name`` with ``role``'s grants in ``fleet`` under ``prefix`` (the roles of
        ``broker/lepton.acl``).

        Asking again for the same name with another role, fleet or prefix adds those grants (same password).
        """
        password, created = self._creds.password(name)
        if created:
            write_password_file(self.password_file, {name: password}, append=True)
        if (name, role, fleet, prefix) not in self._granted:
            self._granted.add((name, role, fleet, prefix))
            grants = role_grants(role, fleet, name, prefix=prefix)
            with self.acl_file.open("a", encoding="utf-8") as out:  # a second block for a name adds to it
                out.write(f"\nuser {name}\n" + "".join(g + "\n" for g in grants))
        return f"mqtt://{name}:{password}@{self.host}:{self.port}"

    def anonymous_url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> None:
        self._broker = EmbeddedBroker(self._settings)
        self._broker.start()

    def stop(self) -> None:
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> AmqttBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


class MosquittoBroker:
    """A ``mosquitto`` process running the project's ``mosquitto.conf`` on a free loopback port."""

    kind = "mosquitto"
    supports_shared_subscriptions = True

    def __init__(self, *, conf: str | Path | None = None, extra: str = "",
                 workdir: str | Path | None = None) -> None:
        if not mosquitto_available():
            raise FileNotFoundError("mosquitto not found: apt-get install -y mosquitto mosquitto-clients")
        self.host, self.port = "127.0.0.1", free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lepton-mosquitto-"))
        self.password_file = self.workdir / "lepton.passwd"
        self.acl_file = self.workdir / "lepton.acl"
        self.log_file = self.workdir / "mosquitto.log"
        self._granted: set[tuple[str, str, str, str]] = set()
        self.conf_file = self.workdir / "mosquitto.conf"
        shutil.copy(PROJECT_ROOT / "broker" / "lepton.acl", self.acl_file)
        self._creds = _Credentials()
        self.conf_file.write_text(self._render(Path(conf or PROJECT_ROOT / "mosquitto.conf"), extra))
        self._proc: subprocess.Popen | None = None
        # Mosquitto refuses to start on an empty password file; an admin user also serves viewers.
        self.url("viewer", "lepton-admin", fleet="test")

    def _render(self, conf: Path, extra: str) -> str:
        text = conf.read_text()
        replacements = {
            r"^listener 1883\s*$": f"listener {self.port} {self.host}",
            r"^persistence_location .*$": f"persistence_location {self.workdir}/",
            r"^password_file .*$": f"password_file {self.password_file}",
            r"^acl_file .*$": f"acl_file {self.acl_file}",
            r"^log_dest .*$": f"log_dest file {self.log_file}",
        }
        for pattern, value in replacements.items():
            text, n = re.subn(pattern, value, text, flags=re.MULTILINE)
            if n != 1:
                raise ValueError(f"{conf}: expected one line matching {pattern!r}, found {n}")
        if os.geteuid() == 0:
            # As root, Mosquitto drops to user "mosquitto", who cannot read this temporary directory.
            text += "\nuser root\n"
        return text + "\n" + extra + "\n"

    def url(self, role: str = "worker", name: str = "worker", *, fleet: str = "test",
            prefix: str = DEFAULT_PREFIX) -> str:
        """Create ``name`` with ``broker/add-user.sh [--prefix P]`` and return its broker URL.

        Asking again for the same name with another role, fleet or prefix adds those grants (same password).
        """
        password, created = self._creds.password(name)
        if (name, role, fleet, prefix) not in self._granted:
            self._granted.add((name, role, fleet, prefix))
            if created:
                self._add_user(role, fleet, name, password, self.password_file, self.acl_file, prefix)
            else:
                # add-user.sh refuses a known name: make the grants on scratch files, append the block.
                scratch = Path(tempfile.mkdtemp(dir=self.workdir))
                self._add_user(role, fleet, name, password, scratch / "passwd", scratch / "acl", prefix)
                with self.acl_file.open("a") as out:
                    out.write((scratch / "acl").read_text())
                shutil.rmtree(scratch)
            self.reload()
        return f"mqtt://{name}:{password}@{self.host}:{self.port}"

    def add_users(self, role: str, names: list[str], *, fleet: str = "test",
                  prefix: str = DEFAULT_PREFIX) -> str:
        """Create many new users of one role at once, all with one password, which is returned.

        For fleets of hundreds of simulated devices (bench/fleet.py), where :meth:`url` (one
        ``add-user.sh`` and one reload per user) would take minutes: the passwords are hashed by one
        ``mosquitto_passwd -U``, the grants are ``role_grants`` (the same lines as ``add-user.sh``;
        tests/broker/test_acl.py keeps them equal), and Mosquitto reloads once.
        """
        password = secrets.token_urlsafe(12)
        taken = [n for n in names if n in self._creds._users]
        if taken:
            raise ValueError(f"user {taken[0]!r} already exists; add_users() only creates new users")
        grants = [role_grants(role, fleet, name, prefix=prefix) for name in names]  # validates every id
        scratch = Path(tempfile.mkdtemp(dir=self.workdir))
        plain = scratch / "passwd"
        plain.write_text("".join(f"{name}:{password}\n" for name in names))
        subprocess.run(["mosquitto_passwd", "-U", str(plain)], check=True, capture_output=True)
        with self.password_file.open("a") as out:
            out.write(plain.read_text())
        shutil.rmtree(scratch)
        with self.acl_file.open("a") as out:
            out.write("".join(f"\nuser {name}\n" + "".join(g + "\n" for g in lines)
                              for name, lines in zip(names, grants, strict=True)))
        for name in names:
            self._creds._users[name] = password
            self._granted.add((name, role, fleet, prefix))
        self.reload()
        return password

    @staticmethod
    def _add_user(role: str, fleet: str, name: str, password: str, passwd: Path, acl: Path,
                  prefix: str = DEFAULT_PREFIX) -> None:
        env = dict(os.environ, LEPTON_PASSWD_FILE=str(passwd), LEPTON_ACL_FILE=str(acl))
        env.pop("LEPTON_PREFIX", None)  # --prefix below says it
        script = str(PROJECT_ROOT / "broker" / "add-user.sh")
        subprocess.run(["bash", script, "--prefix", prefix, role, fleet, name, "-"], env=env, check=True,
                       capture_output=True,
                       input=password + "\n", text=True)  # the password on stdin, never on a command line

    def anonymous_url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def reload(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            marker = self.log_file.stat().st_size if self.log_file.exists() else 0
            self._proc.send_signal(signal.SIGHUP)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                if self.log_file.exists() and b"Reloading config" in self.log_file.read_bytes()[marker:]:
                    break
                time.sleep(0.02)
            time.sleep(0.05)

    def start(self) -> None:
        self._proc = subprocess.Popen(["mosquitto", "-c", str(self.conf_file)], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE)
        try:
            wait_for_port(self.host, self.port)
        except TimeoutError:
            self._proc.kill()
            err = self._proc.communicate()[1].decode(errors="replace")
            log = self.log_file.read_text(errors="replace") if self.log_file.exists() else ""
            raise RuntimeError(f"mosquitto did not start: {err}{log[-2000:]}") from None

    def stop(self) -> None:
        """Graceful stop: Mosquitto saves its persistence database."""
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            self._proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> MosquittoBroker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


# -- PostgreSQL ----------------------------------------------------------------------------------------
#: Where Debian's ``postgresql`` package puts initdb and pg_ctl (they are not on $PATH there).
_PG_BIN_DIRS = ("/usr/lib/postgresql/17/bin", "/usr/lib/postgresql/16/bin", "/usr/lib/postgresql/15/bin")


def postgres_bin_dir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` ($LEPTON_PG_BIN, Debian's, or $PATH), or None."""
    candidates = [os.environ.get("LEPTON_PG_BIN", ""), *_PG_BIN_DIRS]
    which = shutil.which("initdb")
    if which:
        candidates.append(str(Path(which).parent))
    for folder in candidates:
        if folder and (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


class PostgresServer:
    """A throw-away PostgreSQL cluster (``initdb`` + ``pg_ctl``) in a temporary folder on a free
    loopback port, with password authentication over TCP.

    PostgreSQL refuses to run as root; as root the cluster belongs to user ``nobody`` (``runuser``).

    Example (needs PostgreSQL installed)::

        with PostgresServer() as pg:
            url = pg.url()  # postgresql://lepton:PASSWORD@127.0.0.1:PORT/lepton
    """

    user = "lepton"
    database = "lepton"

    def __init__(self, *, workdir: str | Path | None = None) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise FileNotFoundError("initdb/pg_ctl not found: apt-get install -y postgresql")
        self.bin = bin_dir
        self.host, self.port = "127.0.0.1", free_port()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="lepton-postgres-"))
        self.data_dir = self.workdir / "data"
        self.log_file = self.workdir / "postgres.log"
        self.password = secrets.token_urlsafe(12)
        self._as: list[str] = []
        if os.geteuid() == 0:
            import pwd

            nobody = pwd.getpwnam("nobody")
            os.chown(self.workdir, nobody.pw_uid, nobody.pw_gid)
            self._as = ["runuser", "-u", "nobody", "--"]
        pwfile = self.workdir / "pw"
        pwfile.write_text(self.password + "\n")
        if self._as:
            os.chown(pwfile, nobody.pw_uid, nobody.pw_gid)
        self._run("initdb", "-D", str(self.data_dir), "-U", self.user, f"--pwfile={pwfile}",
                  "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        pwfile.unlink()
        self._started = False

    def _run(self, tool: str, *args: str) -> None:
        done = subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, text=True,
                              cwd=self.workdir)
        if done.returncode != 0:
            log = self.log_file.read_text(errors="replace")[-2000:] if self.log_file.exists() else ""
            raise RuntimeError(f"{tool} failed ({done.returncode}): {done.stderr.strip()}\n{log}")

    def start(self) -> None:
        options = (f"-c listen_addresses={self.host} -c port={self.port} "
                   f"-c unix_socket_directories={self.workdir} -c max_connections=60 "
                   "-c shared_buffers=16MB")
        self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.log_file), "-w", "-t", "60",
                  "-o", options, "start")
        self._started = True
        # The database the URL names (the cluster only has "postgres" and the templates).
        self._run("createdb", "-h", str(self.workdir), "-p", str(self.port), "-U", self.user, self.database)

    def stop(self) -> None:
        if self._started:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
            self._started = False

    def url(self, *, password: bool = True) -> str:
        """``postgresql://lepton[:PASSWORD]@127.0.0.1:PORT/lepton``."""
        auth = f"{self.user}:{self.password}" if password else self.user
        return f"postgresql://{auth}@{self.host}:{self.port}/{self.database}"

    def log(self) -> str:
        return self.log_file.read_text(errors="replace") if self.log_file.exists() else ""

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)
