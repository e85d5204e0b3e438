"""lepton train: train on the fleet's dataset, export int8 ONNX, gate, sign and publish."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lepton.cli import _credentials, _exit, _prefix
from lepton.errors import ConfigError

DESCRIPTION = """\
Train a classifier on the labelled samples of one fleet's Parquet dataset (DIR/FLEET/data/*.parquet),
with PyTorch Lightning, in this process. Then:

  1. export ONNX (opset 17, dynamic batch) and check it against PyTorch on a validation batch;
  2. quantize to int8 (static, QDQ, per-channel, calibrated on the dataset); int8 ships only if it
     loses at most --max-int8-drop accuracy points and is faster than fp32 at batch 1 on this machine
     (--allow-slower-int8 drops the speed rule), else fp32 ships and the report says why;
  3. the evaluation gate: score the version deployed to this fleet with ONNX Runtime on the SAME
     validation set; the new version passes if its accuracy >= deployed - --tolerance points;
     a version that cannot be compared (other pipeline or input shape) is refused unless
     --force-incomparable;
  4. store the version in DIR/models/NAME/VERSION/ (model.onnx, manifest.json, report.json);
  5. with --publish (and the gate passed): sign with --key (Ed25519) and publish it as retained MQTT
     messages, the manifest first, then the chunks, then clear the superseded version's chunks.

One model = one preprocessing pipeline, pinned: --pipeline, else the deployed version's pipeline,
else (first version) the one sent by the most devices. Samples of other pipelines are left out and
counted in the report.

Validation: judge the gate on samples devices cannot write. --val-data PATH (a Parquet file or folder
in the dataset schema, e.g. labelled by a person) and/or --trusted-devices ID,ID (the validation side
of their (device, seq) hash split). Without either the gate uses the fleet's own split, and the report
says "validation": {"source": "fleet-split", "trusted": false}: a device sending wrong labels then
skews the yardstick too. No device holds more than --max-device-share of the training set (default
0.34; the rest of its samples is dropped, the same ones every retrain); the report lists per-device
counts used and dropped.

Several processes: --devices N (per node) and --num-nodes N train with DDP (gloo on CPU). Lightning
starts the other local processes with this same command; on every node set MASTER_ADDR, MASTER_PORT
and NODE_RANK (or start it with torchrun). Only global rank zero exports, stores the version and
publishes: one run is one version, whatever the number of processes. The report's
training.world_size says how many trained.

Exit codes: 0 trained (and published, if asked); 5 the gate refused the new version (kept on disk,
not shipped); 2 bad flags or unusable data; 3 broker unreachable or refused; 1 other failure.

examples:
  lepton train --data ./data --fleet demo --model digits --epochs 15
  lepton train --data ./data --fleet demo --model digits --publish \\
      --broker mqtt://trainer@localhost:1883 --password-file trainer.pw --key keys/lepton.key --json
  lepton train --data ./data --fleet demo --model digits --devices 2 --strategy ddp
