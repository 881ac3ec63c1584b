"""Where checkpoints, artifacts and data live: a local folder or an object store's URI (`s3://bucket/prefix`), as
one pyarrow filesystem, resolved the way Ray Train resolves `storage_path` (`pyarrow.fs.FileSystem.from_uri`).

An S3-compatible store (AWS, MinIO, Ceph, moto) is configured by the usual environment variables only:
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (AWS_SESSION_TOKEN), AWS_ENDPOINT_URL for a store other than AWS,
AWS_DEFAULT_REGION. A URI with credentials in it is refused: they would end up in MLflow params, Ray's logs and
shell histories. The checks (`check_readable`, `check_writable`) run before Ray starts and before any MLflow run
exists, and turn what the store answers (no bucket, no such prefix, access denied, endpoint down) into a
UserError that names the field (docs/storage.md).
"""

from __future__ import annotations

import functools
import os
import socket
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pyarrow
import pyarrow.fs as pafs

from raycraft.errors import UserError

# What the filesystem of a URI depends on besides the URI: a cached filesystem is reused only while they hold.
AWS_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_S3", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")
ENDPOINT_TIMEOUT_S = 3.0  # a store that does not accept a connection by then is taken for down
DENIED = ("ACCESS_DENIED", "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH", "EXPIRED_TOKEN", "FORBIDDEN")
UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Could not resolve")
ANY_FIELD = "storage"  # what names a location in the errors of the functions that are not told its field


def is_remote(location: str) -> bool:
    """Whether `location` is a URI (`scheme://...`) rather than a local path."""
    return "://" in str(location)


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """(the filesystem, the path inside it) of a local path (made absolute) or a URI. One filesystem per bucket
    and environment is built and reused: building an S3 client takes ~20 ms, too long to pay per file."""
    return _open(ANY_FIELD, location)


def list_files(location: str, suffixes: set[str] | None = None) -> list[str]:
    """Every file under `location`, recursively, sorted, whose suffix (case-insensitive, with its dot: `.png`)
    is in `suffixes` (None: any): absolute paths, or `scheme://bucket/key` URIs for a remote location. A
    location that does not exist holds no files ([])."""
    fs, path = filesystem(location)
    infos = _ask(ANY_FIELD, location, fs.get_file_info, pafs.FileSelector(path, recursive=True,
                                                                          allow_not_found=True))
    wanted = {s.lower() for s in suffixes} if suffixes is not None else None
    files = [i.path for i in infos if i.type == pafs.FileType.File
             and (wanted is None or Path(i.base_name).suffix.lower() in wanted)]
    scheme = f"{urlsplit(location).scheme}://" if is_remote(location) else ""
    return sorted(f"{scheme}{f}" for f in files)


def list_dirs(location: str) -> list[str]:
    """The names of the folders (prefixes) right under `location`, sorted; [] where it does not exist."""
    fs, path = filesystem(location)
    infos = _ask(ANY_FIELD, location, fs.get_file_info, pafs.FileSelector(path, allow_not_found=True))
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def check_readable(field: str, location: str) -> None:
    """A UserError naming `field` unless `location` (a file, a folder or a prefix) exists and can be read:
    a missing bucket or prefix, denied credentials and an endpoint that is down are each said as such."""
    fs, path = _reached(field, location)
    if _ask(field, location, fs.get_file_info, path).type != pafs.FileType.NotFound:
        return
    _check_bucket(field, location, fs, path)
    raise UserError(f"{field}: {redact(location)} does not exist (no file, folder or prefix of that name).")


def check_writable(field: str, location: str) -> None:
    """A UserError naming `field` unless an object (a file) can be written under `location` and deleted again:
    a probe, put and removed, the way a checkpoint will be. A local folder is created if it is missing."""
    fs, path = _reached(field, location)
    _check_bucket(field, location, fs, path)
    probe = f"{path}/.raycraft-probe-{uuid.uuid4().hex}"
    try:
        if not is_remote(location):
            fs.create_dir(path, recursive=True)
        with fs.open_output_stream(probe) as out:
            out.write(b"raycraft: checking that this location is writable")
        fs.delete_file(probe)
    except (OSError, pyarrow.ArrowException) as exc:
        raise UserError(f"{field}: {redact(location)} is not writable ({_problem(exc)}).") from None


