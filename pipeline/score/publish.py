"""Publishing a run's output: stage, check, then replace the date partition whole.

The table's layout (``dt=``, ``_SUCCESS``, ``_manifest.json``, ``_quarantine``, ``_staging``) is
defined in :mod:`schemas.output_table`.

Protocol:

1. The job writes every file of the run under ``OUTPUT/_staging/<run_id>/`` (``scores/``,
   ``quarantine/``). Nothing outside OUTPUT is written; readers of ``OUTPUT/dt=*`` never see it.
2. :func:`reconcile` reads back the staged files (footers, then the id columns) and checks that the
   input rows are exactly the scored rows plus the quarantined rows, every id exactly once. Any
   mismatch raises :class:`ReconciliationError` and nothing is published.
3. :func:`publish` makes both new partitions ready, writes a journal naming the two swaps
   (``OUTPUT/_staging/<run_id>/_publish.json``), then replaces the quarantine partition, then the
   scores partition, then deletes the journal. A partition with no rows still gets one empty
   Parquet file with the fixed schema, so a reader's glob always matches.

Ownership: a run writes only into a table that carries ``_vaepipe_table.json`` (or is empty), and
replaces a partition only if it holds a vaepipe manifest (:func:`check_table`,
:func:`check_partition_ours`). One run per partition at a time (:func:`partition_lease`). Holding
the lease, a run first calls :func:`recover`: the staging of killed runs of its date is deleted,
and a publish whose journal exists is completed first (rolled forward: the swaps are idempotent).

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
* A process killed between the two swaps leaves scores and quarantine of different runs until the
  next run of the date completes the journal; the reader reports that state as an error.
* Two runs of one date: the second is refused (:class:`PartitionBusy`) while the first holds the
  lease (a local ``flock``, released by the kernel when the holder dies; on S3 an object created
  with ``If-None-Match: *`` whose expiry the holder renews).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import logging
import os
import posixpath
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import FailureHook, InputDataError, UsageError, VaepipeError
from pipeline.io import storage
from pipeline.io.columns import as_array, plain_type
from schemas.output_table import (
    LEASES,
    MANIFEST,
    PARQUET_COMPRESSION,
    PUBLISH_JOURNAL,
    QUARANTINE,
    ROW_GROUP_ROWS,
    SCHEMA_VERSION,
    STAGING,
    STAGING_RUN,
    SUCCESS,
    TABLE_MARKER,
    partition_date,
    partition_name,
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

    @property
    def journal(self) -> str:
        return storage.join(self.root, PUBLISH_JOURNAL)

    def begin(self, run_date: str) -> None:
        """Record the run's date first, so that the next run of that date can clean up after it."""
        body = {"run_id": self.run_id, "run_date": run_date}
        storage.write_text(storage.join(self.root, STAGING_RUN), json.dumps(body))

    def discard(self) -> None:
        """Delete this run's staging directory (never anything else). Kept while it holds the journal
        of a publish that did not finish: the next run of the date completes that publish."""
        try:
            if storage.exists(self.journal):
                log.warning("publish of run %s did not finish: the next run of its date completes it", self.run_id)
                return
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


# ---- ownership: the table's marker, and partitions the run may replace ------------------------------
class PartitionBusy(VaepipeError):
    """Another run holds the partition's lease (exit code 1)."""


def check_table(output: str) -> None:
    """Refuse (UsageError, exit 2) a non-empty --output that is not a vaepipe scores table.

    A table carries ``_vaepipe_table.json`` from its first run on. A table written before the marker
    existed (only ``dt=`` partitions holding a manifest, and vaepipe's own ``_`` directories) is
    accepted and gets the marker on this run's first write."""
    loc = storage.locate(output)
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        raise UsageError(f"--output {output} is a file, not a table directory")
    names = storage.list_dir(output)
    if not names or TABLE_MARKER in names:
        return
    ours = {QUARANTINE, STAGING, LEASES}
    for name in names:
        if name in ours:
            continue
        if partition_date(name) is not None and storage.exists(storage.join(output, name, MANIFEST)):
            continue
        raise UsageError(
            f"--output {output} is not empty and has no {TABLE_MARKER} ({name} is not vaepipe's): the run "
            "replaces what it writes there, so it writes only into its own table; give an empty or new location"
        )


