#!/usr/bin/env python3
"""Dashboard under load: 1,000 simulated devices, the server's CPU and memory, publish -> page p99.

    python bench/dashboard.py                    # 1000 devices, 30 s measured
    python bench/dashboard.py --devices 200 --duration 10

Setup: Mosquitto (lepton.testing.MosquittoBroker); ``lepton dashboard`` in its own process (a viewer
user), as an operator runs it; ``--procs`` publisher processes, each a paho client of its own user,
that between them publish, for every one of ``--devices`` device ids, a retained status and a
telemetry report on that device's own topics every second (each stamped with ``ts`` = the time of
publishing, spread evenly over the second); Debian's chromium (Playwright) with the page open.

Figures, over ``--duration`` seconds after ``--warmup``:

* publish -> page p50 / p99 / max: measured in the browser, the page records for every device row
  it applies ``Date.now() - ts`` of the newest report in it (the same clock: one machine). It includes
  the broker, the server's coalescing period (0.25 s), JSON over SSE and the DOM update.
* server CPU (cores: CPU seconds / wall seconds of the dashboard process) and RSS (max, MiB), against
  the same process idle with the same devices retained (the baseline, measured in the same run).

Goals (issue 14): p99 <= 1 s, <= one core.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def publisher(url: str, fleet: str, ids: list[str], stop_at: float) -> None:
    from lepton.protocol import BrokerURL, Topics, connect, new_client

    topics = Topics(fleet=fleet)
    parsed = BrokerURL.parse(url)
    client = new_client(parsed, client_id=parsed.username or "bench", max_inflight=1000)
    connect(client, parsed)
    n = len(ids)
    seq = 0
    start = time.time()
    while time.time() < stop_at:
        for i, device in enumerate(ids):
            due = start + seq + i / n  # spread evenly over the second
            delay = due - time.time()
            if delay > 0:
                time.sleep(delay)
            ts = round(time.time(), 3)
            status = {"v": 1, "ts": ts, "device": device, "online": True, "pipeline": "0123456789abcdef",
                      "pipeline_name": "digits", "source": "bench", "spool_depth": seq % 50, "dropped": 0,
                      "skipped": 0, "next_seq": seq * 25, "model": "digits", "model_version": 1 + (i % 3),
                      "model_error": None, "accuracy": {str(1 + (i % 3)): {"accuracy": 0.95, "correct": 95,
                                                                          "samples": 100}}}
            telemetry = {"v": 1, "ts": ts, "captured": seq * 25, "published": seq * 25,
                         "acked": max(0, seq * 25 - 10), "spool_depth": seq % 50, "inferences": seq * 25,
                         "inference_ms_mean": 0.4, "inference_ms_p50": 0.35, "inference_ms_p99": 1.2,
                         "swaps": 1,
                         "model_version": 1 + (i % 3), "uptime_s": seq}
            client.publish(topics.status(device), json.dumps(status), qos=0, retain=True)
            client.publish(topics.telemetry(device), json.dumps(telemetry), qos=0)
        seq += 1
    client.disconnect()
    client.loop_stop()


def cpu_seconds(proc) -> float:  # noqa: ANN001
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=1000)
    parser.add_argument("--procs", type=int, default=4)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=8.0)
    parser.add_argument("--idle", type=float, default=5.0, help="seconds of the idle baseline")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "dashboard.json"))
    args = parser.parse_args()

    import psutil
    from playwright.sync_api import sync_playwright

    from lepton.testing import MosquittoBroker

    fleet = "bench"
    with MosquittoBroker() as broker:
        sims = [_simulator(broker, fleet, f"sim{i}") for i in range(args.procs)]
        port = _free_port()
        env = dict(os.environ, LEPTON_BROKER=broker.url("viewer", "dash", fleet=fleet),
                   PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
        dash = subprocess.Popen([sys.executable, "-m", "lepton", "dashboard", "--fleet", fleet, "--port", str(port),
                                 "--max-devices", str(max(2000, args.devices))], env=env,
                                stderr=subprocess.PIPE, text=True)
        print(f"{args.devices} devices, {args.procs} publishers, dashboard pid {dash.pid}", file=sys.stderr)
        line = dash.stderr.readline()
        if "http://" not in line:
            print(line + dash.stderr.read(), file=sys.stderr)
            return 1
        url = f"http://127.0.0.1:{port}/"
        server = psutil.Process(dash.pid)
        ids = [f"dev-{i:05d}" for i in range(args.devices)]
        chunks = [ids[i::args.procs] for i in range(args.procs)]
        # idle baseline first: every device retained once, then nothing published
        end = time.time() + 1.5
        seed = [mp.Process(target=publisher, args=(sims[i], fleet, c, end)) for i, c in enumerate(chunks)]
        for p in seed:
            p.start()
        for p in seed:
            p.join()
        time.sleep(2)
        c0, w0 = cpu_seconds(server), time.monotonic()
        time.sleep(args.idle)
        idle_cores = (cpu_seconds(server) - c0) / (time.monotonic() - w0)
        idle_rss = server.memory_info().rss

        stop_at = time.time() + args.warmup + args.duration + 2
        pubs = [mp.Process(target=publisher, args=(sims[i], fleet, c, stop_at)) for i, c in enumerate(chunks)]
        for p in pubs:
            p.start()
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            time.sleep(args.warmup)
            page.evaluate("() => { window.leptonPage.lags = []; window.leptonPage.next = 0; window.leptonPage.updates = 0; }")
            c0, w0 = cpu_seconds(server), time.monotonic()
            rss_max = 0
            while time.monotonic() - w0 < args.duration:
                time.sleep(1)
                rss_max = max(rss_max, server.memory_info().rss)
            cores = (cpu_seconds(server) - c0) / (time.monotonic() - w0)
            page_stats = page.evaluate("() => ({lags: window.leptonPage.lags, updates: window.leptonPage.updates,"
                                       " rows: document.querySelectorAll('#devices tbody tr').length})")
            browser.close()
        for p in pubs:
            p.join(30)
        dash.terminate()
        dash.wait(20)

    lags = sorted(page_stats["lags"])

    def pct(q: float) -> float:
        return lags[min(len(lags) - 1, int(q * len(lags)))] if lags else float("nan")

    result = {
        "devices": args.devices, "messages_per_s": 2 * args.devices, "duration_s": args.duration,
        "rows_on_page": page_stats["rows"], "row_updates": page_stats["updates"], "lag_samples": len(lags),
        "publish_to_page_p50_s": round(pct(0.50), 3), "publish_to_page_p99_s": round(pct(0.99), 3),
        "publish_to_page_max_s": round(lags[-1], 3) if lags else None,
        "server_cpu_cores": round(cores, 3), "server_cpu_cores_idle": round(idle_cores, 3),
        "server_rss_mib_max": round(rss_max / 2**20, 1), "server_rss_mib_idle": round(idle_rss / 2**20, 1),
        "goals": {"p99_le_1s": pct(0.99) <= 1.0, "cpu_le_1_core": cores <= 1.0},
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "date": time.strftime("%Y-%m-%d"),
    }
    rows = [("devices (status + telemetry each per s)", f"{args.devices}"),
            ("rows on the page", f"{page_stats['rows']}"),
            ("publish -> page p50 / p99 / max", f"{pct(0.5):.3f} / {pct(0.99):.3f} / {result['publish_to_page_max_s']} s"),
            ("server CPU under load (idle)", f"{cores:.2f} ({idle_cores:.2f}) cores"),
            ("server RSS max (idle)", f"{result['server_rss_mib_max']} ({result['server_rss_mib_idle']}) MiB")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if all(result["goals"].values()) else 1


def _simulator(broker, fleet: str, name: str) -> str:  # noqa: ANN001
    """A user that may write the status and telemetry of every device of ``fleet``: it simulates many
    devices, each on its own topics (real devices each have a user of their own)."""
    url = broker.url("viewer", name, fleet=fleet)
    with broker.acl_file.open("a") as acl:
        acl.write(f"\nuser {name}\ntopic write lepton/{fleet}/devices/+/status\n"
                  f"topic write lepton/{fleet}/devices/+/telemetry\n")
    broker.reload()
    return url


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":
    sys.exit(main())