def has_credentials(location: str) -> bool:
    """Whether the URI `location` carries a user (and password) before its bucket or host: `s3://KEY:SECRET@b`.
    Not by `urlsplit`, which ends the netloc at a `/` inside the secret: a bucket's name has no `@` or `:`."""
    _, sep, rest = str(location).partition("://")
    head = rest.split("/", 1)[0]
    return bool(sep) and ("@" in head or (":" in head and "@" in rest))


def redact(location: str) -> str:
    """`location` with any user:password part hidden (everything up to its last `@`), fit for a message."""
    if not has_credentials(location):
        return str(location)
    scheme, _, rest = str(location).partition("://")
    return f"{scheme}://***@{rest.rpartition('@')[2]}"


def _open(field: str, location: str) -> tuple[pafs.FileSystem, str]:
    """`filesystem`, with its errors (credentials in the URI, a scheme pyarrow cannot open) named by `field`."""
    if not is_remote(location):
        return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())
    if has_credentials(location):
        raise UserError(f"{field}: {redact(location)} has credentials in it; give them in the environment "
                        "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY), never in a URI that is logged.")
    parts = urlsplit(location)
    if not parts.netloc:
        raise UserError(f"{field}: {location!r} names no bucket; use {parts.scheme or 's3'}://BUCKET/PREFIX.")
    root = f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else "")
    try:
        fs, inside = _bucket_filesystem(root, tuple(os.environ.get(k) for k in AWS_ENV))
    except (OSError, pyarrow.ArrowException) as exc:
        raise UserError(f"{field}: {location!r} cannot be opened ({_problem(exc)}).") from None
    return fs, f"{inside}{parts.path}".rstrip("/")


@functools.lru_cache(maxsize=32)
def _bucket_filesystem(root: str, env: tuple[str | None, ...]) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem of `root` (`s3://bucket`) under the AWS_ENV values `env` (the cache's key only)."""
    return pafs.FileSystem.from_uri(root)


def _reached(field: str, location: str) -> tuple[pafs.FileSystem, str]:
    """`_open`, and for a remote location a UserError unless its endpoint answers."""
    opened = _open(field, location)
    if is_remote(location):
        _check_endpoint(field)
    return opened


def _check_bucket(field: str, location: str, fs: pafs.FileSystem, path: str) -> None:
    """For a remote location: a UserError unless its bucket exists."""
    if not is_remote(location):
        return
    bucket = path.split("/")[0]
    if _ask(field, location, fs.get_file_info, bucket).type == pafs.FileType.NotFound:
        raise UserError(f"{field}: bucket {bucket!r} of {redact(location)} does not exist; create it, or fix "
                        "the bucket's name.")


def _check_endpoint(field: str) -> None:
    """A UserError unless AWS_ENDPOINT_URL (when set) accepts a connection within ENDPOINT_TIMEOUT_S: the AWS
    SDK itself retries a refused connection for seconds before it gives up."""
    name = "AWS_ENDPOINT_URL_S3" if os.environ.get("AWS_ENDPOINT_URL_S3") else "AWS_ENDPOINT_URL"
    endpoint = os.environ.get(name)
    if not endpoint:
        return
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=ENDPOINT_TIMEOUT_S).close()
    except OSError as exc:
        raise UserError(f"{field}: the S3 endpoint {name}={redact(endpoint)} does not answer "
                        f"({exc.strerror or exc}); start the store, or fix {name}.") from None


def _ask(field: str, location: str, call, *args):
    """`call(*args)` against the store, its failures as a UserError naming `field`."""
    try:
        return call(*args)
    except (OSError, pyarrow.ArrowException) as exc:
        raise UserError(f"{field}: {redact(location)} cannot be read ({_problem(exc)}).") from None


def _problem(exc: BaseException) -> str:
    """What went wrong, in the user's terms: denied credentials or a store that is down, else the store's words."""
    text = str(exc)
    if any(word in text for word in DENIED):
        return ("access denied: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), "
                "and that they may use this bucket")
    if any(word in text for word in UNREACHABLE):
        return "the store does not answer: check AWS_ENDPOINT_URL and the network"
    if "NO_SUCH_BUCKET" in text:
        return "the bucket does not exist"
    return text.strip().splitlines()[0] if text.strip() else type(exc).__name__