def claim_table(output: str, run_id: str) -> None:
    """Write the table's marker if it has none (the first write of a run into OUTPUT)."""
    marker = storage.join(output, TABLE_MARKER)
    if not storage.exists(marker):
        body = {"made_by": "vaepipe score", "table": output, "first_run": run_id, "schema_version": SCHEMA_VERSION}
        storage.write_text(marker, json.dumps(body) + "\n")


def _manifest_run_id(partition: str) -> str | None:
    try:
        manifest = json.loads(storage.read_text(storage.join(partition, MANIFEST)))
    except (FileNotFoundError, ValueError):
        return None
    return manifest.get("run_id") if isinstance(manifest, dict) else None


def check_partition_ours(partition: str) -> None:
    """A partition is replaced only if absent or written by vaepipe (it holds a readable manifest)."""
    if storage.list_dir(partition) and _manifest_run_id(partition) is None:
        raise UsageError(
            f"{partition} exists without a readable {MANIFEST}: it was not published by vaepipe score; "
            "refusing to replace it"
        )


# ---- one run per partition: a local flock, or an S3 lease object (conditional put) ------------------
LEASE_SECONDS = 300.0  # an S3 lease not renewed for this long is stale: another run may take it over
LEASE_RENEW_SECONDS = 60.0


class Lease:
    """Held for the whole run; :meth:`check` before publishing raises if it was lost."""

    def check(self) -> None:  # a local flock cannot be lost while the process lives
        pass


@contextmanager
def partition_lease(output: str, run_date: str, run_id: str, seconds: float = LEASE_SECONDS):
    """Hold the partition ``dt=run_date`` of the table for this run, or raise PartitionBusy."""
    name = partition_name(run_date)
    if storage.is_s3(output):
        lease = _S3Lease(storage.join(output, LEASES, f"{name}.json"), run_id, run_date, seconds)
        lease.acquire()
        try:
            yield lease
        finally:
            lease.release()
        return
    path = storage.fs_path(storage.join(output, LEASES, f"{name}.lock"))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PartitionBusy(
                f"another run is writing {name} of {output} (it holds {path}); a second concurrent run of one "
                "date is refused: wait for it to finish"
            ) from None
        yield Lease()  # the kernel releases the lock when the process ends, however it ends
    finally:
        os.close(fd)


def _s3_client():
    import botocore.session

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return botocore.session.get_session().create_client("s3", endpoint_url=storage.s3_endpoint(), region_name=region)


def _precondition_failed(e: Exception) -> bool:
    code = getattr(e, "response", {}).get("Error", {}).get("Code")
    return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")


