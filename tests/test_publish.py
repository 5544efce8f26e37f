"""Publishing without Ray: staging, reconciliation and the partition swap, on local disk and on moto's S3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.io import storage
from pipeline.score import publish
from pipeline.score.publish import write_table

SCHEMA = pa.schema([pa.field("record_id", pa.int64(), nullable=False), ("x", pa.float64())])
QSCHEMA = pa.schema([("record_id", pa.int64()), ("reason", pa.string()), ("column", pa.string())])


def rows(ids) -> pa.Table:
    ids = np.asarray(ids, dtype=np.int64)
    return pa.table({"record_id": ids, "x": ids * 0.5}, schema=SCHEMA)


def stage(output: str, run_id: str, shards: list[list[int]], quarantined: list[int | None] = ()) -> publish.Staging:
    st = publish.Staging(output, run_id)
    for i, ids in enumerate(shards):
        write_table(storage.join(st.scores, f"s{i}.parquet"), rows(ids))
    if quarantined:
        q = pa.table(
            {"record_id": quarantined, "reason": ["bad"] * len(quarantined), "column": ["x"] * len(quarantined)},
            schema=QSCHEMA,
        )
        write_table(storage.join(st.quarantine, "q.parquet"), q)
    return st


def ids_table(ids) -> pa.Table:
    return pa.table({"record_id": pa.array(ids, pa.int64())})


def run(output: str, run_id: str, shards, quarantined=(), date="2026-02-01") -> publish.Published:
    st = stage(output, run_id, shards, list(quarantined))
    all_ids = [i for s in shards for i in s] + list(quarantined)
    rec = publish.reconcile(st, ids_table(all_ids), ["record_id"])
    pub = publish.publish(st, date, rec, {"run_id": run_id}, SCHEMA, QSCHEMA)
    st.discard()
    return pub


def read_dir(fs: pafs.FileSystem, path: str) -> tuple[list[str], pa.Table | None]:
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    names = sorted(os.path.basename(i.path) for i in infos if i.type == pafs.FileType.File)
    files = sorted(i.path for i in infos if i.path.endswith(".parquet"))
    table = pa.concat_tables([pq.read_table(f, filesystem=fs) for f in files]) if files else None
    return names, table


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_local_publish_replaces_partition_whole(tmp_path, monkeypatch, exchange):
    if not exchange:
        monkeypatch.setattr(publish, "_rename_exchange", lambda a, b: False)
    out = str(tmp_path / "out")
    fs = pafs.LocalFileSystem()
    run(out, "run1", [[1, 2, 3], [4, 5]], quarantined=[6])
    names, t = read_dir(fs, f"{out}/dt=2026-02-01")
    assert names == ["_SUCCESS", "_manifest.json", "part-00000-run1.parquet", "part-00001-run1.parquet"]
    assert sorted(t.column("record_id").to_pylist()) == [1, 2, 3, 4, 5]
    qnames, q = read_dir(fs, f"{out}/_quarantine/dt=2026-02-01")
    assert q.column("record_id").to_pylist() == [6] and "quarantine-00000-run1.parquet" in qnames

    pub = run(out, "run2", [[1, 2, 3, 4, 5, 6]])  # no quarantined rows this time
    names, t = read_dir(fs, f"{out}/dt=2026-02-01")
    assert names == ["_SUCCESS", "_manifest.json", "part-00000-run2.parquet"]
    assert sorted(t.column("record_id").to_pylist()) == [1, 2, 3, 4, 5, 6]
    manifest = json.loads(Path(out, "dt=2026-02-01", "_manifest.json").read_text())
    assert manifest["run_id"] == "run2" and manifest["output_files"] == pub.files
    assert json.loads(Path(out, "dt=2026-02-01", "_SUCCESS").read_text()) == {"run_id": "run2"}
    # the quarantine partition is replaced too: an empty file with the fixed schema
    qnames, q = read_dir(fs, f"{out}/_quarantine/dt=2026-02-01")
    assert q.num_rows == 0 and q.schema.names == QSCHEMA.names
    assert "quarantine-00000-run2.parquet" in qnames
    assert sorted(os.listdir(out)) == ["_quarantine", "dt=2026-02-01"]  # staging cleaned up


def test_rename_exchange_swaps_two_directories(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "f").write_text("A")
    (b / "f").write_text("B")
    if not publish._rename_exchange(str(a), str(b)):
        pytest.skip("RENAME_EXCHANGE not supported here")
    assert (a / "f").read_text() == "B" and (b / "f").read_text() == "A"


@pytest.mark.parametrize(
    "shards,quarantined,message",
    [
        ([[1, 2, 3]], [], "row counts do not reconcile"),  # row 4 lost
        ([[1, 2, 3], [3]], [], "written more than once"),  # 4 lost, 3 twice: counts agree, ids do not
        ([[1, 2, 3, 5]], [], "differ from the input ids"),
        ([[1, 2]], [3, 4, 4], "row counts do not reconcile"),
    ],
)
def test_reconcile_refuses_lost_or_duplicated_rows(tmp_path, shards, quarantined, message):
    st = stage(str(tmp_path / "out"), "r", shards, quarantined)
    with pytest.raises(publish.ReconciliationError, match=message):
        publish.reconcile(st, ids_table([1, 2, 3, 4]), ["record_id"])


def test_reconcile_accepts_null_ids_in_quarantine(tmp_path):
    st = stage(str(tmp_path / "out"), "r", [[1, 2]], [None, 3, None])
    rec = publish.reconcile(st, ids_table([None, 1, 2, 3, None]), ["record_id"])
    assert (rec.scored_rows, rec.quarantined_rows) == (2, 3)


def test_s3_publish_replaces_partition_and_removes_leftovers(s3):
    fs = storage.filesystem("s3://vaepipe-test")
    out = "s3://vaepipe-test/publish/out"
    part = "vaepipe-test/publish/out/dt=2026-02-01"
    run(out, "run1", [[1, 2], [3]], quarantined=[4])
    names, t = read_dir(fs, part)
    assert names == ["_SUCCESS", "_manifest.json", "part-00000-run1.parquet", "part-00001-run1.parquet"]
    # a file left by a run killed between its copies and its deletes is not in any manifest
    with fs.open_output_stream(f"{part}/part-00007-crashed.parquet") as f:
        f.write(b"junk")
    pub = run(out, "run2", [[1, 2, 3, 4]])
    names, t = read_dir(fs, part)
    assert names == ["_SUCCESS", "_manifest.json", "part-00000-run2.parquet"]
    assert sorted(t.column("record_id").to_pylist()) == [1, 2, 3, 4]
    manifest = publish.read_manifest(f"s3://{part}")
    assert manifest["output_files"] == pub.files == [{"file": f"s3://{part}/part-00000-run2.parquet", "rows": 4}]
    qnames, q = read_dir(fs, "vaepipe-test/publish/out/_quarantine/dt=2026-02-01")
    assert q.num_rows == 0 and qnames == ["_SUCCESS", "_manifest.json", "quarantine-00000-run2.parquet"]
    staged = fs.get_file_info(pafs.FileSelector("vaepipe-test/publish/out/_staging", recursive=True,
                                                allow_not_found=True))  # fmt: skip
    assert [i.path for i in staged if i.type == pafs.FileType.File] == []
