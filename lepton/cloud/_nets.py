"""Built-in networks and the Lightning module that trains them.

The network is chosen by the rank of one sample's tensor (:func:`choose_network` says which and why):

* rank 1 ``(F,)``, a feature vector -> :class:`MLP`;
* rank 2 ``(C, T)``, a sensor window of C channels over T time steps -> :class:`TemporalCNN`:
  1-D convolutions over time and max pooling over the whole window, so a pattern is recognised
  wherever it occurs in the window (an MLP has to learn it again at every offset). Windows shorter
  than 8 steps get the MLP. An image is ``(C, H, W)``: reshape a grayscale ``(H, W)`` to ``[1, H, W]``
  in the pipeline (the presets do);
* rank 3 ``(C, H, W)`` -> :class:`SmallCNN`, from 1x8x8 digits up to 3x224x224 images: stride-2
  convolutions bring large inputs down to about 16x16 first, and adaptive pooling makes the head
  independent of the input size.

Each comes in three sizes, by ``target``: ``tiny`` (a few thousand parameters, for
microcontroller-class devices), ``edge`` (the default: small, quick, quantizes to int8 for devices)
and ``cloud`` (about 4x the parameters of ``edge``: the larger model ``lepton serve`` answers with).

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

__all__ = [
    "MLP",
    "TARGETS",
    "Classifier",
    "SmallCNN",
    "TemporalCNN",
    "build_network",
    "choose_network",
    "load_module_class",
    "make_module",
]

#: Model sizes: ``tiny`` for microcontroller-class devices, ``edge`` for devices (the default),
#: ``cloud`` for the larger model that answers escalated samples.
TARGETS = ("tiny", "edge", "cloud")


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


class TemporalCNN(nn.Module):
    """1-D convolutions over time for ``(C, T)`` sensor windows; global max pooling over time.

    Stride-2 stems bring long windows down to at most 64 steps; each block doubles the channels
    (up to 4x ``width``) and halves the time axis while it is at least 8 long.
    """

    def __init__(
        self,
        *,
        input_shape: tuple[int, ...],
        num_classes: int,
        width: int = 16,
        depth: int = 3,
        hidden: int = 64,
        dropout: float = 0.2,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ConfigError(f"TemporalCNN needs (C, T) inputs, got shape {tuple(input_shape)}")
        c, t = input_shape
        self.input_shape = tuple(input_shape)
        layers: list[nn.Module] = []
        ch = c
        while t > 64:
            layers += [nn.Conv1d(ch, width, 5, stride=2, padding=2, bias=False), nn.BatchNorm1d(width), nn.ReLU()]
            ch, t = width, (t + 1) // 2
        for i in range(depth):
            out = width * 2 ** min(i, 2)
            layers += [nn.Conv1d(ch, out, 5, padding=2, bias=False), nn.BatchNorm1d(out), nn.ReLU()]
            ch = out
            if t >= 8 and i < depth - 1:
                layers.append(nn.MaxPool1d(2))
                t //= 2
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool1d(1),  # where the pattern is does not matter, only whether it is there
            nn.Flatten(),
            nn.Linear(ch, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


#: Per rank and target: the class and its size settings.
_SIZES: dict[str, dict[str, dict[str, int]]] = {
    "MLP": {"tiny": {"hidden": 16}, "edge": {"hidden": 256}, "cloud": {"hidden": 1024}},
    "TemporalCNN": {
        "tiny": {"width": 4, "depth": 2, "hidden": 16},
        "edge": {"width": 16, "depth": 3, "hidden": 64},
        "cloud": {"width": 48, "depth": 4, "hidden": 128},
    },
    "SmallCNN": {
        "tiny": {"width": 4, "hidden": 16},
        "edge": {"width": 32, "hidden": 128},
        "cloud": {"width": 64, "hidden": 256},
    },
}
_CLASSES: dict[str, type[nn.Module]] = {"MLP": MLP, "TemporalCNN": TemporalCNN, "SmallCNN": SmallCNN}


def choose_network(input_shape: tuple[int, ...], *, target: str = "edge") -> tuple[str, dict[str, int], str]:
    """``(class name, size settings, reason)`` of the built-in network for one sample's shape.

    >>> choose_network((3, 128))[0], choose_network((1, 8, 8))[0], choose_network((20,))[0]
    ('TemporalCNN', 'SmallCNN', 'MLP')
    """
    if target not in TARGETS:
        raise ConfigError(f"--target {target!r}: choose one of {', '.join(TARGETS)}")
    shape = tuple(int(d) for d in input_shape)
    rank = len(shape)
    if rank == 3 and min(shape[-2:]) >= 4:
        name, why = "SmallCNN", f"rank-3 input {list(shape)} (channels x height x width): 2-D convolutions"
    elif rank == 2 and shape[1] >= 8:
        name, why = "TemporalCNN", (
            f"rank-2 input {list(shape)} (channels x time): 1-D convolutions over time, max-pooled, "
            "so a pattern counts wherever it occurs"
        )
    else:
        name, why = "MLP", f"rank-{rank} input {list(shape)}: flattened features"
    return name, dict(_SIZES[name][target]), f"{why}; {target} size"


def build_network(input_shape: tuple[int, ...], num_classes: int, *, target: str = "edge") -> nn.Module:
    """The built-in network for one sample's shape and target (see :func:`choose_network`)."""
    name, sizes, _ = choose_network(input_shape, target=target)
    return _CLASSES[name](input_shape=tuple(input_shape), num_classes=num_classes, **sizes)


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
        target: str = "edge",
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.target = target
        self.lr, self.weight_decay = lr, weight_decay
        self.net = net if net is not None else self.build(self.input_shape, num_classes)

    def build(self, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
        return build_network(input_shape, num_classes, target=self.target)

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
    input_shape: tuple[int, ...],
    num_classes: int,
    *,
    module: str | None = None,
    lr: float = 3e-3,
    target: str = "edge",
) -> pl.LightningModule:
    """The module to train: the built-in classifier for ``target``, or ``package.module:Class``."""
    if module is None:
        return Classifier(input_shape=input_shape, num_classes=num_classes, lr=lr, target=target)
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