class _S3Lease(Lease):
    """An S3 object created with ``If-None-Match: *`` (only one run can create it), renewed with
    ``If-Match`` on its ETag; its body names the run and an expiry time (``expires_at``, epoch s),
    after which another run may take it over (again with ``If-Match``, so only one can)."""

    def __init__(self, uri: str, run_id: str, run_date: str, seconds: float):
        self.uri, self.run_id, self.run_date, self.seconds = uri, run_id, run_date, seconds
        self.bucket, self.key = storage.fs_path(uri).split("/", 1)
        self.client = _s3_client()
        self.etag: str | None = None
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        now = time.time()
        body = {"run_id": self.run_id, "run_date": self.run_date, "acquired_at": now, "expires_at": now + self.seconds}
        return json.dumps(body).encode()

    def _put(self, **condition) -> None:
        r = self.client.put_object(Bucket=self.bucket, Key=self.key, Body=self._body(), **condition)
        self.etag = r["ETag"]

    def acquire(self) -> None:
        from botocore.exceptions import ClientError

        for _ in range(3):
            try:
                self._put(IfNoneMatch="*")
                break
            except ClientError as e:
                if not _precondition_failed(e):
                    raise
            try:
                cur = self.client.get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                    continue  # released meanwhile: try to create it again
                raise
            try:
                holder = json.loads(cur["Body"].read())
                expires = float(holder["expires_at"])
            except (ValueError, KeyError, TypeError):
                holder, expires = {}, 0.0  # unreadable: treated as stale
            if expires > time.time():
                raise PartitionBusy(
                    f"run {holder.get('run_id')} holds the lease {self.uri} until "
                    f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(expires))}: a second concurrent run of one "
                    "date is refused (a lease not renewed expires; wait for that run to finish)"
                )
            try:
                self._put(IfMatch=cur["ETag"])  # take over the stale lease: only one run can
                log.warning("took over the stale lease %s of run %s", self.uri, holder.get("run_id"))
                break
            except ClientError as e:
                if not _precondition_failed(e):
                    raise
        else:
            raise PartitionBusy(f"could not acquire the lease {self.uri}: other runs keep taking it")
        self._thread = threading.Thread(target=self._renew, name="vaepipe-lease", daemon=True)
        self._thread.start()

    def _renew(self) -> None:
        while not self._stop.wait(min(LEASE_RENEW_SECONDS, self.seconds / 3)):
            try:
                self._put(IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 -- reported by check() before publishing
                self.lost = f"the lease {self.uri} could not be renewed ({e})"
                return

    def check(self) -> None:
        if self.lost:
            raise PartitionBusy(f"{self.lost}; nothing published")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.etag is not None and not self.lost:
            try:
                self.client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception as e:  # noqa: BLE001 -- an unreleased lease expires
                log.warning("could not release the lease %s: %s", self.uri, e)


# ---- publishing -----------------------------------------------------------------------------------
@dataclass
class Published:
    partition: str
    quarantine_partition: str
    files: list[dict[str, Any]] = field(default_factory=list)  # {"file", "rows"} of the scores table
    quarantine_files: list[dict[str, Any]] = field(default_factory=list)


def write_table(uri: str, table: pa.Table, row_group_size: int = ROW_GROUP_ROWS) -> None:
    """One Parquet file in the table's own schema (metadata included), zstd."""
    loc = storage.locate(uri)
    parent = loc.path.rsplit("/", 1)[0]
    loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as out:
        pq.write_table(table, out, compression=PARQUET_COMPRESSION, row_group_size=row_group_size)


def final_names(files: list[StagedFile], run_id: str, prefix: str) -> list[str]:
    return [f"{prefix}-{i:05d}-{run_id}.parquet" for i in range(len(files))]


def ensure_one_file(staged_dir: str, files: list[StagedFile], schema: pa.Schema) -> list[StagedFile]:
    """A partition with no rows still holds one (empty) file with the fixed schema."""
    if files:
        return files
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
    hook: FailureHook | None = None,
) -> Published:
    """Replace OUTPUT/_quarantine/dt=D, then OUTPUT/dt=D, with the staged files (see module doc).

    Both new partitions are made ready first; then a journal naming the swaps is written into the
    run's staging directory, the swaps are applied and the journal is deleted. A process killed after
    the journal was written leaves it: the next run of the date applies the rest (:func:`recover`)."""
    hook = hook or FailureHook()
    output = staging.output
    scored = ensure_one_file(staging.scores, rec.scored_files, scores_schema)
    quarantined = ensure_one_file(staging.quarantine, rec.quarantine_files, quarantine_schema)
    part = partition_uri(output, run_date)
    qpart = quarantine_partition_uri(output, run_date)
    check_partition_ours(part)
    check_partition_ours(qpart)
    pub = Published(part, qpart)
    names = final_names(scored, staging.run_id, "part")
    qnames = final_names(quarantined, staging.run_id, "quarantine")
    pub.files = [{"file": storage.join(part, n), "rows": f.rows} for n, f in zip(names, scored, strict=True)]
    pub.quarantine_files = [
        {"file": storage.join(qpart, n), "rows": f.rows} for n, f in zip(qnames, quarantined, strict=True)
    ]
    manifest = {**manifest, "output_files": pub.files, "quarantine_files": pub.quarantine_files}
    text = json.dumps(manifest, indent=2, default=str)
    success = json.dumps({"run_id": staging.run_id}) + "\n"
    journal: dict[str, Any] = {"run_id": staging.run_id, "run_date": run_date, "steps": []}
    for tag, files, fnames, target in (
        ("quarantine-new", quarantined, qnames, qpart),
        ("scores-new", scored, names, part),
    ):
        step: dict[str, Any] = {"tag": tag, "target": target}
        if storage.is_s3(output):
            loc = storage.locate(target)
            step["copies"] = [[f.path, posixpath.join(loc.path, n)] for f, n in zip(files, fnames, strict=True)]
            step["manifest"] = text
            step["success"] = success
        else:
            _prepare_local(staging, tag, files, fnames, text, success)
        journal["steps"].append(step)
        hook.kill_point(f"prepared-{tag}")
    _write_journal(staging.journal, journal)
    hook.kill_point("journaled")
    _apply(staging, journal, hook)
    storage.delete_file(staging.journal)
    return pub


