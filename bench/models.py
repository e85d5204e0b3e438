#!/usr/bin/env python3
"""Built-in models: training time, accuracy before/after int8, sizes, batch-1 latency per runtime.

    python bench/models.py            # digits CNN, digits MLP, 3x64x64 CNN (about a minute on 2 cores)
    python bench/models.py --quick    # fewer epochs and timing runs

Each model is trained with ``lepton.cloud.train`` on a Parquet dataset written with the ingest writer:
the real UCI digits (1x8x8 for the CNN, 64 features for the MLP) and a 3x64x64 colour version of the
same digits (upscaled, tinted per sample, with noise), so the bigger CNN has a real task.

Latency is the median wall time of one batch-1 inference with ONE thread for every runtime (an edge
device's situation, and stable on a shared machine). The baseline is PyTorch eager measured in the same
run: ratios < 1 mean faster than eager. Writes bench/results/models.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def digits():
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.images / 16.0).astype(np.float32), d.target


def colour64(images: np.ndarray, seed: int = 0) -> np.ndarray:
    """8x8 digits -> 3x64x64: nearest upscaling, a random tint per sample, Gaussian noise."""
    rng = np.random.default_rng(seed)
    big = np.kron(images, np.ones((8, 8), np.float32))  # (n, 64, 64)
    tint = rng.uniform(0.4, 1.0, size=(len(images), 3, 1, 1)).astype(np.float32)
    x = big[:, None, :, :] * tint + rng.normal(0, 0.08, size=(len(images), 3, 64, 64)).astype(np.float32)
    return np.clip(x, 0, 1).astype(np.float32)


def write(root: Path, fleet: str, x: np.ndarray, y: np.ndarray, pipeline: str) -> None:
    from lepton.cloud._dataset import samples_to_table, write_parquet_atomic
    from lepton.protocol import Sample

    data = root / fleet / "data"
    data.mkdir(parents=True, exist_ok=True)
    for part, start in enumerate(range(0, len(x), 400)):
        rows = [
            (f"dev-{i % 4}", pipeline, Sample(seq=i // 4, ts=float(i), x=x[i], y=str(int(y[i]))))
            for i in range(start, min(start + 400, len(x)))
        ]
        write_parquet_atomic(data / f"part-{part:04d}.parquet", samples_to_table(rows))


def torch_latency_ms(module, sample: np.ndarray, runs: int, warmup: int = 20) -> float:
    import torch

    module.eval()
    x = torch.from_numpy(sample)
    with torch.no_grad():
        for _ in range(warmup):
            module(x)
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            module(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def bench_one(name: str, x: np.ndarray, y: np.ndarray, *, epochs: int, runs: int, workdir: Path) -> dict:
    import torch

    from lepton.cloud import ExportConfig, TrainConfig, train
    from lepton.cloud._export import measure_latency_ms, onnx_session
    from lepton.cloud._nets import make_module

    fleet = f"b{uuid.uuid4().hex[:8]}"
    write(workdir, fleet, x, y, pipeline=name)
    module = make_module(tuple(x.shape[1:]), 10)
    config = TrainConfig(
        data=workdir,
        fleet=fleet,
        model=name,
        epochs=epochs,
        patience=epochs,
        export=ExportConfig(latency_runs=10),
    )
    torch.set_num_threads(2)
    result = train(config, module=module)
    rep, tr = result.report["export"], result.report["training"]
    version = result.version
    sample = x[:1]
    torch.set_num_threads(1)
    fp32 = onnx_session(
        (version.path / "model.fp32.onnx").read_bytes()
        if (version.path / "model.fp32.onnx").exists()
        else version.data()
    )
    lat = {
        "torch_eager_ms": torch_latency_ms(module, sample, runs),
        "ort_fp32_ms": measure_latency_ms(fp32, sample, runs=runs),
    }
    if version.manifest["quantization"] == "int8":  # the registry keeps the int8 model when it ships
        lat["ort_int8_ms"] = measure_latency_ms(onnx_session(version.data()), sample, runs=runs)
    base = lat["torch_eager_ms"]
    return {
        "model": name,
        "network": tr["module"],
        "input_shape": list(x.shape[1:]),
        "params": sum(p.numel() for p in module.parameters()),
        "train_samples": result.report["data"]["train_samples"],
        "val_samples": result.report["data"]["val_samples"],
        "epochs": tr["epochs_run"],
        "train_time_s": tr["time_s"],
        "fp32_accuracy": rep["fp32_accuracy"],
        "int8_accuracy": rep.get("int8_accuracy"),
        "accuracy_drop_points": rep.get("accuracy_drop_points"),
        "shipped": rep["shipped"],
        "fp32_size_bytes": rep["fp32_size_bytes"],
        "int8_size_bytes": rep.get("int8_size_bytes"),
        "size_ratio": rep.get("size_ratio"),
        "max_abs_diff": rep["max_abs_diff"],
        **{k: round(v, 4) for k, v in lat.items()},
        **{
            k.replace("_ms", "_vs_eager"): round(v / base, 3) for k, v in lat.items() if k != "torch_eager_ms"
        },
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer epochs and timing runs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    runs = 100 if args.quick else 500
    images, y = digits()
    cases = [
        ("digits-cnn", images.reshape(-1, 1, 8, 8), 4 if args.quick else 10),
        ("digits-mlp", images.reshape(-1, 64), 6 if args.quick else 15),
        ("colour64-cnn", colour64(images), 2 if args.quick else 4),
    ]
    workdir = Path(tempfile.mkdtemp(prefix="lepton-bench-models-"))
    rows = []
    try:
        for name, x, epochs in cases:
            print(
                f"training {name} {list(x.shape[1:])} for up to {epochs} epochs ...",
                file=sys.stderr,
                flush=True,
            )
            rows.append(bench_one(name, x, y, epochs=epochs, runs=runs, workdir=workdir))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    header = (
        f"{'model':<13} {'input':<10} {'params':>7} {'train s':>7} {'acc fp32':>8} {'acc int8':>8} "
        f"{'fp32 KB':>8} {'int8 KB':>8} {'size':>5} {'eager ms':>8} {'ort fp32':>14} {'ort int8':>14}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        int8_acc = f"{r['int8_accuracy']:.4f}" if r["int8_accuracy"] is not None else "-"
        int8_kb = f"{r['int8_size_bytes'] / 1024:.0f}" if r["int8_size_bytes"] else "-"
        ratio = f"{r['size_ratio']:.2f}x" if r["size_ratio"] else "-"
        i8 = f"{r['ort_int8_ms']:.3f} ({r['ort_int8_vs_eager']:.2f}x)" if "ort_int8_ms" in r else "-"
        print(
            f"{r['model']:<13} {'x'.join(map(str, r['input_shape'])):<10} {r['params']:>7} "
            f"{r['train_time_s']:>7.1f} {r['fp32_accuracy']:>8.4f} {int8_acc:>8} "
            f"{r['fp32_size_bytes'] / 1024:>8.0f} {int8_kb:>8} {ratio:>5} {r['torch_eager_ms']:>8.3f} "
            f"{r['ort_fp32_ms']:.3f} ({r['ort_fp32_vs_eager']:.2f}x) {i8:>14}"
        )
    print("latency: median of batch-1 runs, 1 thread; (Nx) = time relative to PyTorch eager in this run")
    out = HERE / "results" / "models.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "runs_per_latency": runs,
                "threads": 1,
                "baseline": "torch_eager_ms",
                "models": rows,
                "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
            indent=2,
        )
    )
    print(f"wrote {out.relative_to(HERE.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
