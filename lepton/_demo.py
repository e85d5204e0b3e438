"""``lepton demo``: the whole edge-cloud loop on one machine, with real processes talking MQTT.

One embedded broker process, one ingest worker process (which spawns training processes), and N device
agent processes, each streaming its own slice of the UCI handwritten digits. The demo itself only
orchestrates and watches: it reads the fleet's retained status and telemetry topics like any dashboard.

Edge accuracy is *prequential*: a device predicts every sample it captures with the model it serves at
that moment, before the sample is published, and each device streams its slice once, so no prediction
is made on an image the serving model was trained on.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from lepton import exitcodes
from lepton._fleetview import FleetView, Reports
from lepton.errors import ChildCrashed, ConfigError
from lepton.protocol import DEFAULT_PREFIX, BrokerURL, Topics, connect, new_client
from lepton.protocol._mqtt import ENV_BROKER, ENV_PASSWORD, ENV_PASSWORD_FILE

log = logging.getLogger(__name__)

FLEET = "demo"
MODEL = "digits"
CLOUD_MODEL = "digits-cloud"
WORKER = "demo-worker"
SERVE = "demo-serve"


@dataclass(frozen=True, kw_only=True)
class DemoConfig:
    devices: int = 3
    duration: float = 100.0
    broker: str | None = None  # an external broker URL with worker credentials; None = embedded
    rate: float = 10.0  # samples/s per device
    train_every: int = 300
    epochs: int = 10
    workdir: Path | None = None
    keep: bool = False
    prefix: str = DEFAULT_PREFIX  # topics {prefix}/{fleet}/...; every child gets --prefix
    #: Edge-cloud collaboration: a tiny edge model, a cloud model trained once enough samples are
    #: stored, a `lepton serve` worker answering the devices' least confident `escalate_rate` samples.
    joint: bool = False
    escalate_rate: float = 0.2
    cloud_after: int = 600  # samples stored before the cloud model is trained
    joint_answers: int = 200  # the joint demo ends once the cloud has answered this many samples
    #: Also serve the fleet dashboard (lepton.dashboard) on this port of 127.0.0.1 (0: a free one).
    dashboard_port: int | None = None


@dataclass
class DeviceView:
    online: bool = False
    captured: int = 0
    acked: int = 0
    spool: int = 0
    model_version: int | None = None
    accuracy: float | None = None
    accuracy_samples: int = 0
    swaps: int = 0
    model_error: str | None = None
    #: collaboration telemetry (flat numbers, docs/protocol.md): escalation, answers, bytes, accuracies
    joint: dict[str, Any] = field(default_factory=dict)
    #: version -> {"correct": int, "samples": int}, as the device's runtime reports it.
    accuracy_by_version: dict[str, dict[str, int]] = field(default_factory=dict)


class Demo:
    def __init__(self, config: DemoConfig) -> None:
        if config.devices < 1 or config.devices > 32:
            raise ConfigError("--devices must be between 1 and 32")
        if config.duration <= 0:
            raise ConfigError("--duration must be positive (seconds)")
        if config.broker is not None:
            BrokerURL.parse(config.broker)  # validates early with a clear message
        self.config = config
        self.workdir = Path(config.workdir or tempfile.mkdtemp(prefix="lepton-demo-"))
        try:
            self.workdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                f"cannot use --workdir {self.workdir}: {exc.strerror}; pass a writable folder"
            ) from None
        # On a shared external broker, retained models of an earlier run (higher versions than this
        # run's fresh registry) would make the devices ignore every new model as stale: use a fleet
        # of our own there.
        self.fleet = FLEET if config.broker is None else f"{FLEET}-{uuid.uuid4().hex[:8]}"
        self.topics = Topics(fleet=self.fleet, prefix=config.prefix)
        #: what the fleet's topics say (lepton._fleetview); paho's thread writes it under view_lock
        self.view = FleetView(fleet=self.fleet, prefix=self.topics.prefix)
        self.view_lock = threading.Lock()
        self.started = time.monotonic()
        self.first_model_s: float | None = None  # written under view_lock
        self._procs: dict[str, subprocess.Popen] = {}
        self._logs: list[IO[bytes]] = []  # children's stdout/stderr files, closed in stop()
        self._stopping = threading.Event()
        self._monitor: _Monitor | None = None
        self.dashboard: Any = None  # lepton.dashboard.DashboardServer with --dashboard (optional extra)

    # -- processes --------------------------------------------------------------------------------
    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        logs = self.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = open(logs / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process in stop()
        # Own session: Ctrl-C in the terminal reaches only the demo, which stops children in order,
        # and killpg also reaches the training processes a worker spawns.
        # Broker credentials travel in the environment (LEPTON_BROKER), never in argv, which every
        # local user can read in /proc/PID/cmdline; the parent's own password variables are not passed.
        base = {k: v for k, v in os.environ.items() if k not in (ENV_BROKER, ENV_PASSWORD, ENV_PASSWORD_FILE)}
        proc = subprocess.Popen([sys.executable, "-m", "lepton", *argv], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, env={**base, **(env or {})})
        self._logs.append(out)
        self._procs[name] = proc
        log.info("started %s (pid %d): %s", name, proc.pid, " ".join(argv))
        return proc

    def _start_broker(self) -> dict[str, str]:
        """Start the embedded broker as its own process; return credentials URL per user."""
        from lepton.broker import free_port, generate_password, write_password_file
        from lepton.testing import wait_for_port

        users = {"worker": generate_password(), "viewer": generate_password()}
        if self.config.joint:
            users["serve"] = generate_password()
        users.update({f"dev-{i}": generate_password() for i in range(self.config.devices)})
        data = self.workdir / "broker"
        write_password_file(data / "passwd", users)
        from lepton.broker._acl import add_acl_user, role_grants

        for user in users:  # each user its role's topics (the worker also publishes the trained models)
            role = "device" if user.startswith("dev-") else ("worker" if user == "serve" else user)
            add_acl_user(data / "acl", user, role_grants(role, self.fleet, user, prefix=self.topics.prefix))
        port = free_port()
        self._spawn("broker", ["broker", "--host", "127.0.0.1", "--port", str(port), "--data", str(data)])
        wait_for_port("127.0.0.1", port, timeout=20)
        return {u: f"mqtt://{u}:{p}@127.0.0.1:{port}" for u, p in users.items()}

    def start(self) -> None:
        from lepton.protocol import generate_keypair

        private, public = generate_keypair(self.workdir / "keys")
        if self.config.broker:
            # An external broker: every role uses the given credentials (fine for Mosquitto/EMQX demos
            # with a permissive ACL; production gives each device its own user).
            urls = {"worker": self.config.broker, "viewer": self.config.broker, "serve": self.config.broker}
            urls.update({f"dev-{i}": self.config.broker for i in range(self.config.devices)})
        else:
            urls = self._start_broker()
        self._monitor = _Monitor(urls["viewer"], self)
        self._monitor.start()
        if self.config.dashboard_port is not None:
            try:
                from lepton.dashboard import DashboardServer
            except ModuleNotFoundError as exc:
                raise ConfigError(f"--dashboard needs {exc.name}: pip install 'lepton[dashboard]'") from None
            self.dashboard = DashboardServer(urls["viewer"], self.fleet, prefix=self.topics.prefix,
                                             host="127.0.0.1", port=self.config.dashboard_port).start()
            print(f"lepton demo: dashboard at {self.dashboard.url}", file=sys.stderr, flush=True)
        self._spawn("worker", [
            "worker", "--fleet", self.fleet, "--prefix", self.topics.prefix,
            "--data", str(self.workdir / "data"),
            "--name", WORKER, "--model", MODEL, "--key", str(private),
            "--train-every", str(self.config.train_every), "--train-publish", "--quiet",
            f"--train-arg=--epochs={self.config.epochs}",
            # joint: the edge model is tiny (microcontroller-class), so the cloud has something to add
            *(["--train-arg=--target=tiny"] if self.config.joint else []),
        ], env={"OMP_NUM_THREADS": "1", ENV_BROKER: urls["worker"]})  # devices, broker and worker on a
        # few cores: one training thread is ~5x faster than torch's default of one per core (measured here).
        self._private, self._public, self._urls = private, public, urls
        if self.config.joint:
            self._spawn("serve", [
                "serve", "--fleet", self.fleet, "--prefix", self.topics.prefix, "--model", CLOUD_MODEL,
                "--name", SERVE, "--public-key", str(public), "--quiet",
            ], env={"OMP_NUM_THREADS": "1", ENV_BROKER: urls["serve"]})
        # joint: devices loop over their slice until --duration (the cloud model needs time to arrive),
        # escalate their least confident samples and upload only those plus a random fifth.
        joint = ["--escalate-rate", str(self.config.escalate_rate), "--answer-timeout-ms", "500",
                 "--upload", "escalated+sample:0.2"] if self.config.joint else ["--once"]
        n = self.config.devices
        for i in range(n):
            self._spawn(f"dev-{i}", [
                "device", "--fleet", self.fleet, "--prefix", self.topics.prefix, "--id", f"dev-{i}",
                "--source", f"digits:{i}/{n}", "--preset", "digits",
                "--rate", str(self.config.rate), "--spool", str(self.workdir / "spool" / f"dev-{i}"),
                "--model", MODEL, "--public-key", str(public), "--quiet", *joint,
            ], env={ENV_BROKER: urls[f"dev-{i}"]})

    def maybe_train_cloud(self) -> None:
        """joint: once ``cloud_after`` samples are stored, train and publish the cloud model, once."""
        if not self.config.joint or "cloud-train" in self._procs:
            return
        with self.view_lock:
            worker = self.view.workers.get(WORKER)
            stored = (worker.status or {}).get("stored") if worker is not None else None
        if not isinstance(stored, int) or stored < self.config.cloud_after:
            return
        self._spawn("cloud-train", [
            "train", "--data", str(self.workdir / "data"), "--fleet", self.fleet, "--prefix", self.topics.prefix,
            "--model", CLOUD_MODEL, "--target", "cloud", "--no-quantize", "--epochs", str(self.config.epochs),
            "--publish", "--key", str(self._private), "--quiet", "--json",
        ], env={"OMP_NUM_THREADS": "1", ENV_BROKER: self._urls["worker"]})

    def stop(self) -> None:
        """SIGINT every child (devices first, then the worker, then the broker), then SIGKILL stragglers."""
        self._stopping.set()
        # Devices drain their last acks while the worker and broker still run; then the worker, then
        # the broker. Each group gets SIGINT together and is waited for once.
        devices = [n for n in self._procs if n.startswith("dev-")]
        for group in (devices, ["worker", "serve", "cloud-train"], ["broker"]):
            procs = [self._procs[n] for n in group if n in self._procs]
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGINT)
                    except ProcessLookupError:
                        pass
            for proc in procs:
                self._wait(proc, 15)
        if self._monitor is not None:
            self._monitor.stop()
        if self.dashboard is not None:
            self.dashboard.stop()
        for out in self._logs:
            out.close()

    @staticmethod
    def _wait(proc: subprocess.Popen, timeout: float) -> None:
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.warning("pid %d did not stop within %.0fs; killing it", proc.pid, timeout)
        # Reap the whole session (a worker's training child included), whatever happened.
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()

    # -- progress ---------------------------------------------------------------------------------
    def device_exit_codes(self) -> dict[str, int | None]:
        return {n: p.poll() for n, p in self._procs.items() if n.startswith("dev-")}

    def finished(self) -> bool:
        """Every device process has exited (each ends once its slice is streamed and acknowledged, or
        its --duration runs out). Whether a model reached them before that is the summary's business:
        on a slow machine the first model can arrive after the slices end, and edge accuracy is then
        reported as None rather than waited for. Joint demos: the devices loop until --duration, so
        the run is done once the cloud has answered ``joint_answers`` samples."""
        if self.config.joint:
            # The devices loop; the point is made once the cloud has answered a fair number of samples
            # with its model (or --duration runs out).
            with self.view_lock:
                views = [_device_view(r) for r in self.view.devices.values()]
            return sum(v.joint.get("answered_by_cloud", 0) for v in views) >= self.config.joint_answers
        codes = self.device_exit_codes()
        return bool(codes) and all(c is not None for c in codes.values())

    def crashed(self) -> ChildCrashed | None:
        """The first child that died: the broker or worker at all (they run until stopped), a device
        that did not end its run (0: its slice streamed and acknowledged; 4: stopped with samples
        unacknowledged, as `lepton device` reports it)."""
        for name, proc in self._procs.items():
            code = proc.poll()
            if code is None or (name.startswith("dev-") and code in (exitcodes.OK, exitcodes.UNACKED)):
                continue
            if name == "cloud-train" and code in (exitcodes.OK, exitcodes.GATE_REFUSED):
                continue  # a one-off job that ended
            return ChildCrashed(name, code, self.workdir / "logs" / f"{name}.log")
        return None

    def _joint(self, views: dict[str, DeviceView]) -> dict[str, Any]:
        cloud = self.view.models.get(CLOUD_MODEL)
        return {**_joint_summary(views), "cloud_model_version": cloud.version if cloud is not None else None}

    def summary(self) -> dict[str, Any]:
        with self.view_lock:
            views = {n: _device_view(r) for n, r in sorted(self.view.devices.items())}
            devices = {n: vars(d).copy() for n, d in views.items()}
            model = self.view.models.get(MODEL)
            metrics = dict(model.metrics) if model is not None else {}
            pooled: dict[int, list[int]] = {}  # version -> [correct, samples] over all devices
            for d in views.values():
                for v, a in d.accuracy_by_version.items():
                    entry = pooled.setdefault(int(v), [0, 0])
                    entry[0] += a["correct"]
                    entry[1] += a["samples"]
            by_version = {v: {"accuracy": round(c / n, 4), "samples": n}
                          for v, (c, n) in sorted(pooled.items()) if n}
            # The fleet's answer at the end: the newest version that has served predictions.
            latest = by_version[max(by_version)] if by_version else None
            all_correct = sum(c for c, _ in pooled.values())
            all_samples = sum(n for _, n in pooled.values())
            worker = self.view.workers.get(WORKER)
            samples = (worker.status or {}).get("stored") if worker is not None else None
            size = model.size if model is not None else None
            fp32 = metrics.get("fp32_size_bytes")
            return {
                "samples_ingested": samples,
                "model_version": model.version if model is not None else None,
                "edge_accuracy": latest["accuracy"] if latest else None,
                "edge_accuracy_samples": latest["samples"] if latest else 0,
                "edge_accuracy_all_versions": round(all_correct / all_samples, 4) if all_samples else None,
                "edge_accuracy_by_version": by_version,
                "pids": {n: p.pid for n, p in self._procs.items()},
                "time_to_first_model_s": (round(self.first_model_s, 2)
                                          if self.first_model_s is not None else None),
                "model_size_bytes": size,
                "compression_ratio": round(size / fp32, 3) if fp32 and size else None,
                "model_quantization": model.quantization if model is not None else None,
                "quantization_reason": metrics.get("quantization_reason"),
                "model_metrics": metrics,
                "devices": devices,
                **(self._joint(views) if self.config.joint else {}),
                "fleet": self.fleet,
                "dashboard_url": self.dashboard.url if self.dashboard is not None else None,
                "duration_s": round(time.monotonic() - self.started, 2),
                "workdir": str(self.workdir),
            }


class _Monitor:
    """A read-only dashboard client: paho's network thread feeds the demo's view (under its lock)."""

    def __init__(self, url: str, demo: Demo) -> None:
        self.url = BrokerURL.parse(url)
        self.demo = demo
        # A client id is the username or starts with "username/" (broker/README.md, client identity).
        name = f"demo-monitor-{os.getpid()}"
        self.client = new_client(self.url, client_id=f"{self.url.username}/{name}" if self.url.username else name)
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message

    def start(self) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                connect(self.client, self.url)
                return
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:  # noqa: ANN001
        client.subscribe(self.demo.view.filters(workers=[WORKER, SERVE], models=[MODEL, CLOUD_MODEL]))

    def _on_message(self, client, userdata, message) -> None:  # noqa: ANN001
        demo = self.demo
        with demo.view_lock:
            channel = demo.view.apply(message.topic, message.payload, now=time.time())
            if channel in ("status", "telemetry") and demo.first_model_s is None:
                device = demo.topics.parse(message.topic).device
                reports = demo.view.devices.get(device) if device is not None else None
                if reports is not None and _device_view(reports).model_version is not None:
                    demo.first_model_s = time.monotonic() - demo.started


def _device_view(reports: Reports) -> DeviceView:
    """A device's row of the demo table: its reports folded in the order they came."""
    dev = DeviceView()
    for body in reports.bodies():
        _merge_device(dev, body)
    return dev


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _merge_device(dev: DeviceView, body: dict[str, Any]) -> None:
    """Fold a device status or telemetry report into the view (fields per docs/protocol.md)."""
    if "online" in body:
        dev.online = bool(body["online"])
    for key in ("captured", "acked"):
        if isinstance(body.get(key), int):
            setattr(dev, key, body[key])
    for key in ("spool_depth", "spool"):
        if isinstance(body.get(key), int):
            dev.spool = body[key]
    model = body.get("model")
    version = body.get("model_version")
    if version is None and isinstance(model, dict):
        version = model.get("version")
    if isinstance(version, int):
        dev.model_version = version
    if "model_error" in body:
        error = body["model_error"]
        dev.model_error = error.get("reason") if isinstance(error, dict) else error
    accuracy = body.get("accuracy")
    if isinstance(accuracy, dict):  # per-version running accuracy: {"3": {"correct", "samples", ...}}
        dev.accuracy_by_version = {
            v: {"correct": _count(a.get("correct")), "samples": _count(a.get("samples"))}
            for v, a in accuracy.items() if isinstance(a, dict) and v.isdigit()
        }
        current = accuracy.get(str(dev.model_version)) if dev.model_version is not None else None
        if isinstance(current, dict):
            value = current.get("accuracy")
            dev.accuracy = value if isinstance(value, (int, float)) and not isinstance(value, bool) else None
            dev.accuracy_samples = _count(current.get("samples"))
    if isinstance(body.get("swaps"), int):
        dev.swaps = body["swaps"]
    for key in _JOINT_KEYS:
        value = body.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            dev.joint[key] = value