def _write_journal(uri: str, journal: dict[str, Any]) -> None:
    text = json.dumps(journal)
    if storage.is_s3(uri):
        storage.write_text(uri, text)  # one PUT: there or not
        return
    path = storage.fs_path(uri)
    _write_local(path + ".tmp", text)
    os.replace(path + ".tmp", path)


def _apply(staging: Staging, journal: dict[str, Any], hook: FailureHook | None = None) -> None:
    """Apply a publish journal's swaps; idempotent, so a killed publish can be applied again."""
    hook = hook or FailureHook()
    for step in journal["steps"]:
        if "copies" in step:
            _swap_s3(step)
        else:
            _swap_local(staging, step["tag"], step["target"])
        hook.kill_point(f"swapped-{step['tag']}")


def recover(output: str, run_date: str) -> list[str]:
    """Clean up after killed runs of ``run_date`` (call it holding the partition's lease): a publish
    whose journal exists is completed (rolled forward), then each such run's staging is deleted.
    Returns the run ids cleaned up."""
    done = []
    for run_id in storage.list_dir(storage.join(output, STAGING)):
        st = Staging(output, run_id)
        try:
            info = json.loads(storage.read_text(storage.join(st.root, STAGING_RUN)))
        except (FileNotFoundError, ValueError):
            continue  # not begun, or not a run's staging: not this run's to judge
        if not isinstance(info, dict) or info.get("run_date") != run_date:
            continue
        try:
            journal = json.loads(storage.read_text(st.journal))
        except FileNotFoundError:
            journal = None
        if journal is not None:
            log.warning("completing the interrupted publish of run %s (%s)", run_id, partition_name(run_date))
            _apply(st, journal)
            storage.delete_file(st.journal)
        else:
            log.info("deleting the staging of run %s, which did not finish", run_id)
        st.discard()
        done.append(run_id)
    return done


def _prepare_local(staging: Staging, tag: str, files: list[StagedFile], names: list[str], text: str, success: str):
    """The new partition, complete (data files, manifest, _SUCCESS), in OUTPUT/_staging/<run_id>/<tag>."""
    new_dir = storage.fs_path(storage.join(staging.root, tag))
    os.makedirs(new_dir)
    for f, name in zip(files, names, strict=True):
        os.rename(f.path, os.path.join(new_dir, name))
    _write_local(os.path.join(new_dir, MANIFEST), text)
    _write_local(os.path.join(new_dir, SUCCESS), success)


def _swap_local(staging: Staging, tag: str, target_uri: str) -> None:
    new_dir = storage.fs_path(storage.join(staging.root, tag))
    old_dir = storage.fs_path(storage.join(staging.root, tag.replace("-new", "-old")))
    target = storage.fs_path(target_uri)
    if _manifest_run_id(target_uri) == staging.run_id:  # swapped already; new_dir (if any) holds the old
        storage.delete_dir(new_dir)
    else:
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if not os.path.lexists(target):
            os.rename(new_dir, target)
        elif _rename_exchange(new_dir, target):
            storage.delete_dir(new_dir)  # it now holds the old partition
        else:
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


def _swap_s3(step: dict[str, Any]) -> None:
    """Copy the new files in, overwrite manifest then _SUCCESS, delete every other file. Idempotent:
    a staged file already copied (and perhaps gone with its staging) is not needed again."""
    target = step["target"]
    loc = storage.locate(target)
    keep = set()
    for src, dest in step["copies"]:
        if loc.fs.get_file_info(src).type == pafs.FileType.File:
            loc.fs.copy_file(src, dest)
        elif loc.fs.get_file_info(dest).type != pafs.FileType.File:
            raise ReconciliationError(f"cannot complete the publish of {target}: {src} and {dest} are both gone")
        keep.add(dest)
    storage.write_text(storage.join(target, MANIFEST), step["manifest"])
    storage.write_text(storage.join(target, SUCCESS), step["success"])
    keep |= {posixpath.join(loc.path, MANIFEST), posixpath.join(loc.path, SUCCESS)}
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    for info in infos:
        if info.type == pafs.FileType.File and info.path not in keep:
            loc.fs.delete_file(info.path)


def read_manifest(partition: str) -> dict[str, Any]:
    return json.loads(storage.read_text(storage.join(partition, MANIFEST)))
