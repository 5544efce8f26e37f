"""Publishing a run's output: stage, check, then replace the date partition whole.

The table's layout (``dt=``, ``_SUCCESS``, ``_manifest.json``, ``_quarantine``, ``_staging``) is
defined in :mod:`schemas.output_table`.

Protocol:

1. The job writes every file of the run under ``OUTPUT/_staging/<run_id>/`` (``scores/``,
   ``quarantine/``). Nothing outside OUTPUT is written; readers of ``OUTPUT/dt=*`` never see it.
2. :func:`reconcile` reads back the staged files (footers, then the id columns) and checks that the
   input rows are exactly the scored rows plus the quarantined rows, every id exactly once. Any
   mismatch raises :class:`ReconciliationError` and nothing is published.
3. :func:`publish` replaces the quarantine partition, then the scores partition (whose ``_SUCCESS``
   is the commit point of the run). A partition with no rows still gets one empty Parquet file
   with the fixed schema, so a reader's glob always matches.

Guarantees, honestly stated:

* A run that fails before step 3 (scoring error, failed reconciliation, killed process) leaves
  both published partitions exactly as they were; only its own staging directory may remain.
* **Local filesystem**: the new partition directory is built complete in staging (data files,
  ``_manifest.json``, ``_SUCCESS``), then swapped with the old one by one ``renameat2(RENAME_EXCHANGE)``
  call: any reader opening ``dt=D`` sees the whole old partition or the whole new one. Where the
  kernel or filesystem lacks RENAME_EXCHANGE, two renames are used instead: for a moment the
  partition is absent (never mixed). The scores and quarantine partitions are two swaps, not one.
* **S3** has no rename. The new data files are copied (server side) into the partition under new
  names carrying the run id, then ``_manifest.json`` and ``_SUCCESS`` are overwritten (single PUTs,
  atomic and strongly consistent), then every other file of the partition is deleted. Readers that
  list the files from ``_manifest.json`` always see exactly one complete run (the old manifest's
  files exist until the new manifest replaces it). Readers that glob ``dt=D/*.parquet`` may see
  old and new files together in the window between the copies and the deletes. A process killed
  inside that window leaves extra files that the manifest excludes and the next run removes.
* One writer per partition at a time: two concurrent runs for the same date are not arbitrated.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import posixpath
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.core.likelihoods.base import as_array, plain_type
from pipeline.errors import InputDataError, VaepipeError
from pipeline.io import storage
from schemas.output_table import (
    MANIFEST,
    STAGING,
    SUCCESS,
    partition_uri,
    quarantine_partition_uri,
    staging_uri,
)

log = logging.getLogger("vaepipe.publish")



class ReconciliationError(VaepipeError):
    """The staged output does not account for every input row exactly once (exit code 1)."""


@dataclass(frozen=True)
class Staging:
    """Where one run writes before publishing: OUTPUT/_staging/<run_id>/."""

    output: str
    run_id: str

    @property
    def root(self) -> str:
        return staging_uri(self.output, self.run_id)

    @property
    def scores(self) -> str:
        return storage.join(self.root, "scores")

    @property
    def quarantine(self) -> str:
        return storage.join(self.root, "quarantine")

    def discard(self) -> None:
        """Delete this run's staging directory (never anything else)."""
        try:
            storage.delete_dir(self.root)
            parent = storage.join(self.output, STAGING)
            if not storage.is_s3(parent) and os.path.isdir(parent) and not os.listdir(parent):
                os.rmdir(parent)  # the last run out tidies up (S3 has no empty directories)
        except OSError as e:  # best effort: a leftover staging dir is invisible to readers
            log.warning("could not delete staging directory %s: %s", self.root, e)


# ---- reading back what was staged ------------------------------------------------------------------
@dataclass(frozen=True)
class StagedFile:
    uri: str
    path: str
    rows: int


