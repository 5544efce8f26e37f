"""Reading the scores table back: every published partition, local or s3://, as one Arrow dataset.

``OUTPUT/dt=YYYY-MM-DD/*.parquet`` (hive partitioning; ``dt`` becomes a string column). Only
partitions whose ``_SUCCESS`` marker exists are read: a partition being written (or abandoned by a
failed run) is never half-read. A partition's files are those its ``_manifest.json`` names (never
a listing: on S3 a listing can show two runs' files during a publish); a published partition whose
manifest is missing or unreadable is an error, as is one whose quarantine partition was published by
another run (an interrupted publish, which the next run of that date completes).
"""

from __future__ import annotations

import json
import logging
import posixpath

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs

from pipeline.errors import InputDataError
from pipeline.io import storage
from schemas.output_table import MANIFEST, PARTITION_KEY, QUARANTINE, SUCCESS, partition_date, partition_name

log = logging.getLogger("vaepipe")



def partitions(uri: str) -> list[str]:
    """The run dates (YYYY-MM-DD) published under a scores table URI, sorted."""
    loc = storage.locate(uri)
    info = loc.fs.get_file_info(loc.path)
    if info.type != pafs.FileType.Directory:
        raise InputDataError("no scores table here", file=uri)
    dates = []
    for entry in loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False)):
        name = posixpath.basename(entry.path)
        date = partition_date(name)
        if entry.type != pafs.FileType.Directory or date is None:
            continue
        if loc.fs.get_file_info(posixpath.join(entry.path, SUCCESS)).type == pafs.FileType.NotFound:
            log.warning(
                "skipping %s: no %s (a run is writing it, or one failed)", storage.to_uri(uri, entry.path), SUCCESS
            )
            continue
        dates.append(date)
    return sorted(dates)


def open_scores(uri: str, run_dates: list[str] | None = None) -> ds.Dataset:
    """A lazy Arrow dataset over the scores table (all published partitions, or those named)."""
    published = partitions(uri)
    if run_dates is not None:
        missing = sorted(set(run_dates) - set(published))
        if missing:
            raise InputDataError(f"no published partition for run date(s) {', '.join(missing)}", file=uri)
        published = [d for d in published if d in set(run_dates)]
    if not published:
        raise InputDataError(f"no published partitions ({partition_name('YYYY-MM-DD')} with {SUCCESS})", file=uri)
    loc = storage.locate(uri)
    files = []
    for date in published:
        files += _manifest_files(uri, date)
    if not files:
        raise InputDataError("published partitions hold no Parquet files", file=uri)
    partitioning = ds.partitioning(pa.schema([(PARTITION_KEY, pa.string())]), flavor="hive")
    return ds.dataset(
        files, filesystem=loc.fs, format="parquet", partitioning=partitioning, partition_base_dir=loc.path
    )


def _read_manifest(partition: str) -> dict | None:
    """A partition's manifest; None if it has none; InputDataError if it cannot be read."""
    path = storage.join(partition, MANIFEST)
    try:
        manifest = json.loads(storage.read_text(path))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise InputDataError(f"unreadable manifest ({type(e).__name__}: {e})", file=path) from e
    if not isinstance(manifest, dict):
        raise InputDataError("the manifest is not a JSON object", file=path)
    return manifest


def _manifest_files(uri: str, date: str) -> list[str]:
    """The data files a published partition's manifest names (filesystem paths)."""
    root = storage.join(uri, partition_name(date))
    manifest = _read_manifest(root)
    path = storage.join(root, MANIFEST)
    if manifest is None:
        raise InputDataError(f"published partition without {MANIFEST}", file=path)
    entries = manifest.get("output_files")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
        raise InputDataError("the manifest lists no output_files", file=path)
    quarantine = _read_manifest(storage.join(uri, QUARANTINE, partition_name(date)))
    if quarantine is not None and quarantine.get("run_id") != manifest.get("run_id"):
        raise InputDataError(
            f"{partition_name(date)} holds run {manifest.get('run_id')} but its quarantine run "
            f"{quarantine.get('run_id')}: a publish was interrupted; the next run of that date completes it",
            file=path,
        )
    base = storage.fs_path(root)
    return [posixpath.join(base, posixpath.basename(str(e["file"]))) for e in entries]


def read_scores(uri: str, run_dates: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    return open_scores(uri, run_dates).to_table(columns=columns)
