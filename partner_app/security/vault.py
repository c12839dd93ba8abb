"""Envelope encryption for every secret the platform stores. The only module that
touches key material.

Two layers:

* The **keyring** (``ENCRYPTION_KEYS``: ``kid:base64key,…``, first is active) holds
  root keys. From each one a sub-key per purpose is derived with HKDF-SHA256, so no key
  serves two purposes.
* Each operator has a **data key** (32 random bytes), stored wrapped by the keyring's
  ``data-keys`` sub-key. The operator's secrets (tokens, webhook secrets) are encrypted
  with that data key. Destroying the wrapped data key crypto-shreds the operator.

Every ciphertext is self-describing text, ``v1.<kid>.<base64url(nonce‖ciphertext‖tag)>``,
AES-256-GCM with a fresh random 96-bit nonce per write. The associated data binds it to
the table, column, operator and key id, so a ciphertext copied to another row, column
or operator, or relabelled with another kid, fails to decrypt instead of being
silently accepted.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

FORMAT_VERSION = "v1"
NONCE_BYTES = 12
DATA_KEY_BYTES = 32
_AAD_PREFIX = b"stora-partner|v1|"
_CIPHERTEXT_RE = re.compile(r"v1\.([A-Za-z0-9_-]{1,32})\.([A-Za-z0-9_-]+)")

PURPOSE_DATA_KEYS = "data-keys"
PURPOSE_INSTALL_STATE = "install-state"
PURPOSE_STAFF_TOTP = "staff-totp"
PURPOSES = (PURPOSE_DATA_KEYS, PURPOSE_INSTALL_STATE, PURPOSE_STAFF_TOTP)


class VaultError(Exception):
    """Base class. Messages never contain plaintext or key material."""


class DecryptionError(VaultError):
    """The ciphertext is malformed, tampered with, or bound to another row/column/key."""


class UnknownKeyError(VaultError):
    """The ciphertext names a key id the keyring does not hold."""


class KeyDestroyedError(VaultError):
    """The operator's data key was destroyed: its secrets are gone for good."""


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _aad(*parts: str) -> bytes:
    # "|" cannot appear inside a part unnoticed: parts are escaped by length prefix.
    return _AAD_PREFIX + b"|".join(f"{len(p)}:{p}".encode() for p in parts)


def _seal(key: bytes, kid: str, plaintext: bytes, aad: bytes) -> str:
    nonce = os.urandom(NONCE_BYTES)
    sealed = AESGCM(key).encrypt(nonce, plaintext, aad)
    return f"{FORMAT_VERSION}.{kid}.{_b64e(nonce + sealed)}"


def parse_ciphertext(ciphertext: str) -> tuple[str, bytes]:
    """Split ``v1.<kid>.<b64>`` into (kid, raw bytes). Raises DecryptionError."""
    match = _CIPHERTEXT_RE.fullmatch(ciphertext or "")
    if not match:
        raise DecryptionError("not a v1 vault ciphertext")
    try:
        raw = _b64d(match.group(2))
    except (binascii.Error, ValueError):
        raise DecryptionError("ciphertext body is not base64url") from None
    if len(raw) < NONCE_BYTES + 16:
        raise DecryptionError("ciphertext too short")
    return match.group(1), raw


def _open(key: bytes, raw: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(key).decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad)
    except InvalidTag:
        raise DecryptionError("authentication failed (tampered, or bound elsewhere)") from None


@dataclass(frozen=True)
class Keyring:
    """Versioned root keys; the first is active. Sub-keys per purpose via HKDF."""

    keys: tuple[tuple[str, bytes], ...] = field(repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise VaultError("the keyring is empty")
        for kid, key in self.keys:
            if len(key) != 32:
                raise VaultError(f"key {kid!r} is not 32 bytes")

    @property
    def active_kid(self) -> str:
        return self.keys[0][0]

    @property
    def kids(self) -> tuple[str, ...]:
        return tuple(kid for kid, _ in self.keys)

    def subkey(self, kid: str, purpose: str) -> bytes:
        if purpose not in PURPOSES:
            raise VaultError(f"unknown purpose {purpose!r}")
        for candidate, root in self.keys:
            if candidate == kid:
                return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                            info=f"stora-partner/{purpose}/v1".encode()).derive(root)
        raise UnknownKeyError(f"key id {kid!r} is not in the keyring")


@dataclass(frozen=True)
class WrappedDataKey:
    """A freshly made data key, ready to store: the wrapped form and its wrapping kid."""

    wrapped_key: str
    wrapping_kid: str


