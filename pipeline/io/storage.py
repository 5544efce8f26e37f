"""All file IO goes through here: local paths and s3:// URIs differ only in the filesystem.

S3 uses pyarrow's S3FileSystem with the standard AWS credential chain. An S3-compatible endpoint
comes from ``--s3-endpoint`` (passed to :func:`configure`) or ``AWS_ENDPOINT_URL``.
Credentials are never logged or stored.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import posixpath
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline.errors import InputDataError, UsageError

_S3_ENDPOINT: str | None = None


def configure(s3_endpoint: str | None = None) -> None:
    """Set an S3-compatible endpoint for this process (exported so Ray workers see it too)."""
    global _S3_ENDPOINT
    if s3_endpoint:
        _S3_ENDPOINT = s3_endpoint
        os.environ["AWS_ENDPOINT_URL"] = s3_endpoint


def s3_endpoint() -> str | None:
    return _S3_ENDPOINT or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str) -> pafs.FileSystem:
    if is_s3(uri):
        endpoint = s3_endpoint()
        kwargs = {}
        if endpoint:
            kwargs["endpoint_override"] = endpoint
            kwargs["scheme"] = "https" if endpoint.startswith("https") else "http"
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            kwargs["region"] = region
        return pafs.S3FileSystem(**kwargs)
    return pafs.LocalFileSystem()


def fs_path(uri: str) -> str:
    """The path the filesystem of `uri` understands (bucket/key for S3, absolute for local)."""
    if is_s3(uri):
        return uri[len("s3://") :].rstrip("/")
    return os.path.abspath(os.path.expanduser(uri))


def _normalised(uri: str) -> tuple[str, str]:
    """(scheme, path) for comparing locations: s3 -> ("s3", "bucket/key"), local -> ("file", realpath).

    A glob is cut at the directory before its first wildcard: that directory is what it can match.
    """
    if is_s3(uri):
        path = uri[len("s3://") :]
        scheme = "s3"
    else:
        path = os.path.expanduser(uri)
        scheme = "file"
    cut = min((i for i, ch in enumerate(path) if ch in "*?["), default=None)
    if cut is not None:
        path = path[: path.rfind("/", 0, cut) + 1] or "."
    if scheme == "s3":
        return scheme, posixpath.normpath("/" + path).strip("/")
    return scheme, os.path.realpath(path)


def ensure_disjoint(*named: tuple[str, str | None]) -> None:
    """Refuse (UsageError, exit 2) any two of the named locations where one contains the other.

    ``named``: ``("--data", uri)`` pairs (a None uri is skipped). Local paths are compared after
    ``realpath`` (symlinks and ``..`` resolved), s3 URIs by bucket/key prefix, on path components.
    """
    items = [(flag, uri, _normalised(uri)) for flag, uri in named if uri]
    for i, (flag_a, uri_a, (scheme_a, a)) in enumerate(items):
        for flag_b, uri_b, (scheme_b, b) in items[i + 1 :]:
            if scheme_a != scheme_b:
                continue
            sep = "/" if scheme_a == "s3" else os.sep
            if a == b or b.startswith(a.rstrip(sep) + sep) or a.startswith(b.rstrip(sep) + sep) or not a or not b:
                raise UsageError(
                    f"{flag_a} {uri_a} and {flag_b} {uri_b} overlap (one contains the other): "
                    "the job would write over what it reads or writes elsewhere; give them disjoint locations"
                )


def to_uri(uri_like: str, path: str) -> str:
    """Turn a filesystem path back into a URI of the same kind as `uri_like`."""
    return f"s3://{path}" if is_s3(uri_like) else path


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(uri, *parts)


@dataclass(frozen=True)
class Located:
    """A resolved URI: its filesystem and the path on it."""

    uri: str
    fs: pafs.FileSystem
    path: str


def locate(uri: str) -> Located:
    return Located(uri, filesystem(uri), fs_path(uri))


def _hidden(name: str) -> bool:
    base = posixpath.basename(name)
    return base.startswith(("_", "."))


def list_parquet(uri: str) -> list[str]:
    """Expand a file, a directory of shards (recursively) or a glob into sorted Parquet paths.

    Returns filesystem paths (for S3: bucket/key). Hidden files (``_*``, ``.*``) are skipped.
    """
    loc = locate(uri)
    if any(ch in loc.path for ch in "*?["):
        base = loc.path
        cut = min(i for i, ch in enumerate(base) if ch in "*?[")
        root = base[: base.rfind("/", 0, cut)] if "/" in base[:cut] else "."
        infos = loc.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        paths = [
            i.path for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatch(i.path, base)
        ]
    else:
        info = loc.fs.get_file_info(loc.path)
        if info.type == pafs.FileType.NotFound:
            raise InputDataError("input not found", file=uri)
        if info.type == pafs.FileType.File:
            return [loc.path]
        infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True))
        paths = [
            i.path
            for i in infos
            if i.type == pafs.FileType.File
            and not any(_hidden(p) for p in posixpath.relpath(i.path, loc.path).split("/"))
            and i.path.endswith((".parquet", ".pq", ".parq"))
        ]
    if not paths:
        raise InputDataError("no Parquet files found", file=uri)
    return sorted(paths)


def read_bytes(uri: str) -> bytes:
    loc = locate(uri)
    try:
        with loc.fs.open_input_stream(loc.path) as f:
            return f.read()
    except (FileNotFoundError, OSError) as e:
        if loc.fs.get_file_info(loc.path).type == pafs.FileType.NotFound:
            raise FileNotFoundError(uri) from e
        raise


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def write_bytes(uri: str, data: bytes) -> None:
    loc = locate(uri)
    parent = posixpath.dirname(loc.path) if is_s3(uri) else os.path.dirname(loc.path)
    if parent:
        loc.fs.create_dir(parent, recursive=True)
    with loc.fs.open_output_stream(loc.path) as f:
        f.write(data)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode("utf-8"))


def exists(uri: str) -> bool:
    loc = locate(uri)
    return loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound


def delete_dir(uri: str) -> None:
    loc = locate(uri)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.NotFound:
        loc.fs.delete_dir(loc.path)


def list_dir(uri: str) -> list[str]:
    """The names directly under a directory (empty if it does not exist)."""
    loc = locate(uri)
    infos = loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=False, allow_not_found=True))
    return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)


def delete_file(uri: str) -> None:
    loc = locate(uri)
    if loc.fs.get_file_info(loc.path).type == pafs.FileType.File:
        loc.fs.delete_file(loc.path)


def remove_empty_dir(uri: str) -> None:
    """Remove a directory if it is empty. On S3, a "directory" that holds no object may still be a
    marker object (``prefix/``, written by create_dir, as Ray Train's storage does): it is deleted when
    nothing is listed under the prefix."""
    if not is_s3(uri):
        with contextlib.suppress(OSError):
            os.rmdir(fs_path(uri))
        return
    loc = locate(uri)
    if loc.fs.get_file_info(loc.path).type != pafs.FileType.Directory:
        return
    if not loc.fs.get_file_info(pafs.FileSelector(loc.path, recursive=True, allow_not_found=True)):
        loc.fs.delete_dir(loc.path)  # only the marker is left
