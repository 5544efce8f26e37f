"""Reading the scores table back: every published partition, local or s3://, as one Arrow dataset.

``OUTPUT/dt=YYYY-MM-DD/*.parquet`` (hive partitioning; ``dt`` becomes a string column). Only
partitions whose ``_SUCCESS`` marker exists are read: a partition being written (or abandoned by a
failed run) is never half-read. ``_quarantine/``, ``_manifest.json`` and other ``_``/``.`` names are
not scores and are skipped.
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
from schemas.output_table import MANIFEST, PARTITION_KEY, SUCCESS, partition_date, partition_name

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
    roots = [posixpath.join(loc.path, partition_name(d)) for d in published]
    files = []
    for root in roots:
        listed = _manifest_files(loc.fs, root)
        if listed is not None:
            files += listed
            continue
        sel = pafs.FileSelector(root, recursive=True)
        files += sorted(
            i.path
            for i in loc.fs.get_file_info(sel)
            if i.type == pafs.FileType.File
            and i.path.endswith(".parquet")
            and not any(p.startswith(("_", ".")) for p in posixpath.relpath(i.path, root).split("/"))
        )
    if not files:
        raise InputDataError("published partitions hold no Parquet files", file=uri)
    partitioning = ds.partitioning(pa.schema([(PARTITION_KEY, pa.string())]), flavor="hive")
    return ds.dataset(
        files, filesystem=loc.fs, format="parquet", partitioning=partitioning, partition_base_dir=loc.path
    )


def _manifest_files(fs: pafs.FileSystem, root: str) -> list[str] | None:
    """The data files a partition's manifest names (as paths under `root`), or None without a list."""
    try:
        with fs.open_input_stream(posixpath.join(root, MANIFEST)) as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    entries = manifest.get("output_files") if isinstance(manifest, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "file" in e for e in entries):
        return None
    return [posixpath.join(root, posixpath.basename(str(e["file"]))) for e in entries]


def read_scores(uri: str, run_dates: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    return open_scores(uri, run_dates).to_table(columns=columns)
