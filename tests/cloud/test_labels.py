"""Label provenance: late human/teacher labels kept beside the data, precedence, the CSV import."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from lepton.cloud._labels import LabelResolver, LabelRow, LabelStore, parse_label_sources, read_label_csv
from lepton.errors import ConfigError

from .conftest import write_dataset


# -- the resolver (no I/O) -------------------------------------------------------------------------
def test_precedence_is_the_order_given_and_newest_wins_within_a_source():
    r = LabelResolver(("human", "device", "teacher"), min_teacher_confidence=0.8)
    r.add(LabelRow("d", 1, "t1", "teacher", confidence=0.85, ts=1))
    r.add(LabelRow("d", 2, "h-old", "human", ts=1))
    r.add(LabelRow("d", 2, "h-new", "human", ts=2))
    r.add(LabelRow("d", 2, "h-older", "human", ts=0.5))  # arrives later but is older: loses

    assert r.resolve("d", 1, None) == ("t1", "teacher")
    assert r.resolve("d", 1, "dev") == ("dev", "device")
    assert r.resolve("d", 2, "dev") == ("h-new", "human")
    assert r.resolve("d", 3, None) == (None, None)

    teacher_first = LabelResolver(("teacher", "device"), min_teacher_confidence=0.8)
    teacher_first.add(LabelRow("d", 1, "t1", "teacher", confidence=0.85))
    teacher_first.add(LabelRow("d", 1, "h", "human"))  # human is not among the sources
    assert teacher_first.resolve("d", 1, "dev") == ("t1", "teacher")
    assert teacher_first.ignored["human_not_used"] == 1


def test_teacher_labels_below_the_floor_and_device_labels_left_out_are_not_used():
    r = LabelResolver(("human", "teacher"), min_teacher_confidence=0.9)
    r.add(LabelRow("d", 1, "t", "teacher", confidence=0.89))
    r.add(LabelRow("d", 2, "t", "teacher", confidence=None))

    assert r.resolve("d", 1, "dev") == (None, None)  # device labels are not a source here
    assert r.resolve("d", 2, None) == (None, None)
    assert r.ignored["teacher_below_confidence"] == 2


@pytest.mark.parametrize("text", ["", "human,robot", "human,human", "device,Teacher"])
def test_bad_label_sources_name_the_choices(text):
    with pytest.raises(ConfigError, match="human, device, teacher"):
        parse_label_sources(text)


def test_the_csv_reader_reports_bad_rows_without_failing(tmp_path):
    f = tmp_path / "l.csv"
    f.write_text("device,seq,label\ncam-1,3,cat\nbad id,4,dog\ncam-1,x,dog\ncam-1,5,\ncam-1,-1,z\ncam-2,9, fox \n")

    rows, problems = read_label_csv(f)

    assert rows == [("cam-1", 3, "cat"), ("cam-2", 9, "fox")]
    assert len(problems) == 4 and problems[0].startswith("line 3:")
    with pytest.raises(ConfigError, match="header device,seq,label"):
        (tmp_path / "h.csv").write_text("a,b\n1,2\n")
        read_label_csv(tmp_path / "h.csv")


# -- the store and the trainer -----------------------------------------------------------------------
def test_late_labels_are_stored_atomically_and_read_back(tmp_path):
    store = LabelStore(tmp_path, "f1")
    assert store.append([]) is None
    path = store.append([LabelRow("cam-1", 3, "cat", "teacher", confidence=0.97, model_version=4, ts=5.0)])

    assert path.parent == tmp_path / "f1" / "labels" and not list(path.parent.glob(".*"))
    (row,) = store.rows()
    assert row == LabelRow("cam-1", 3, "cat", "teacher", confidence=0.97, model_version=4, ts=5.0)
    with pytest.raises(ValueError, match="late labels are human or teacher"):
        store.append([LabelRow("cam-1", 3, "cat", "device")])


def _lepton(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "lepton", *args], capture_output=True, text=True, timeout=timeout)


def test_import_csv_then_train_on_human_labels_only(tmp_path, digits_arrays):
    """An unlabelled fleet: people label part of it with a CSV, and training uses those labels alone."""
    x, y = digits_arrays
    n = 900
    root = write_dataset(tmp_path / "data", "f1", x[:n], [None] * n, devices=3)
    csv_file = tmp_path / "reviewed.csv"
    lines = ["device,seq,label"] + [f"dev-{i % 3},{i // 3},{y[i]}" for i in range(n)]
    lines += ["dev-9,1,3", "dev-0,99999,4", "dev-0,1,"]  # an unknown device, an unknown seq, a bad row
    csv_file.write_text("\n".join(lines) + "\n")

    imp = _lepton("dataset", "label", str(root), "--fleet", "f1", "--csv", str(csv_file), "--json")

    assert imp.returncode == 1, imp.stderr  # some rows were left out, and the report says which
    report = json.loads(imp.stdout)
    assert report["imported"] == n and report["unknown"] == 2 and report["bad_rows"] == 1
    assert set(report["unknown_examples"]) == {"dev-9/1", "dev-0/99999"}

    train = _lepton("train", "--data", str(root), "--fleet", "f1", "--model", "m", "--epochs", "3",
                    "--no-quantize", "--json")
    assert train.returncode == 0, train.stderr[-2000:]
    r = json.loads(train.stdout)
    assert r["labels"]["rows"] == {"human": n, "device": 0, "teacher": 0}
    assert r["data"]["train_samples"] + r["data"]["val_samples"] == n
    assert r["export"]["fp32_accuracy"] > 0.8  # the human labels are the digits' true labels

    only_device = _lepton("train", "--data", str(root), "--fleet", "f1", "--model", "m2", "--labels", "device")
    assert only_device.returncode == 2
    assert "no labelled samples" in only_device.stderr and "lepton dataset label" in only_device.stderr


def test_import_of_an_unknown_fleet_or_missing_csv_exits_2(tmp_path, digits_arrays):
    x, y = digits_arrays
    root = write_dataset(tmp_path / "data", "f1", x[:30], list(y[:30]))

    missing = _lepton("dataset", "label", str(root), "--fleet", "f1", "--csv", str(tmp_path / "nope.csv"))
    other = _lepton("dataset", "label", str(root), "--fleet", "f2", "--csv", str(tmp_path / "nope.csv"))

    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert other.returncode == 2 and "no dataset of fleet 'f2'" in other.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


def test_the_documented_duckdb_and_pandas_joins_give_the_trainers_labels(tmp_path):
    """docs/dataset.md's SQL and pandas snippets, run as written, agree with LabelResolver."""
    import re
    from pathlib import Path

    import duckdb
    import pandas as pd

    x = np.zeros((6, 2), np.float32)
    root = write_dataset(tmp_path / "data", "fleet", x, ["d0", None, "d2", None, "d4", "d5"], devices=1)
    store = LabelStore(root, "fleet")
    store.append([LabelRow("dev-0", 0, "h0-old", "human", ts=1), LabelRow("dev-0", 1, "t1", "teacher",
                  confidence=0.95, ts=1), LabelRow("dev-0", 3, "t3-low", "teacher", confidence=0.5, ts=1)])
    store.append([LabelRow("dev-0", 0, "h0", "human", ts=2), LabelRow("dev-0", 2, "t2", "teacher",
                  confidence=0.99, ts=2)])
    resolver = store.resolver()
    expected = {("dev-0", i): resolver.resolve("dev-0", i, lab) for i, lab in
                enumerate(["d0", None, "d2", None, "d4", "d5"])}

    doc = (Path(__file__).parents[2] / "docs" / "dataset.md").read_text()
    section = doc[doc.index("## Late labels"):doc.index("## Stats")]
    sql = re.search(r"```sql\n(.*?)```", section, re.S).group(1).replace("DIR/fleet", f"{root}/fleet")
    got = {(r[0], r[1]): (r[2], r[3]) for r in duckdb.sql(sql).fetchall()}
    assert got == expected

    code = re.search(r"```python\n(.*?)```", section, re.S).group(1).replace("DIR/fleet", f"{root}/fleet")
    scope = {"pd": pd}
    exec(code, scope)  # noqa: S102 - the documentation's own snippet
    data = scope["data"]
    labels = {k: (None if pd.isna(v) else v) for k, v in data["label"].items()}
    assert labels == {k: lab for k, (lab, _) in expected.items()}
