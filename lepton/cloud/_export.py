"""ONNX export, verification against PyTorch, and static int8 quantization with ONNX Runtime.

Exporter choice: ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based exporter. On torch
2.13 it is still present (with a deprecation warning that we silence), exports these small
conv/linear networks in tens of milliseconds, folds BatchNorm into the convolutions, and gives a
plain ``Conv/Relu/Gemm`` graph that ``quantize_static`` handles well. The dynamo exporter needs
onnxscript, takes seconds per export on this CPU, and emits a graph that needs an extra optimisation
pass before quantization; it is used only as a fallback when the legacy exporter is gone.

Quantization: QDQ format, per-channel int8 weights, uint8 activations (the ONNX Runtime guidance for
x86 and a safe choice for ARM), MinMax calibration on training samples of the same dataset.

What ships: the int8 model ships only when (1) its validation accuracy is within
``max_int8_drop_points`` of fp32 *and* (2) it is faster than fp32 at batch 1 on the machine that
measured it. QDQ int8 is not always faster: on a small network the quantize/dequantize pairs can cost
more than the int8 kernels save, and on CPUs without int8 dot-product instructions. The two
latencies are measured interleaved (fp32 run, int8 run, fp32 run, ...) so that load on a shared CPU
hits both alike; the report gives both and the reason, and the manifest's metrics carry them.
"""

from __future__ import annotations

import io
import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lepton.errors import ExportError, ModelRejected
from lepton.protocol import check_onnx_self_contained

log = logging.getLogger(__name__)