class OperatorCipher:
    """Encrypts and decrypts one operator's secrets with its (unwrapped) data key.

    Built by ``Vault.cipher_for``; short-lived, kept only in local variables.
    """

    __slots__ = ("_key", "data_key_id", "kid", "operator_id")

    def __init__(self, operator_id: int, data_key_id: int, key: bytes):
        self.operator_id = operator_id
        self.data_key_id = data_key_id
        self.kid = f"dk{data_key_id}"
        self._key = key

    def __repr__(self) -> str:
        return f"<OperatorCipher operator={self.operator_id} {self.kid}>"

    def _aad(self, table: str, column: str, kid: str) -> bytes:
        return _aad("op", table, column, str(self.operator_id), kid)

    def encrypt(self, table: str, column: str, plaintext: str) -> str:
        return _seal(self._key, self.kid, plaintext.encode(), self._aad(table, column, self.kid))

    def decrypt(self, table: str, column: str, ciphertext: str) -> str:
        kid, raw = parse_ciphertext(ciphertext)
        if kid != self.kid:
            raise DecryptionError(f"ciphertext is under {kid}, this cipher holds {self.kid}")
        return _open(self._key, raw, self._aad(table, column, kid)).decode()


class Vault:
    """Key management and encryption. Stateless apart from the keyring."""

    def __init__(self, keyring: Keyring):
        self.keyring = keyring

    @classmethod
    def from_settings(cls, encryption_keys: Iterable[tuple[str, bytes]]) -> Vault:
        return cls(Keyring(tuple(encryption_keys)))

    # -- data keys -------------------------------------------------------------
    def _wrap_aad(self, operator_id: int, kid: str) -> bytes:
        return _aad("dk", "data_keys", "wrapped_key", str(operator_id), kid)

    def new_data_key(self, operator_id: int) -> WrappedDataKey:
        """Make a random data key for an operator, wrapped under the active keyring key."""
        kid = self.keyring.active_kid
        key = os.urandom(DATA_KEY_BYTES)
        wrapped = _seal(self.keyring.subkey(kid, PURPOSE_DATA_KEYS), kid, key,
                        self._wrap_aad(operator_id, kid))
        return WrappedDataKey(wrapped_key=wrapped, wrapping_kid=kid)

    def _unwrap(self, operator_id: int, wrapped_key: str | None) -> bytes:
        if not wrapped_key:
            raise KeyDestroyedError("the operator's data key was destroyed")
        kid, raw = parse_ciphertext(wrapped_key)
        key = _open(self.keyring.subkey(kid, PURPOSE_DATA_KEYS), raw,
                    self._wrap_aad(operator_id, kid))
        if len(key) != DATA_KEY_BYTES:
            raise DecryptionError("unwrapped data key has the wrong length")
        return key

    def cipher_for(self, *, operator_id: int, data_key_id: int,
                   wrapped_key: str | None) -> OperatorCipher:
        """Unwrap a stored data key. Raises KeyDestroyedError, UnknownKeyError, DecryptionError."""
        return OperatorCipher(operator_id, data_key_id, self._unwrap(operator_id, wrapped_key))

    def rewrap(self, *, operator_id: int, wrapped_key: str) -> WrappedDataKey:
        """Re-wrap a data key under the active keyring key; the data key itself is unchanged."""
        key = self._unwrap(operator_id, wrapped_key)
        kid = self.keyring.active_kid
        return WrappedDataKey(
            wrapped_key=_seal(self.keyring.subkey(kid, PURPOSE_DATA_KEYS), kid, key,
                              self._wrap_aad(operator_id, kid)),
            wrapping_kid=kid)

    # -- platform secrets (not owned by an operator) -----------------------------
    def seal(self, plaintext: str, *, purpose: str, context: str) -> str:
        """Encrypt a platform secret (e.g. a PKCE verifier) bound to ``context``."""
        kid = self.keyring.active_kid
        return _seal(self.keyring.subkey(kid, purpose), kid, plaintext.encode(),
                     _aad("platform", purpose, context, kid))

    def unseal(self, ciphertext: str, *, purpose: str, context: str) -> str:
        kid, raw = parse_ciphertext(ciphertext)
        return _open(self.keyring.subkey(kid, purpose), raw,
                     _aad("platform", purpose, context, kid)).decode()

    @staticmethod
    def kid_of(ciphertext: str) -> str:
        return parse_ciphertext(ciphertext)[0]


def generate_key_entry(kid: str) -> str:
    """``kid:base64key`` with 32 fresh random bytes, for ENCRYPTION_KEYS."""
    return f"{kid}:{base64.b64encode(os.urandom(32)).decode()}"
