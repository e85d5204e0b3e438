"""Built-in networks and the Lightning module that trains them.

The network is chosen by the rank of one sample's tensor:

* rank 1 ``(F,)`` -> :class:`MLP`;
* rank 2 ``(H, W)`` -> :class:`SmallCNN` with one channel;
* rank 3 ``(C, H, W)`` -> :class:`SmallCNN`, from 1x8x8 digits up to 3x224x224 images: stride-2
  convolutions bring large inputs down to about 16x16 first, and adaptive pooling makes the head
  independent of the input size.

A user's own model is ``--module package.module:Class``: either a ``LightningModule`` (used as is;
subclass :class:`Classifier` to inherit the training loop) or a plain ``torch.nn.Module`` producing
logits (wrapped in :class:`Classifier`). Both are built as ``Class(input_shape=..., num_classes=...)``.
"""

from __future__ import annotations

import importlib
import math

import pytorch_lightning as pl
import torch
from torch import nn

from lepton.errors import ConfigError

__all__ = ["MLP", "Classifier", "SmallCNN", "build_network", "load_module_class", "make_module"]


def _conv(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]


class SmallCNN(nn.Module):
    """A compact CNN for ``(C, H, W)`` (or ``(H, W)``) inputs of any size from 8x8 upwards."""

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 32,
        hidden: int = 128,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(input_shape) == 2:
            input_shape = (1, *input_shape)
        if len(input_shape) != 3:
            raise ConfigError(f"SmallCNN needs (C, H, W) or (H, W) inputs, got shape {tuple(input_shape)}")
        c, h, w = input_shape
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        ch = c
        # Stem: bring large images down to <= 16 pixels on the short side with cheap stride-2 convs.
        while min(h, w) > 16:
            layers += _conv(ch, width, stride=2)
            ch, h, w = width, (h + 1) // 2, (w + 1) // 2
        layers += _conv(ch, width) + _conv(width, 2 * width)
        if min(h, w) >= 4:
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        layers += _conv(2 * width, 4 * width)
        # 2x2 adaptive pooling keeps coarse layout (it matters for 8x8 digits); 1x1 when the map
        # does not divide evenly, which the ONNX exporter needs for a static pooling kernel.
        pool = 2 if h % 2 == 0 and w % 2 == 0 else 1
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(pool),
            nn.Flatten(),
            nn.Linear(4 * width * pool * pool, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return self.head(self.features(x))


class MLP(nn.Module):
    """Two hidden layers for 1-D feature vectors (any rank is flattened)."""

    def __init__(
        self, *, input_shape: tuple[int, ...], num_classes: int, hidden: int = 256, dropout: float = 0.2
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(math.prod(input_shape), hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, hidden // 2),
            nn.ReLU(),
            nn.Linear(hidden // 2, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build_network(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The built-in network for one sample's shape: MLP for rank 1, CNN for rank 2 and 3."""
    rank = len(input_shape)
    if rank in (2, 3) and min(input_shape[-2:]) >= 4:
        return SmallCNN(input_shape=input_shape, num_classes=num_classes)
    return MLP(input_shape=input_shape, num_classes=num_classes)


class Classifier(pl.LightningModule):
    """Cross-entropy training of a network that maps ``x`` to logits; logs ``val_acc``, synced across ranks.

    Subclass it for ``--module`` and override :meth:`build` to supply your own network.
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        lr: float = 3e-3,
        weight_decay: float = 1e-4,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.lr, self.weight_decay = lr, weight_decay
        self.net = net if net is not None else self.build(self.input_shape, num_classes)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return build_network(input_shape, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def validation_step(self, batch, batch_idx):  # noqa: ANN001
        x, y = batch
        logits = self(x)
        # sync_dist: under DDP each rank validates a shard; the epoch-level value that picks the best
        # weights and stops early must be the same on every rank (a no-op in one process).
        loss = nn.functional.cross_entropy(logits, y)
        self.log("val_loss", loss, prog_bar=False, batch_size=len(y), sync_dist=True)
        acc = (logits.argmax(1) == y).float().mean()
        self.log("val_acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        trainer = self.trainer
        if trainer is None or not trainer.max_epochs or trainer.max_epochs < 0:
            return opt
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=trainer.max_epochs)
        return {"optimizer": opt, "lr_scheduler": sched}


def load_module_class(spec: str) -> type:
    """Import ``package.module:Class``; raise ConfigError naming the fix."""
    if spec.count(":") != 1:
        raise ConfigError(f"--module {spec!r}: write it as package.module:Class")
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"--module {spec!r}: cannot import {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise ConfigError(f"--module {spec!r}: {module_name} has no class {attr!r}")
    if not issubclass(cls, nn.Module):
        raise ConfigError(f"--module {spec!r}: {attr} must be a LightningModule or torch.nn.Module")
    return cls


def make_module(
    input_shape: tuple[int, ...], num_classes: int, *, module: str | None = None, lr: float = 3e-3
) -> pl.LightningModule:
    """The module to train: the built-in classifier, or ``package.module:Class``."""
    if module is None:
        return Classifier(input_shape=input_shape, num_classes=num_classes, lr=lr)
    cls = load_module_class(module)
    try:
        obj = cls(input_shape=tuple(input_shape), num_classes=num_classes)
    except TypeError as exc:
        raise ConfigError(
            f"--module {module!r}: the class must accept input_shape= and num_classes= "
            f"keyword arguments ({exc})"
        ) from None
    if isinstance(obj, pl.LightningModule):
        return obj
    return Classifier(input_shape=input_shape, num_classes=num_classes, lr=lr, net=obj)
