"""The node's identity key: created once, kept in the data directory, so the peer id survives restarts."""

from __future__ import annotations

import os
from pathlib import Path

from protocol.identity import SigningKey

KEY_FILE = "identity.key"
_HEADER = "p2p-node ed25519 seed v1\n"


class KeyFileError(RuntimeError):
    """The key file exists but cannot be used; the message says why."""


def write_key(path: Path, key: SigningKey) -> None:
    """Write ``key`` atomically with owner-only permissions."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        try:
            os.write(fd, (_HEADER + key.seed.hex() + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        # A full disk: leave no empty temp file behind, and name the file in the error.
        tmp.unlink(missing_ok=True)
        exc.filename = exc.filename or str(path)
        raise
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_key(path: Path) -> SigningKey:
    try:
        text = path.read_text()
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file ({exc.strerror})") from None
    header, _, rest = text.partition("\n")
    try:
        if header + "\n" != _HEADER:
            raise ValueError("unknown header")
        return SigningKey(bytes.fromhex(rest.strip()))
    except ValueError as exc:
        raise KeyFileError(f"{path}: not a p2p-node key file ({exc})") from None


def load_or_create_key(data_dir: Path) -> SigningKey:
    """The node's key from ``data_dir``, generating and persisting one on first start."""
    path = data_dir / KEY_FILE
    if path.exists():
        return read_key(path)
    key = SigningKey.generate()
    write_key(path, key)
    return key