def staged_files(uri: str) -> list[StagedFile]:
    """Parquet files under `uri` (empty list if none), with their row counts from the footers."""
    loc = storage.locate(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    out = []
    for info in sorted(infos, key=lambda i: i.path):
        if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
            continue
        with loc.fs.open_input_file(info.path) as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        out.append(StagedFile(storage.to_uri(uri, info.path), info.path, rows))
    return out


def read_ids(uri_like: str, paths: list[str], id_columns, types: dict[str, pa.DataType] | None = None) -> pa.Table:
    """The id columns of every file, concatenated (dictionaries decoded, cast to `types`)."""
    fs = storage.filesystem(uri_like)
    tables = []
    for p in paths:
        t = pq.read_table(p, columns=list(id_columns), filesystem=fs)
        cols = []
        for c in id_columns:
            col = as_array(t.column(c))
            if types is not None:
                col = col.cast(types[c])
            cols.append(col)
        tables.append(pa.table(cols, names=list(id_columns)))
    if not tables:
        return pa.table({c: pa.array([], (types or {}).get(c, pa.null())) for c in id_columns})
    return pa.concat_tables(tables)


def input_ids(data, id_columns) -> pa.Table:
    """Read the input's id columns and refuse duplicates (exit code 3): ids must identify records.

    Rows with a null id are kept (they are quarantined, not refused).
    """
    types = {c: plain_type(data.schema.field(c).type) for c in id_columns}
    parts = []
    for f in data.files:
        t = read_ids(data.uri, [f.path], id_columns, types)
        parts.append(t.append_column("__file", pa.array(np.full(t.num_rows, len(parts), dtype=np.int32))))
    ids = pa.concat_tables(parts) if parts else pa.table({})
    dup = _first_duplicate(ids.drop_columns(["__file"]), id_columns)
    if dup is not None:
        value = {c: dup[c] for c in id_columns}
        match = pc.equal(ids.column(id_columns[0]), value[id_columns[0]])
        for c in id_columns[1:]:
            match = pc.and_(match, pc.equal(ids.column(c), value[c]))
        files = sorted({data.files[i].uri for i in ids.filter(match).column("__file").to_pylist()})
        raise InputDataError(
            f"id {value} occurs more than once (the id columns must identify each record); in {', '.join(files)}",
            file=files[0],
            column=",".join(id_columns),
        )
    return ids.drop_columns(["__file"])


def _non_null(ids: pa.Table, id_columns) -> pa.Table:
    mask = None
    for c in id_columns:
        m = pc.is_valid(ids.column(c))
        mask = m if mask is None else pc.and_(mask, m)
    return ids.filter(mask) if mask is not None else ids


def _first_duplicate(ids: pa.Table, id_columns) -> dict | None:
    ids = _non_null(ids, id_columns)
    counts = ids.group_by(list(id_columns)).aggregate([([], "count_all")])
    dups = counts.filter(pc.greater(counts.column("count_all"), 1))
    return dups.slice(0, 1).to_pylist()[0] if dups.num_rows else None


@dataclass
class Reconciliation:
    input_rows: int
    scored_files: list[StagedFile]
    quarantine_files: list[StagedFile]

    @property
    def scored_rows(self) -> int:
        return sum(f.rows for f in self.scored_files)

    @property
    def quarantined_rows(self) -> int:
        return sum(f.rows for f in self.quarantine_files)


def reconcile(staging: Staging, ids_in: pa.Table, id_columns) -> Reconciliation:
    """Check input rows = scored + quarantined, every id exactly once; raise ReconciliationError."""
    scored = staged_files(staging.scores)
    quarantined = staged_files(staging.quarantine)
    rec = Reconciliation(ids_in.num_rows, scored, quarantined)
    if rec.scored_rows + rec.quarantined_rows != rec.input_rows:
        raise ReconciliationError(
            f"row counts do not reconcile: {rec.input_rows} input rows, {rec.scored_rows} scored + "
            f"{rec.quarantined_rows} quarantined = {rec.scored_rows + rec.quarantined_rows}; nothing published"
        )
    types = {c: ids_in.schema.field(c).type for c in id_columns}
    out = pa.concat_tables(
        [
            read_ids(staging.output, [f.path for f in scored], id_columns, types),
            read_ids(staging.output, [f.path for f in quarantined], id_columns, types),
        ]
    )
    keys = [(c, "ascending") for c in id_columns]
    if not ids_in.sort_by(keys).equals(out.sort_by(keys)):
        dup = _first_duplicate(out, id_columns)
        detail = f"id {dup} written more than once" if dup else "the ids written differ from the input ids"
        raise ReconciliationError(f"ids do not reconcile: {detail}; nothing published")
    return rec


# ---- publishing -----------------------------------------------------------------------------------
@dataclass
class Published:
    partition: str
    quarantine_partition: str
    files: list[dict[str, Any]] = field(default_factory=list)  # {"file", "rows"} of the scores table
    quarantine_files: list[dict[str, Any]] = field(default_factory=list)


def final_names(files: list[StagedFile], run_id: str, prefix: str) -> list[str]:
    return [f"{prefix}-{i:05d}-{run_id}.parquet" for i in range(len(files))]


def ensure_one_file(staged_dir: str, files: list[StagedFile], schema: pa.Schema) -> list[StagedFile]:
    """A partition with no rows still holds one (empty) file with the fixed schema."""
    if files:
        return files
    from pipeline.score.scorer import write_table

    uri = storage.join(staged_dir, "empty.parquet")
    write_table(uri, schema.empty_table())
    return [StagedFile(uri, storage.fs_path(uri), 0)]


def publish(
    staging: Staging,
    run_date: str,
    rec: Reconciliation,
    manifest: dict[str, Any],
    scores_schema: pa.Schema,
    quarantine_schema: pa.Schema,
) -> Published:
    """Replace OUTPUT/_quarantine/dt=D, then OUTPUT/dt=D, with the staged files (see module doc)."""
    output = staging.output
    scored = ensure_one_file(staging.scores, rec.scored_files, scores_schema)
    quarantined = ensure_one_file(staging.quarantine, rec.quarantine_files, quarantine_schema)
    part = partition_uri(output, run_date)
    qpart = quarantine_partition_uri(output, run_date)
    pub = Published(part, qpart)
    names = final_names(scored, staging.run_id, "part")
    qnames = final_names(quarantined, staging.run_id, "quarantine")
    pub.files = [{"file": storage.join(part, n), "rows": f.rows} for n, f in zip(names, scored, strict=True)]
    pub.quarantine_files = [
        {"file": storage.join(qpart, n), "rows": f.rows} for n, f in zip(qnames, quarantined, strict=True)
    ]
    manifest = {**manifest, "output_files": pub.files, "quarantine_files": pub.quarantine_files}
    text = json.dumps(manifest, indent=2, default=str)
    swap = _publish_s3 if storage.is_s3(output) else _publish_local
    swap(staging, "quarantine-new", quarantined, qnames, qpart, text)
    swap(staging, "scores-new", scored, names, part, text)
    return pub


def _publish_local(staging: Staging, tag: str, files: list[StagedFile], names: list[str], target: str, text: str):
    new_dir = storage.fs_path(storage.join(staging.root, tag))
    os.makedirs(new_dir)
    for f, name in zip(files, names, strict=True):
        os.rename(f.path, os.path.join(new_dir, name))
    _write_local(os.path.join(new_dir, MANIFEST), text)
    _write_local(os.path.join(new_dir, SUCCESS), json.dumps({"run_id": staging.run_id}) + "\n")
    target = storage.fs_path(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    if not os.path.lexists(target):
        os.rename(new_dir, target)
    elif _rename_exchange(new_dir, target):
        storage.delete_dir(new_dir)  # it now holds the old partition
    else:
        old_dir = storage.fs_path(storage.join(staging.root, tag.replace("-new", "-old")))
        os.rename(target, old_dir)
        os.rename(new_dir, target)
        storage.delete_dir(old_dir)


def _write_local(path: str, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _rename_exchange(a: str, b: str) -> bool:
    """Atomically exchange two paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), f"{a} <-> {b}")


def _publish_s3(staging: Staging, tag: str, files: list[StagedFile], names: list[str], target: str, text: str):
    loc = storage.locate(target)
    keep = set()
    for f, name in zip(files, names, strict=True):
        dest = posixpath.join(loc.path, name)
        loc.fs.copy_file(f.path, dest)
        keep.add(dest)
    storage.write_text(storage.join(target, MANIFEST), text)
    storage.write_text(storage.join(target, SUCCESS), json.dumps({"run_id": staging.run_id}) + "\n")
    keep |= {posixpath.join(loc.path, MANIFEST), posixpath.join(loc.path, SUCCESS)}
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type == pafs.FileType.File and info.path not in keep:
            loc.fs.delete_file(info.path)


def read_manifest(partition: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(partition, MANIFEST)))
