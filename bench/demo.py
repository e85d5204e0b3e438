#!/usr/bin/env python3
"""The whole loop, measured: `lepton demo --json` against the same training run offline.

Runs the default demo (embedded broker, 3 device processes, worker that retrains and ships int8 models,
devices that hot-swap them), then, as the baseline in the same run, trains the same model with
`lepton train` on the dataset the demo collected, with nothing else running. Reports:

* edge accuracy (prequential, on samples the serving model never trained on) vs the offline model's
  validation accuracy;
* time from demo start to the first model serving on a device vs the offline training wall time;
* model size (int8) vs the fp32 export.

    python bench/demo.py              # table + bench/results/demo.json
    python bench/demo.py --devices 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=3)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="lepton-bench-demo-"))

    start = time.monotonic()
    demo = subprocess.run([sys.executable, "-m", "lepton", "demo", "--devices", str(args.devices), "--json",
                           "--workdir", str(workdir)], capture_output=True, text=True)
    demo_wall = time.monotonic() - start
    if demo.returncode != 0:
        print(demo.stderr[-3000:], file=sys.stderr)
        return 1
    summary = json.loads(demo.stdout)

    # Baseline: the same trainer, alone on the machine, on everything the demo collected.
    start = time.monotonic()
    offline = subprocess.run(
        [sys.executable, "-m", "lepton", "train", "--data", str(workdir / "data"),
         "--fleet", summary["fleet"], "--model", "offline", "--epochs", "10", "--json", "--quiet"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    offline_wall = time.monotonic() - start
    if offline.returncode != 0:
        print(offline.stderr[-3000:], file=sys.stderr)
        return 1
    report = json.loads(offline.stdout)
    offline_acc = report["export"]["shipped_accuracy"]

    fp32_bytes = report["export"]["fp32_size_bytes"]
    rows = [
        ("edge accuracy (final model, prequential)", summary["edge_accuracy"], "offline val accuracy",
         offline_acc, summary["edge_accuracy"] / offline_acc),
        ("edge accuracy (all versions)", summary["edge_accuracy_all_versions"], "offline val accuracy",
         offline_acc, summary["edge_accuracy_all_versions"] / offline_acc),
        ("first model serving on a device (s)", summary["time_to_first_model_s"], "offline train wall (s)",
         round(offline_wall, 2), summary["time_to_first_model_s"] / offline_wall),
        ("shipped model bytes (int8)", summary["model_size_bytes"], "fp32 export bytes",
         fp32_bytes, summary["model_size_bytes"] / fp32_bytes),
    ]
    print(f"{'figure':44} {'value':>10}  {'baseline':26} {'value':>10} {'ratio':>7}")
    for name, value, base_name, base, ratio in rows:
        print(f"{name:44} {value:>10}  {base_name:26} {base:>10} {ratio:>7.3f}")
    print(f"\ndemo: {summary['samples_ingested']} samples, model v{summary['model_version']}, "
          f"{demo_wall:.1f} s wall; workdir {workdir}")
    out = {
        "demo": {k: v for k, v in summary.items() if k not in ("devices", "pids")},
        "demo_wall_s": round(demo_wall, 2),
        "offline": {"val_accuracy": offline_acc, "wall_s": round(offline_wall, 2),
                    "training": report["training"], "export": report["export"]},
        "ratios": {name: round(ratio, 4) for name, _, _, _, ratio in rows},
        "command": "python bench/demo.py",
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "demo.json").write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
