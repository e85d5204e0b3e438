#!/usr/bin/env python3
"""Disk size of a fresh venv per install: what ``pip install 'lepton[device]'`` costs an edge box.

Builds fresh venvs from this checkout (a regular, non-editable install; packages come from the
configured index, PyPI by default) and measures each one's disk usage, like ``du``:

* ``empty``: ``python -m venv`` alone (pip itself), the floor every install pays;
* ``base``: ``pip install .``, the protocol only (numpy, msgpack, paho-mqtt);
* ``device``: ``pip install '.[device]'``, the edge install;
* ``device+demo``: ``pip install '.[device,demo]'``, what ``lepton[device]`` installed before
  scikit-learn moved to the ``demo`` extra (the same-run baseline).

It checks that the device venv holds no torch, Lightning, pyarrow, scikit-learn or scipy, and
that its ``lepton device --source digits`` names the fix instead of a traceback.

    python bench/install_size.py             # prints a table, writes bench/results/install_size.json
    python bench/install_size.py --keep DIR  # keep the venvs in DIR to look inside
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIB = 1024 * 1024
GOAL_MIB = 400
#: Distribution names that must not be in the device venv.
FORBIDDEN = ("torch", "pytorch-lightning", "lightning", "pyarrow", "scikit-learn", "scipy", "pandas")
VARIANTS = {"empty": None, "base": "", "device": "[device]", "device+demo": "[device,demo]"}


def disk_usage(path: Path) -> int:
    """Bytes allocated on disk under ``path`` (``du``): st_blocks, each inode counted once."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for folder, dirs, files in os.walk(path):
        for name in dirs + files:
            st = os.lstat(os.path.join(folder, name))
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            total += st.st_blocks * 512
    return total


def site_packages(venv: Path) -> Path:
    return next((venv / "lib").glob("python*/site-packages"))


def largest(venv: Path, n: int = 6) -> list[tuple[str, float]]:
    """The ``n`` largest top-level entries of site-packages, in MiB."""
    sp = site_packages(venv)
    sizes = [(p.name, disk_usage(p) if p.is_dir() else p.lstat().st_blocks * 512) for p in sp.iterdir()]
    return [(name, round(b / MIB, 1)) for name, b in sorted(sizes, key=lambda t: -t[1])[:n]]


def source_copy(dest: Path) -> Path:
    """This checkout without .git, venvs or results: pip builds in the source tree (build/, *.egg-info)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "results", "__pycache__")
    shutil.copytree(ROOT, dest, ignore=ignore)
    return dest


def build(venv: Path, extra: str | None, source: Path) -> dict:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    if extra is not None:
        # Quiet, no version check; pip's download cache is kept (it lives outside the venv).
        subprocess.run(
            [str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"{source}{extra}"],
            check=True,
        )
    listed = subprocess.run(
        [str(py), "-m", "pip", "list", "--format", "json", "--disable-pip-version-check"],
        check=True, capture_output=True, text=True,
    )
    packages = sorted(p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout))
    return {
        "mib": round(disk_usage(venv) / MIB, 1),
        "packages": packages,
        "largest_mib": largest(venv),
        "build_s": round(time.perf_counter() - started, 1),
    }


def digits_without_demo(venv: Path) -> dict:
    """``lepton device --source digits`` in the device venv: exit code and its one line."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LEPTON_PASSWORD"] = "unused"
    run = subprocess.run(
        [str(venv / "bin" / "lepton"), "device", "--broker", "mqtt://cam-1@127.0.0.1:1", "--fleet", "f1",
         "--id", "cam-1", "--source", "digits", "--limit", "1"],
        capture_output=True, text=True, env=env, timeout=120, cwd=venv,
    )
    return {"exit_code": run.returncode, "stderr": run.stderr.strip()}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", metavar="DIR", help="build the venvs in DIR and keep them")
    parser.add_argument("--out", default=str(HERE / "results" / "install_size.json"), help="JSON output")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="lepton-install-") as tmp:
        work = Path(args.keep) if args.keep else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        source = source_copy(work / "src")
        results = {}
        for name, extra in VARIANTS.items():
            print(f"install_size: building {name} ...", file=sys.stderr, flush=True)
            results[name] = build(work / name, extra, source)
        device = results["device"]
        forbidden = sorted(set(device["packages"]) & set(FORBIDDEN))
        digits = digits_without_demo(work / "device")

    old = results["device+demo"]["mib"]
    where = f"Python {platform.python_version()} ({platform.machine()})"
    print(f"\ninstall_size: fresh venvs on {where}, MiB on disk")
    header = f"{'install':<14} {'MiB':>8} {'packages':>9}  largest in site-packages (MiB)"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        big = ", ".join(f"{n} {m:g}" for n, m in r["largest_mib"][:4]) if name != "empty" else "-"
        print(f"{name:<14} {r['mib']:>8.1f} {len(r['packages']):>9}  {big}")
    verdict = "met" if device["mib"] <= GOAL_MIB else "MISSED"
    print(f"\nlepton[device]: {device['mib']:.1f} MiB = {device['mib'] / old:.2f}x the old extra with "
          f"scikit-learn ({old:.1f} MiB); goal <= {GOAL_MIB} MiB: {verdict}")
    print(f"forbidden packages in the device venv: {', '.join(forbidden) or 'none'}")
    print(f"--source digits without the demo extra: exit {digits['exit_code']}: {digits['stderr'][-160:]}")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "install_size",
        "unit": "MiB on disk (st_blocks, like du)",
        "python": platform.python_version(),
        "machine": platform.machine(),
        "results": results,
        "device_vs_old_device_extra": round(device["mib"] / old, 3),
        "goal_mib": GOAL_MIB,
        "goal_met": device["mib"] <= GOAL_MIB,
        "forbidden_in_device": forbidden,
        "digits_without_demo": digits,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }, indent=2, sort_keys=True) + "\n")
    print(f"wrote {out}")
    return 0 if not forbidden and digits["exit_code"] == 2 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