"""


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, metavar="DIR", help="dataset directory (holds FLEET/data/)")
    parser.add_argument("--fleet", required=True, help="fleet whose samples to train on and publish to")
    parser.add_argument(
        "--model", required=True, metavar="NAME", help="model name (topic PREFIX/FLEET/models/NAME)"
    )
    _prefix.add_prefix_argument(parser)
    parser.add_argument(
        "--epochs", type=int, default=20, help="maximum epochs (early stopping on val accuracy; default 20)"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="batch size (default 64)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 0.003)")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="validation share (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--module",
        metavar="PKG.MOD:CLASS",
        default=None,
        help="your own LightningModule or nn.Module, built as Class(input_shape=, num_classes=)",
    )
    parser.add_argument(
        "--pipeline",
        metavar="HASH",
        default=None,
        help="train on this pipeline hash (default: the deployed version's; for a first version "
        "the one sent by the most devices)",
    )
    parser.add_argument(
        "--pipeline-spec",
        metavar="FILE",
        default=None,
        help="JSON file with the device's preprocessing spec, put into the manifest "
        "(its hash selects the pipeline unless --pipeline is given)",
    )
    parser.add_argument(
        "--val-data",
        metavar="PATH",
        default=None,
        help="trusted validation set: a Parquet file or folder in the dataset schema (docs/dataset.md)",
    )
    parser.add_argument(
        "--trusted-devices",
        metavar="ID,ID",
        default=None,
        help="only these devices' validation-side samples form the validation set",
    )
    parser.add_argument(
        "--max-device-share",
        type=float,
        default=0.34,
        metavar="FRACTION",
        help="cap each device's share of the training set (default 0.34; 1 turns the cap off)",
    )
    parser.add_argument(
        "--force-incomparable",
        action="store_true",
        help="ship a version the gate cannot compare with the deployed one (other pipeline/shape)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="gate: accept new accuracy >= deployed - POINTS percentage points (default 1.0)",
    )
    parser.add_argument(
        "--max-int8-drop",
        type=float,
        default=1.0,
        metavar="POINTS",
        help="ship int8 only if it loses at most POINTS accuracy points vs fp32 (default 1.0)",
    )
    parser.add_argument(
        "--labels",
        default="human,device,teacher",
        metavar="SOURCES",
        help="label sources to train on, in precedence order (default human,device,teacher): human = "
        "imported with `lepton dataset label`, device = sent with the sample, teacher = the cloud "
        "model's answers recorded by `lepton serve --data`",
    )
    parser.add_argument(
        "--min-teacher-confidence",
        type=float,
        default=0.9,
        metavar="C",
        help="ignore teacher labels whose confidence is below C (default 0.9)",
    )
    parser.add_argument(
        "--target",
        choices=("tiny", "edge", "cloud"),
        default="edge",
        help="size of the built-in network: tiny (microcontroller-class), edge (small, int8, for devices; "
        "default) or cloud (about 4x edge, the model `lepton serve` answers escalated samples with)",
    )
    parser.add_argument(
        "--allow-slower-int8",
        action="store_true",
        help="ship int8 on accuracy alone, even where it is not faster than fp32 at batch 1 (size over speed)",
    )
    parser.add_argument("--no-quantize", action="store_true", help="ship the fp32 model, skip int8")
    parser.add_argument(
        "--devices", type=int, default=1, metavar="N", help="training processes per node (default 1)"
    )
    parser.add_argument(
        "--num-nodes", type=int, default=1, metavar="N", help="machines training together (default 1)"
    )
    parser.add_argument(
        "--strategy",
        choices=["auto", "ddp"],
        default="auto",
        help="auto: one process, or DDP when --devices/--num-nodes ask for several (default auto)",
    )
    parser.add_argument(
        "--accelerator",
        choices=["cpu", "gpu", "auto"],
        default="cpu",
        help="what each process trains on (default cpu)",
    )
    parser.add_argument("--publish", action="store_true", help="publish the new version if the gate passes")
    _credentials.add_broker_arguments(parser, help="with --publish: broker URL mqtt://USER@HOST:PORT")
    parser.add_argument(
        "--key",
        metavar="FILE",
        default=None,
        help="Ed25519 private key (PEM) that signs the manifest; see `lepton keys generate`",
    )
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="bytes per retained chunk message (default 98304, under AWS IoT's 128 KB)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the full report as one JSON object on stdout"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output on stderr")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from lepton.protocol import DEFAULT_CHUNK_SIZE, pipeline_hash

    prefix = _prefix.resolve_prefix(args)
    data = Path(args.data)
    if not data.is_dir():
        raise ConfigError(
            f"--data {data} is not a directory; point it at the ingest worker's dataset directory"
        )
    spec = None
    pipeline = args.pipeline
    if args.pipeline_spec:
        try:
            spec = json.loads(Path(args.pipeline_spec).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--pipeline-spec {args.pipeline_spec}: cannot read JSON ({exc})") from None
        pipeline = pipeline or pipeline_hash(spec)
    if args.key and not Path(args.key).is_file():
        raise ConfigError(f"--key {args.key} not found; create a key pair with `lepton keys generate`")
    trusted: tuple[str, ...] = ()
    if args.trusted_devices is not None:
        trusted = tuple(d.strip() for d in args.trusted_devices.split(",") if d.strip())
        if not trusted:
            raise ConfigError(
                "--trusted-devices is empty; give device ids separated by commas, e.g. cam-1,cam-2"
            )

    # Only a publishing run needs (and reads) broker credentials; the worker's child gets them in env.
    broker = _credentials.broker_url(args, "train", needed_for=" with --publish") if args.publish else None

    import pytorch_lightning as pl

    from lepton.cloud._export import ExportConfig
    from lepton.cloud._labels import parse_label_sources
    from lepton.cloud._training import TrainConfig, train

    config = TrainConfig(
        data=data,
        fleet=args.fleet,
        prefix=prefix,
        model=args.model,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        val_fraction=args.val_fraction,
        seed=args.seed,
        module=args.module,
        target=args.target,
        label_sources=parse_label_sources(args.labels),
        min_teacher_confidence=args.min_teacher_confidence,
        pipeline=pipeline,
        pipeline_spec=spec,
        val_data=Path(args.val_data) if args.val_data else None,
        trusted_devices=trusted,
        max_device_share=args.max_device_share,
        force_incomparable=args.force_incomparable,
        tolerance_points=args.tolerance,
        export=ExportConfig(
            quantize=not args.no_quantize,
            max_int8_drop_points=args.max_int8_drop,
            require_int8_speedup=not args.allow_slower_int8,
        ),
        publish=args.publish,
        broker=broker,
        key=Path(args.key) if args.key else None,
        chunk_size=args.chunk_size or DEFAULT_CHUNK_SIZE,
        progress=not args.quiet and sys.stderr.isatty(),
        devices=args.devices,
        num_nodes=args.num_nodes,
        strategy=args.strategy,
        accelerator=args.accelerator,
    )

    class EpochLine(pl.Callback):
        """One line per epoch on stderr when there is no terminal for a progress bar (worker logs)."""

        def on_validation_end(self, trainer, pl_module):  # noqa: ANN001
            if trainer.sanity_checking or not trainer.is_global_zero:
                return
            acc = trainer.callback_metrics.get("val_acc")
            acc_text = f" val_acc {float(acc):.4f}" if acc is not None else ""
            print(
                f"lepton train: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}{acc_text}",
                file=sys.stderr,
                flush=True,
            )

    callbacks: list[pl.Callback] = [] if args.quiet or config.progress else [EpochLine()]
    result = train(config, callbacks=callbacks)
    if not result.is_global_zero:
        # Another DDP rank: rank zero prints the one report; the exit code is the same everywhere.
        return _exit.GATE_REFUSED if result.status == "refused" else _exit.OK
    report = result.report
    validation = report.get("validation", {})
    if not validation.get("trusted"):
        print(f"lepton train: warning: {validation.get('warning')}", file=sys.stderr)
    if args.json:
        print(json.dumps(report, sort_keys=True, default=str))
    else:
        print(_summary(report))
    return _exit.GATE_REFUSED if result.status == "refused" else _exit.OK


def _labels(r: dict) -> str:
    lab = r.get("labels") or {}
    rows = ", ".join(f"{k} {v}" for k, v in (lab.get("rows") or {}).items())
    ignored = ", ".join(f"{k} {v}" for k, v in (lab.get("ignored") or {}).items()) or "none"
    return f"{'>'.join(lab.get('precedence', []))}: {rows}; late labels ignored: {ignored}"


def _calibration(e: dict) -> str:
    c = e.get("calibration") or {}
    if not c.get("samples"):
        return "none (no validation samples)"
    return (f"temperature {c['temperature']:.3f} on {c['samples']} validation samples; ECE "
            f"{c['ece_raw']:.4f} raw -> {c.get('ece_calibrated')} calibrated (cross-fitted)")


def _arch(r: dict) -> str:
    a = r.get("training", {}).get("architecture") or {}
    return f"{a.get('class')} ({a.get('target')}, {a.get('parameters')} parameters): {a.get('reason')}"


def _summary(r: dict) -> str:
    e, g, d = r["export"], r["gate"], r["data"]
    v, dev = r.get("validation", {}), r.get("devices", {})
    size = e["shipped_size_bytes"]
    ratio = size / e["fp32_size_bytes"] if e.get("fp32_size_bytes") else 1.0
    int8 = (
        f"int8 {e['int8_accuracy']:.4f}, {e.get('int8_latency_ms', 0):.3f} ms"
        if "int8_accuracy" in e
        else "int8 n/a"
    )
    lines = [
        f"{r['model']} v{r['version']}: {r['status']}",
        f"  data        {d['train_samples']} train / {d['val_samples']} val, pipeline {d['pipeline']}, "
        f"shape {d['shape']}, {len(d['labels'])} classes; left out: {d['other_pipelines']} other pipelines, "
        f"{d['other_shapes']} other shapes, {d['unlabelled']} unlabelled",
        f"  pipeline    {d['pipeline']} (pinned by {d.get('pipeline_pinned_by', '?')})",
        (
            f"  validation  {v.get('source')}, {v.get('samples')} samples, trusted"
            if v.get("trusted")
            else f"  validation  {v.get('source')}, {v.get('samples')} samples -- {v.get('warning')}"
        ),
        f"  labels      {_labels(r)}",
        f"  devices     {len(dev.get('per_device', {}))}, max share {dev.get('effective_share')}, "
        f"{dev.get('dropped', 0)} training samples dropped by the cap",
        f"  network     {_arch(r)}",
        f"  accuracy    fp32 {e['fp32_accuracy']:.4f} ({e['fp32_latency_ms']:.3f} ms), {int8}",
        f"  shipped     {e['shipped']}, {size} bytes = {ratio:.2f}x fp32 ({e['reason']})",
        f"  calibration {_calibration(e)}",
        f"  export      max |onnx - torch| = {e['max_abs_diff']:.2g}",
        f"  gate        {'passed' if g['passed'] else 'REFUSED'}: {g['reason']}",
    ]
    if r.get("publication"):
        p = r["publication"]
        lines.append(
            f"  published   fleet {p['fleet']}, {p['chunks']} chunks, signed={p['signed']}, "
            f"cleared {p['cleared'] or 'nothing'}"
        )
    seconds = r.get("training", {}).get("time_s", "?")
    world = r.get("training", {}).get("world_size", 1)
    on = f" on {world} DDP processes" if world > 1 else ""
    lines.append(f"  stored      models/{r['model']}/{r['version']}/ after {seconds} s of training{on}")
    return "\n".join(lines)