__all__ = [
    "ExportConfig",
    "ExportError",
    "ExportResult",
    "export_and_compress",
    "export_onnx",
    "int8_decision",
    "compare_latency_ms",
    "measure_latency_ms",
    "onnx_accuracy",
    "onnx_session",
    "quantize_int8",
    "torch_max_abs_diff",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    """Export and compression settings; every default works on one machine."""

    opset: int = 17
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME
    #: Export fails when ONNX Runtime and PyTorch logits differ by more than this on a validation batch.
    max_abs_diff: float = 1e-3
    quantize: bool = True
    #: The int8 model ships only if its accuracy is at most this many percentage points below fp32.
    max_int8_drop_points: float = 1.0
    #: The int8 model ships only if it is also faster than fp32 at batch 1 (median of interleaved runs).
    #: False ships it on accuracy alone, e.g. when size matters more than speed.
    require_int8_speedup: bool = True
    calibration_samples: int = 512
    #: 7-bit weights for x86 CPUs without VNNI (see onnxruntime.quantization.quantize_static).
    reduce_range: bool = False
    latency_runs: int = 200

    def __post_init__(self) -> None:
        if self.opset < 17:
            raise ValueError(f"opset must be >= 17, got {self.opset}")


@dataclass
class ExportResult:
    """The exported models and the figures of the export report."""

    fp32: bytes
    int8: bytes | None
    shipped: bytes
    quantization: str  # "int8" or "none"
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def shipped_accuracy(self) -> float:
        return float(self.report["shipped_accuracy"])

    @property
    def calibration(self) -> dict[str, Any] | None:
        """``{"method": "temperature", "temperature": T, "ece_raw", "ece_calibrated", ...}``."""
        return self.report.get("calibration")


# ------------------------------------------------------------------------------------------------
# export
# ------------------------------------------------------------------------------------------------
def export_onnx(
    module: torch.nn.Module,
    input_shape: tuple[int, ...],
    *,
    opset: int = 17,
    input_name: str = INPUT_NAME,
    output_name: str = OUTPUT_NAME,
) -> bytes:
    """Export ``module`` to ONNX bytes with a dynamic batch dimension.

    Runs in eval mode under ``no_grad`` and restores the module's training mode afterwards.
    """
    was_training = module.training
    dummy = torch.zeros((1, *input_shape), dtype=torch.float32, device=_device_of(module))
    buf = io.BytesIO()
    module.eval()
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(
                    module,
                    (dummy,),
                    buf,  # type: ignore[arg-type]  # typed as a path; the legacy exporter takes a BytesIO
                    dynamo=False,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                    do_constant_folding=True,
                )
            except TypeError:  # a torch without the legacy exporter: dynamo path (needs onnxscript)
                buf = io.BytesIO()
                program = torch.onnx.export(
                    module,
                    (dummy,),
                    dynamo=True,
                    opset_version=opset,
                    input_names=[input_name],
                    output_names=[output_name],
                    dynamic_shapes=({0: torch.export.Dim("batch")},),
                )
                assert program is not None  # dynamo=True returns the program
                program.optimize()
                program.save(buf)  # type: ignore[arg-type]  # typed as a path; writes to a BytesIO too
    except Exception as exc:  # the exporters raise many types; say what to change
        raise ExportError(
            f"ONNX export of {type(module).__name__} failed: {exc}. Make forward() take one "
            "float32 tensor [batch, *shape] and return logits, with no data-dependent control "
            "flow, or pass --module with an exportable model"
        ) from exc
    finally:
        module.train(was_training)
    data = buf.getvalue()
    check_self_contained(data, what=f"the ONNX export of {type(module).__name__}")
    return data


def check_self_contained(model: bytes, *, what: str = "the model") -> None:
    """Raise ExportError when an ONNX model keeps tensors in external data files.

    Such a model cannot ship (devices refuse it: ``external_data``), and ONNX Runtime before 1.24 would
    open whatever path it names, ``../`` included, so it is refused before any session is built here too.
    """
    try:
        check_onnx_self_contained(model, what=what)
    except ModelRejected as exc:
        raise ExportError(f"{exc.detail}. Models over 2 GB cannot ship; make it smaller") from None


def _device_of(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def onnx_session(model: bytes, *, threads: int = 1):
    """An ONNX Runtime CPU session; one intra-op thread by default (edge-like, and quiet on shared CPUs)."""
    import onnxruntime as ort

    check_self_contained(model)  # before ONNX Runtime opens any file it names
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def torch_max_abs_diff(module: torch.nn.Module, session, x: np.ndarray) -> float:
    """Max |ONNX Runtime - PyTorch| over the logits of batch ``x``."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            expected = module(torch.from_numpy(x).to(_device_of(module))).cpu().numpy()
    finally:
        module.train(was_training)
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    if got.shape != expected.shape:
        raise ExportError(f"ONNX output shape {got.shape} differs from PyTorch {expected.shape}")
    return float(np.max(np.abs(got - expected))) if got.size else 0.0


def onnx_accuracy(
    session, batches: Iterable[tuple[np.ndarray, np.ndarray]], *, label_map: np.ndarray | None = None
) -> tuple[float, int]:
    """Accuracy of argmax(logits) over ``(x, y)`` batches; ``label_map`` maps the model's class
    indices to the dataset's (``-1`` for a class the dataset does not have)."""
    name = session.get_inputs()[0].name
    correct = total = 0
    for x, y in batches:
        pred = session.run(None, {name: x})[0].argmax(axis=1)
        if label_map is not None:
            pred = label_map[pred]
        correct += int((pred == y).sum())
        total += len(y)
    return (correct / total if total else 0.0), total


def measure_latency_ms(session, sample: np.ndarray, *, runs: int = 200, warmup: int = 20) -> float:
    """Median wall time of one batch-1 inference, in milliseconds."""
    name = session.get_inputs()[0].name
    x = sample[None, ...] if sample.ndim == len(session.get_inputs()[0].shape) - 1 else sample
    for _ in range(warmup):
        session.run(None, {name: x})
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        session.run(None, {name: x})
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000.0


def compare_latency_ms(
    a, b, sample: np.ndarray, *, runs: int = 200, warmup: int = 20
) -> tuple[float, float]:
    """Median batch-1 wall times of sessions ``a`` and ``b`` in ms, measured interleaved.

    Alternating the two (a, b, a, b, ...) exposes both to the same background load, so the comparison
    holds on a busy or throttled CPU where two back-to-back measurements would not.
    """
    feeds = []
    for sess in (a, b):
        inp = sess.get_inputs()[0]
        x = sample[None, ...] if sample.ndim == len(inp.shape) - 1 else sample
        feeds.append((sess, {inp.name: x}))
    for _ in range(warmup):
        for sess, feed in feeds:
            sess.run(None, feed)
    times: tuple[list[float], list[float]] = ([], [])
    clock = time.perf_counter
    for i in range(runs):
        order = (0, 1) if i % 2 == 0 else (1, 0)  # neither always runs on a warm cache after the other
        for k in order:
            sess, feed = feeds[k]
            t = clock()
            sess.run(None, feed)
            times[k].append(clock() - t)
    return statistics.median(times[0]) * 1000.0, statistics.median(times[1]) * 1000.0


# ------------------------------------------------------------------------------------------------
# quantization
# ------------------------------------------------------------------------------------------------
def quantize_int8(
    model: bytes,
    calibration: Iterable[np.ndarray],
    *,
    input_name: str = INPUT_NAME,
    reduce_range: bool = False,
) -> bytes:
    """Static int8 quantization (QDQ, per-channel weights, uint8 activations, MinMax calibration)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class _Reader(CalibrationDataReader):
        def __init__(self, batches: Iterator[np.ndarray]) -> None:
            self.batches = batches

        def get_next(self):  # noqa: ANN202
            x = next(self.batches, None)
            return None if x is None else {input_name: np.ascontiguousarray(x, dtype=np.float32)}

    with tempfile.TemporaryDirectory(prefix="lepton-quant-") as tmp:
        src, pre, out = Path(tmp, "fp32.onnx"), Path(tmp, "pre.onnx"), Path(tmp, "int8.onnx")
        src.write_bytes(model)
        try:
            quant_pre_process(str(src), str(pre), skip_symbolic_shape=False)
        except Exception as exc:  # pre-processing is an optimisation; quantize the raw export instead
            log.warning("quantization pre-processing failed (%s); quantizing the export as is", exc)
            pre = src
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(
                str(pre),
                str(out),
                _Reader(iter(calibration)),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=reduce_range,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibration_providers=["CPUExecutionProvider"],
            )
        return out.read_bytes()


# ------------------------------------------------------------------------------------------------
# the decision
# ------------------------------------------------------------------------------------------------
def int8_decision(
    drop_points: float,
    fp32_ms: float,
    int8_ms: float,
    max_drop_points: float,
    *,
    require_speedup: bool = True,
) -> tuple[str, str]:
    """``("int8" | "none", reason)``: int8 ships when accurate enough and, if required, faster."""
    acc = f"accuracy drop {drop_points:.2f} points"
    speed = f"int8 {int8_ms:.3f} ms vs fp32 {fp32_ms:.3f} ms at batch 1"
    if not drop_points <= max_drop_points:
        return "none", f"int8 {acc} > {max_drop_points:g} allowed; shipping fp32 ({speed})"
    if require_speedup and not int8_ms < fp32_ms:
        return "none", (
            f"int8 is not faster here ({speed}); shipping fp32 (int8 {acc} <= {max_drop_points:g}; "
            "--allow-slower-int8 ships it anyway)"
        )
    faster = "faster" if int8_ms < fp32_ms else "slower, allowed"
    return "int8", f"int8 {acc} <= {max_drop_points:g} and {faster} ({speed})"


# ------------------------------------------------------------------------------------------------
# the whole step
# ------------------------------------------------------------------------------------------------
def export_and_compress(
    module: torch.nn.Module, datamodule, config: ExportConfig | None = None
) -> ExportResult:
    """Export, verify, quantize and choose what ships; ``datamodule`` gives validation and calibration data.

    ``datamodule`` needs ``input_shape`` and ``iter_numpy(split, batch_size=, limit=)``
    (:class:`~lepton.cloud.ParquetDataModule`).
    """
    cfg = config or ExportConfig()
    shape = tuple(datamodule.input_shape)
    t0 = time.perf_counter()
    fp32 = export_onnx(module, shape, opset=cfg.opset, input_name=cfg.input_name, output_name=cfg.output_name)
    export_s = time.perf_counter() - t0
    fp32_sess = onnx_session(fp32)
    first_x, _ = next(iter(datamodule.iter_numpy("val", batch_size=256)))
    diff = torch_max_abs_diff(module, fp32_sess, first_x)
    if not diff <= cfg.max_abs_diff:
        raise ExportError(
            f"ONNX Runtime and PyTorch outputs differ by {diff:.3g} > {cfg.max_abs_diff:g} on a "
            "validation batch; the model uses an op the exporter translates differently "
            "(set ExportConfig.max_abs_diff to accept it)"
        )
    fp32_acc, n_val = onnx_accuracy(fp32_sess, datamodule.iter_numpy("val"))
    sample = first_x[:1]
    report: dict[str, Any] = {
        "exporter": "torchscript (dynamo=False)",
        "opset": cfg.opset,
        "export_s": round(export_s, 3),
        "max_abs_diff": diff,
        "val_samples": n_val,
        "fp32_size_bytes": len(fp32),
        "fp32_accuracy": fp32_acc,
        "fp32_latency_ms": measure_latency_ms(fp32_sess, sample, runs=cfg.latency_runs),
        "max_int8_drop_points": cfg.max_int8_drop_points,
        "require_int8_speedup": cfg.require_int8_speedup,
    }
    int8: bytes | None = None
    shipped, quantization = fp32, "none"
    reason = "quantization disabled"
    if cfg.quantize:
        t0 = time.perf_counter()
        calib = (x for x, _ in datamodule.iter_numpy("train", batch_size=64, limit=cfg.calibration_samples))
        try:
            int8 = quantize_int8(fp32, calib, input_name=cfg.input_name, reduce_range=cfg.reduce_range)
        except Exception as exc:  # noqa: BLE001 - an unquantizable model still ships in fp32
            log.warning("int8 quantization failed: %s; shipping fp32", exc)
            reason = f"int8 quantization failed: {exc}"
        else:
            int8_sess = onnx_session(int8)
            int8_acc, _ = onnx_accuracy(int8_sess, datamodule.iter_numpy("val"))
            drop = (fp32_acc - int8_acc) * 100.0
            fp32_ms, int8_ms = compare_latency_ms(fp32_sess, int8_sess, sample, runs=cfg.latency_runs)
            report.update(
                {
                    "quantize_s": round(time.perf_counter() - t0, 3),
                    "int8_size_bytes": len(int8),
                    "int8_accuracy": int8_acc,
                    "fp32_latency_ms": fp32_ms,  # the interleaved pair replaces the solo figure
                    "int8_latency_ms": int8_ms,
                    "int8_speedup": round(fp32_ms / int8_ms, 3) if int8_ms > 0 else None,
                    "accuracy_drop_points": round(drop, 3),
                    "size_ratio": round(len(int8) / len(fp32), 4),
                }
            )
            quantization, reason = int8_decision(
                drop, fp32_ms, int8_ms, cfg.max_int8_drop_points, require_speedup=cfg.require_int8_speedup
            )
            if quantization == "int8":
                shipped = int8
    # Temperature scaling on the shipped model's logits (cloud/_calibration.py): the confidence a
    # device escalates on means what it says.
    from lepton.cloud._calibration import calibrate

    shipped_sess = int8_sess if quantization == "int8" else fp32_sess
    report["calibration"] = calibrate(shipped_sess, datamodule.iter_numpy("val"))
    report.update(
        {
            "shipped": "int8" if quantization == "int8" else "fp32",
            "shipped_size_bytes": len(shipped),
            "shipped_accuracy": report["int8_accuracy"] if quantization == "int8" else fp32_acc,
            "reason": reason,
        }
    )
    log.info("export: fp32 %d bytes acc %.4f, diff %.2g; %s", len(fp32), fp32_acc, diff, reason)
    return ExportResult(fp32=fp32, int8=int8, shipped=shipped, quantization=quantization, report=report)