_JOINT_KEYS = ("escalated", "escalated_fraction", "answered_by_cloud", "answered_by_edge", "answered_by_none",
               "answer_ms_p99",
               "infer_bytes", "sample_bytes", "published", "truth_samples", "edge_accuracy", "joint_accuracy")


def _joint_summary(views: dict[str, DeviceView]) -> dict[str, Any]:
    """Fleet-wide collaboration figures from the devices' (cumulative) telemetry."""
    tot = {k: sum(v.joint.get(k, 0) or 0 for v in views.values())
           for k in ("escalated", "answered_by_cloud", "infer_bytes", "sample_bytes", "published", "truth_samples")}
    captured = sum(v.captured for v in views.values())
    n = tot["truth_samples"]
    edge = sum((v.joint.get("edge_accuracy") or 0) * (v.joint.get("truth_samples") or 0) for v in views.values())
    both = sum((v.joint.get("joint_accuracy") or 0) * (v.joint.get("truth_samples") or 0) for v in views.values())
    p99 = [v.joint["answer_ms_p99"] for v in views.values() if v.joint.get("answer_ms_p99") is not None]
    # upload-all would send every captured sample once, at the mean envelope bytes per sample sent
    per_sample = tot["sample_bytes"] / tot["published"] if tot["published"] else None
    baseline = captured * per_sample if per_sample else None
    return {
        "joint_accuracy": round(both / n, 4) if n else None,
        "edge_only_accuracy": round(edge / n, 4) if n else None,
        "joint_accuracy_samples": n,
        "escalated_fraction": round(tot["escalated"] / captured, 4) if captured else None,
        "cloud_answers": tot["answered_by_cloud"],
        "upload_bytes_fraction": round((tot["infer_bytes"] + tot["sample_bytes"]) / baseline, 3)
        if baseline else None,
        "answer_p99_ms": max(p99) if p99 else None,
    }


