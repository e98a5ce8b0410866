"""Secrets kept in the database (TOTP secrets, site credentials) encrypted at rest.

The key is kept apart from the database: in ``IMAGESHARE_SECRET_KEY`` or in a key file
(``secret-key`` in the data folder unless ``secret_key_file`` names another place), made on
first start and readable by the owner only. A copy of the database (a backup, a PostgreSQL
dump, a stolen file) then holds no usable secret. Values are Fernet tokens (AES-128-CBC with
HMAC-SHA256, from ``cryptography``) with a version prefix.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken

from imageshare.domain.errors import ConfigurationError

log = logging.getLogger("imageshare.secrets")

PREFIX = "fernet1:"
KEY_FILE = "secret-key"


class SecretBox:
    """Seals and opens short secrets with one installation key; opens those sealed under the
    ``retired`` keys too (a key rotation must not lock out second factors, site credentials
    or EHR secrets before ``imageshare storage seal`` sealed them again)."""

    def __init__(self, key: bytes, retired: Sequence[bytes] = ()) -> None:
        self._fernet = Fernet(key)
        self._retired = tuple(Fernet(k) for k in retired if k != key)

    @staticmethod
    def is_sealed(value: str | None) -> bool:
        """True when ``value`` was sealed by a SecretBox (else it is plaintext or empty)."""
        return bool(value) and str(value).startswith(PREFIX)

    def seal(self, value: str) -> str:
        """``value`` encrypted, as stored in the database (empty stays empty)."""
        if not value:
            return value
        return PREFIX + self._fernet.encrypt(value.encode()).decode("ascii")

    def open(self, value: str | None) -> str:
        """The plaintext of a sealed value. Plaintext left from an older version is returned as
        it is (it is sealed on the next start). Raises :class:`ConfigurationError` when the
        value was sealed with another key."""
        if not value:
            return ""
        if not value.startswith(PREFIX):
            return value
        token = value[len(PREFIX):].encode("ascii")
        for fernet in (self._fernet, *self._retired):
            try:
                return fernet.decrypt(token).decode()
            except InvalidToken:
                continue
        raise ConfigurationError(
            "a secret in the database was encrypted with another key: check "
            "IMAGESHARE_SECRET_KEY / the secret key file (during a key rotation, name the old "
            "key in IMAGESHARE_RETIRED_SECRET_KEYS_FILE)")


def _key_from_text(text: str) -> bytes:
    text = text.strip()
    try:
        if len(base64.urlsafe_b64decode(text.encode())) == 32:
            return text.encode()
    except (ValueError, TypeError):
        pass
    if len(text) < 32:
        raise ConfigurationError(
            "the secret key must be a Fernet key or at least 32 random characters")
    return base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())


def load_secret_key(configured: str, key_file: Path) -> bytes:
    """The installation key: ``configured`` when set, else the key file's, made (0600) on
    first use.

    A new key file appears whole or not at all, and its name is durable before the key is
    used: it is written and fsynced under a temporary name, linked to ``key_file`` (which
    fails if another process made it first: then that one's key is used) and its folder
    fsynced. Written in place, a crash or a second process starting at the same moment read
    an empty file, and after a power loss the key of sealed blobs could be gone."""
    if configured:
        return _key_from_text(configured)
    if not key_file.exists():
        _make_key_file(key_file)
    if key_file.stat().st_mode & 0o077:
        key_file.chmod(0o600)
    try:
        return _key_from_text(key_file.read_text())
    except OSError as exc:
        raise ConfigurationError(f"cannot read the secret key file {key_file}") from exc


def _write_new(path: Path, text: str) -> None:
    """Create ``path`` (0600; FileExistsError if it exists) holding ``text``, fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def _make_key_file(key_file: Path) -> None:
    """Make ``key_file`` with a new key, atomically and durably, unless it exists."""
    folder = key_file.parent
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".{key_file.name}.{os.getpid()}.{os.urandom(4).hex()}.part"
    key = Fernet.generate_key().decode() + "\n"
    try:
        _write_new(tmp, key)
        try:
            os.link(tmp, key_file)
        except FileExistsError:
            return  # another process made it a moment ago, whole: its key is the one
        except OSError:  # a file system without hard links: create it in place
            try:
                _write_new(key_file, key)
            except FileExistsError:
                return
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder_fd)
        finally:
            os.close(folder_fd)
        log.info("made a new key for secrets at rest: %s", key_file)
    finally:
        tmp.unlink(missing_ok=True)
