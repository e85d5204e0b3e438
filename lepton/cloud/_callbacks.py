"""Lightning callbacks every ``train()`` run uses, and the rank-zero rule they share.

:func:`on_global_zero` runs a piece of work (export, registry writes, publishing) on global rank zero only
and broadcasts its outcome, so under DDP exactly one rank writes and every rank agrees on what happened.
Each callback's state is written by the training loop's thread only (Lightning calls hooks from it).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any, TypeVar

import pytorch_lightning as pl
import torch

from lepton.cloud._export import ExportConfig, ExportResult, export_and_compress
from lepton.errors import RankZeroFailed

__all__ = ["BestWeights", "ExportCallback", "on_global_zero"]

_T = TypeVar("_T")


def on_global_zero(
    trainer: pl.Trainer, what: str, work: Callable[[], _T], *, share: bool = True
) -> _T | None:
    """Run ``work`` on global rank zero only, then broadcast its outcome so every rank agrees.

    Returns ``work()``'s value on every rank (None on the other ranks when not ``share``: an ONNX
    model need not travel). When ``work`` raises on rank zero, rank zero re-raises it and every other
    rank raises :class:`~lepton.errors.RankZeroFailed` naming it: no rank is left waiting in a
    collective that rank zero never reaches. Every rank must call it, in the same order (a
    callback hook does).
    """
    value: _T | None = None
    error: Exception | None = None
    if trainer.is_global_zero:
        try:
            value = work()
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks are told
            error = exc
    if trainer.world_size > 1:
        message = None if error is None else f"{type(error).__name__}: {error}"
        shared, message = trainer.strategy.broadcast((value if share else None, message), src=0)
        if not trainer.is_global_zero:
            if message is not None:
                raise RankZeroFailed(what, message, rank=trainer.global_rank)
            value = shared
    if error is not None:
        raise error
    return value


# ------------------------------------------------------------------------------------------------
# callbacks
# ------------------------------------------------------------------------------------------------
class BestWeights(pl.Callback):
    """Keep the weights of the best validation epoch and load them back when fitting ends."""

    def __init__(self, monitor: str = "val_acc") -> None:
        self.monitor = monitor
        self.best: float | None = None
        self.best_epoch: int | None = None
        self._state: dict[str, Any] | None = None

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        metric = trainer.callback_metrics.get(self.monitor)
        if metric is None:
            return
        # Every rank must restore the same epoch: reduce the value (a no-op when the module logged it
        # with sync_dist=True, and the fix for a --module that did not).
        value = float(trainer.strategy.reduce(torch.as_tensor(float(metric)), reduce_op="mean"))
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            self._state = copy.deepcopy(pl_module.state_dict())

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._state is not None:
            pl_module.load_state_dict(self._state)


class ExportCallback(pl.Callback):
    """Export to ONNX, verify, quantize; the result is in ``.result`` after fitting.

    Runs on global rank zero only (``.result`` stays None on the other ranks); every rank learns
    whether it succeeded.
    """

    def __init__(self, config: ExportConfig) -> None:
        self.config = config
        self.result: ExportResult | None = None
        self.seconds = 0.0

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        started = time.perf_counter()

        def export() -> None:
            # Lightning sets Trainer.datamodule in fit() without declaring it on the class
            datamodule = trainer.datamodule  # type: ignore[attr-defined]
            self.result = export_and_compress(pl_module, datamodule, self.config)

        try:
            on_global_zero(trainer, "ONNX export", export, share=False)
        finally:
            self.seconds = time.perf_counter() - started