def _render(demo: Demo):  # -> rich renderable
    from rich.table import Table

    s = demo.summary()
    table = Table(title=f"lepton demo  ·  {s['duration_s']:.0f}s  ·  model v{s['model_version'] or '-'}  ·  "
                        f"dataset {s['samples_ingested'] or 0} samples")
    for col in ("device", "online", "captured", "acked", "spool", "model", "edge acc.", "swaps", "error"):
        table.add_column(col, justify="right" if col not in ("device", "error") else "left")
    for name, d in s["devices"].items():
        acc = f"{d['accuracy']:.3f} ({d['accuracy_samples']})" if d["accuracy"] is not None else "-"
        table.add_row(name, "yes" if d["online"] else "no", str(d["captured"]), str(d["acked"]),
                      str(d["spool"]),
                      f"v{d['model_version']}" if d["model_version"] else "-", acc, str(d["swaps"]),
                      d["model_error"] or "")
    return table


def run_demo(config: DemoConfig, *, as_json: bool = False, live: bool = True) -> dict[str, Any]:
    demo = Demo(config)
    interrupted = False
    display = None
    if live and not as_json and sys.stderr.isatty():
        from rich.console import Console
        from rich.live import Live

        display = Live(_render(demo), console=Console(stderr=True), refresh_per_second=4)
        display.start()
    try:
        demo.start()
        deadline = time.monotonic() + config.duration
        while time.monotonic() < deadline:
            crash = demo.crashed()
            if crash:
                raise crash
            if demo.finished():
                break
            demo.maybe_train_cloud()
            if display is not None:
                display.update(_render(demo))
            elif not as_json:
                s = demo.summary()
                print(f"\r[{s['duration_s']:5.0f}s] ingested={s['samples_ingested'] or 0} "
                      f"model=v{s['model_version'] or '-'} edge_acc={s['edge_accuracy']}", end="",
                      file=sys.stderr, flush=True)
            time.sleep(0.25)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        demo.stop()
        if display is not None:
            display.update(_render(demo))
            display.stop()
    result = demo.summary()
    result["interrupted"] = interrupted
    result["device_exit_codes"] = demo.device_exit_codes()
    return result


__all__ = ["DemoConfig", "run_demo"]
