#!/usr/bin/env python3
"""Encode + decode time of one 3x224x224 float32 tensor in one samples envelope.

Compares Lepton's codec (msgpack map, raw little-endian bytes, zero-copy decode) with the naive JSON
approach (``x.tolist()``), pickle, and a memcpy baseline (copy the tensor's bytes out, ``np.copy`` them
back in), all measured in the same run: each method is timed ``--repeat`` times, interleaved with the
others; one timing covers enough calls to last a few milliseconds (timer resolution), and the median
per call is reported with its ratio to the baseline.

    python bench/codec.py                 # prints a table, writes bench/results/codec.json
    python bench/codec.py --repeat 50 --shape 1,28,28
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lepton.protocol import Sample, decode_samples, encode_samples

HERE = Path(__file__).resolve().parent
DEVICE, TS, LABEL = "cam-1", 1700000000.5, 3


def lepton_codec(x: np.ndarray) -> tuple[Callable[[], bytes], Callable[[bytes], np.ndarray]]:
    def encode() -> bytes:
        return encode_samples(DEVICE, [Sample(seq=0, ts=TS, x=x, y=LABEL)])

    def decode(payload: bytes) -> np.ndarray:
        return decode_samples(payload, expected_device=DEVICE).samples[0].x

    return encode, decode


def json_tolist(x: np.ndarray):
    def encode() -> bytes:
        body = {"v": 1, "device": DEVICE, "samples": [{"seq": 0, "ts": TS, "x": x.tolist(), "y": LABEL}]}
        return json.dumps(body).encode()

    def decode(payload: bytes) -> np.ndarray:
        return np.asarray(json.loads(payload)["samples"][0]["x"], dtype=np.float32)

    return encode, decode


def pickle_codec(x: np.ndarray):
    def encode() -> bytes:
        body = {"v": 1, "device": DEVICE, "samples": [{"seq": 0, "ts": TS, "x": x, "y": LABEL}]}
        return pickle.dumps(body, protocol=pickle.HIGHEST_PROTOCOL)

    def decode(payload: bytes) -> np.ndarray:
        return pickle.loads(payload)["samples"][0]["x"]  # noqa: S301 - exactly why the wire never uses it

    return encode, decode


def memcpy_baseline(x: np.ndarray):
    def encode() -> bytes:
        return x.tobytes()  # one copy of the tensor's bytes

    def decode(payload: bytes) -> np.ndarray:
        return np.copy(np.frombuffer(payload, dtype=x.dtype).reshape(x.shape))  # and one back

    return encode, decode


METHODS = {
    "memcpy (baseline)": memcpy_baseline,
    "lepton msgpack": lepton_codec,
    "pickle": pickle_codec,
    "json tolist()": json_tolist,
}


def _calls_per_timing(encode: Callable[[], bytes], decode: Callable[[bytes], np.ndarray]) -> int:
    """How many calls make one timing last at least ~5 ms."""
    calls = 1
    while True:
        t0 = time.perf_counter()
        for _ in range(calls):
            decode(encode())
        if time.perf_counter() - t0 >= 0.005 or calls >= 1 << 16:
            return calls
        calls *= 2


def measure(x: np.ndarray, repeat: int, slow_repeat: int) -> dict[str, dict[str, float]]:
    codecs = {name: make(x) for name, make in METHODS.items()}
    for name, (encode, decode) in codecs.items():  # correctness first, and a warm-up
        decoded = decode(encode())
        if decoded.shape != x.shape or decoded.dtype != x.dtype or not np.array_equal(decoded, x):
            raise SystemExit(f"codec: {name} does not round-trip the tensor")
    calls = {name: _calls_per_timing(*codec) for name, codec in codecs.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"encode": [], "decode": []} for n in codecs}
    for i in range(repeat):
        for name, (encode, decode) in codecs.items():  # interleaved: drifts hit every method alike
            if name.startswith("json") and i >= slow_repeat:
                continue
            n = calls[name]
            t0 = time.perf_counter()
            for _ in range(n):
                payload = encode()
            t1 = time.perf_counter()
            for _ in range(n):
                decode(payload)
            t2 = time.perf_counter()
            times[name]["encode"].append((t1 - t0) / n)
            times[name]["decode"].append((t2 - t1) / n)
    out: dict[str, dict[str, float]] = {}
    for name, (encode, _) in codecs.items():
        enc, dec = times[name]["encode"], times[name]["decode"]
        total = [a + b for a, b in zip(enc, dec, strict=True)]
        out[name] = {"encode_ms": statistics.median(enc) * 1e3, "decode_ms": statistics.median(dec) * 1e3,
                     "total_ms": statistics.median(total) * 1e3, "payload_bytes": len(encode()),
                     "runs": len(total), "calls_per_run": calls[name]}
    base = out["memcpy (baseline)"]["total_ms"]
    for row in out.values():
        row["ratio_vs_memcpy"] = row["total_ms"] / base
        row["mb_per_s"] = x.nbytes / 1e6 / (row["total_ms"] / 1e3)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="3,224,224",
                        help="tensor shape, comma-separated (default 3,224,224)")
    parser.add_argument("--repeat", type=int, default=30, help="runs per method (default 30)")
    parser.add_argument("--json-repeat", type=int, default=10,
                        help="runs of the slow JSON method (default 10)")
    parser.add_argument("--out", default=str(HERE / "results" / "codec.json"), help="where to write the JSON")
    args = parser.parse_args(argv)
    shape = tuple(int(d) for d in args.shape.split(","))
    x = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)

    results = measure(x, args.repeat, min(args.json_repeat, args.repeat))

    print(f"codec: one samples envelope with a {'x'.join(map(str, shape))} float32 tensor "
          f"({x.nbytes / 1e6:.2f} MB), median of the runs")
    header = f"{'method':<20} {'encode ms':>10} {'decode ms':>10} {'total ms':>10} {'x memcpy':>9} " \
             f"{'MB/s':>8} {'payload':>10} {'runs':>5}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        print(f"{name:<20} {r['encode_ms']:>10.3f} {r['decode_ms']:>10.3f} {r['total_ms']:>10.3f} "
              f"{r['ratio_vs_memcpy']:>8.1f}x {r['mb_per_s']:>8.0f} {r['payload_bytes']:>10,} {r['runs']:>5}")
    lepton, js = results["lepton msgpack"], results["json tolist()"]
    print(f"\nLepton is {js['total_ms'] / lepton['total_ms']:.0f}x faster than JSON tolist() and its payload "
          f"is {js['payload_bytes'] / lepton['payload_bytes']:.1f}x smaller; "
          f"{lepton['ratio_vs_memcpy']:.2f}x the memcpy baseline.")

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "codec",
        "shape": list(shape), "dtype": "float32", "tensor_bytes": x.nbytes,
        "baseline": "memcpy (baseline)",
        "results": results,
        "machine": {"python": platform.python_version(), "numpy": np.__version__,
                    "platform": platform.platform(), "cpus": os.cpu_count()},
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
