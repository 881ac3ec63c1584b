"""Checkpoint manifests: a SHA-256 of every file, written last, and optionally signed with this user's key.

A checkpoint folder is intact when its manifest exists and every file it lists has the listed digest:
the manifest is written after the files and moved into place with `os.replace`, so a write killed
part-way leaves no manifest (or the old one), never a manifest that vouches for half a file.

A signed manifest also carries an HMAC-SHA256 under a key that only this user can read
(`~/.raycraft/signing.key`, mode 0600, made on first use; `RAYCRAFT_HOME` moves it). Checkpoints
holding pickle files (RLlib's algorithm state) are loaded only when their signature verifies: a folder
that this user's raycraft did not write is refused before anything in it is unpickled.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from pathlib import Path

MANIFEST = "raycraft-manifest.json"
KEY_FILE = "signing.key"


def home() -> Path:
    return Path(os.environ.get("RAYCRAFT_HOME") or Path.home() / ".raycraft")


def key_path() -> Path:
    return home() / KEY_FILE


def signing_key() -> bytes:
    """This user's 32-byte key, created (mode 0600, in a 0700 folder) the first time it is needed."""
    path = key_path()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return bytes.fromhex(path.read_text().strip())
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    return bytes.fromhex(path.read_text().strip())


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): _digest(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def _signature(files: dict[str, str]) -> str:
    return hmac.new(signing_key(), json.dumps(files, sort_keys=True).encode(), hashlib.sha256).hexdigest()


def write_manifest(folder: str | Path, *, sign: bool = False) -> None:
    """Digest every file under `folder` into its manifest (signed with `sign`); call it after the last write."""
    folder = Path(folder)
    files = _files(folder)
    record = {"files": files, **({"hmac": _signature(files)} if sign else {})}
    tmp = folder / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(tmp, folder / MANIFEST)


def listing(folder: str | Path, *, signed: bool = False) -> dict[str, str]:
    """{file: digest} as `folder`'s manifest lists them (with `signed`: only if this user's key signed it), read
    without looking at the files themselves; a ValueError saying why not."""
    try:
        record = json.loads((Path(folder) / MANIFEST).read_text())
        files = {str(name): str(digest) for name, digest in dict(record["files"]).items()}
    except FileNotFoundError:
        raise ValueError(f"no {MANIFEST} (the write did not finish, or raycraft did not write it)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ValueError(f"{MANIFEST} is unreadable") from None
    if signed and not hmac.compare_digest(str(record.get("hmac", "")), _signature(files)):
        raise ValueError("its signature does not match this user's key: raycraft on this account did not write it")
    return files


def problem(folder: str | Path, *, signed: bool = False) -> str | None:
    """Why `folder` is not an intact checkpoint (with `signed`: one this user's raycraft wrote), or None."""
    folder = Path(folder)
    try:
        files = listing(folder, signed=signed)
    except ValueError as why:
        return str(why)
    actual = _files(folder)
    for name, digest in files.items():
        if name not in actual:
            return f"{name} is missing"
        if actual[name] != digest:
            return f"{name} does not match its checksum (truncated or changed)"
    extra = sorted(set(actual) - set(files))
    if signed and extra:
        return f"{extra[0]} was added after it was signed"
    return None
