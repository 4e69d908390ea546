"""CURVE key files, shared by exo-master, exo-worker and exoctl. File I/O only, no sockets.

The format is pyzmq's (`zmq.auth`), the same as czmq's: `NAME.key` holds the public key and may be
copied anywhere; `NAME.key_secret` holds both keys and stays on its machine, mode 0600. A master
admits the workers whose `NAME.key` files are in its authorized-keys directory.

A fingerprint (the first 16 hex digits of the SHA-256 of the raw 32-byte key) names a key in logs
and on screen without printing the key itself; two people compare fingerprints to check a copy.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import zmq.auth
from zmq.utils import z85

PUBLIC_SUFFIX = ".key"
SECRET_SUFFIX = ".key_secret"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class KeyFileError(ValueError):
    """A key file that is missing, unreadable or not a CURVE certificate: one line for the user."""


@dataclass(frozen=True, slots=True)
class Keypair:
    public: bytes  # z85, 40 bytes
    secret: bytes  # z85, 40 bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public)


def default_keys_dir() -> Path:
    """$XDG_CONFIG_HOME/exo/keys, else ~/.config/exo/keys."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "exo" / "keys"


def fingerprint(public_z85: bytes | str) -> str:
    key = public_z85.encode() if isinstance(public_z85, str) else public_z85
    try:
        raw = z85.decode(key)
    except (ValueError, KeyError):  # z85 reports a foreign character as KeyError
        raw = key
    return hashlib.sha256(raw).hexdigest()[:16]


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise KeyFileError(f"key name must be letters, digits, '.', '_' or '-' (at most 64), got {name!r}")
    return name


def generate(directory: Path, name: str) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret (0600) into `directory`; never overwrites a key.

    The files are written in a private temporary directory first, so the secret is never readable
    by others, not even for a moment, and a half-written pair never appears under its final name.
    """
    check_name(name)
    directory.mkdir(parents=True, exist_ok=True)
    public = directory / f"{name}{PUBLIC_SUFFIX}"
    secret = directory / f"{name}{SECRET_SUFFIX}"
    for path in (public, secret):
        if path.exists():
            raise KeyFileError(f"{path} already exists; remove it first to make a new key")
    staging = Path(tempfile.mkdtemp(prefix=".exo-keys-", dir=directory))  # mode 0700
    try:
        made_public, made_secret = zmq.auth.create_certificates(staging, name)
        os.chmod(made_secret, 0o600)
        os.chmod(made_public, 0o644)
        os.replace(made_secret, secret)
        os.replace(made_public, public)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return public, secret


def load_keypair(path: Path) -> Keypair:
    """Read a NAME.key_secret file."""
    public, secret = _read(path)
    if secret is None:
        raise KeyFileError(f"{path} holds no secret key (pass the NAME{SECRET_SUFFIX} file, not NAME.key)")
    return Keypair(public=public, secret=secret)


def load_public(path: Path) -> bytes:
    """Read the public key from a NAME.key (or a NAME.key_secret) file."""
    return _read(path)[0]


def _read(path: Path) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise KeyFileError(f"{path} is not a CURVE key file: {exc}") from None
    for key in (public, secret):
        if key is not None and len(key) != 40:
            raise KeyFileError(f"{path} holds a malformed key (expected 40 z85 characters)")
    return public, secret
