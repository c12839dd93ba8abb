"""Key rotation while the app keeps running: batched, resumable, fenced.

Procedure (reliability.md §4.3, step 5): put the new key first in ``ENCRYPTION_KEYS``
on every node (the old one stays listed so existing ciphertexts still open), then run
``partner-app keys rotate``. Two modes:

* **Re-wrap** (default). Every live data key wrapped under another kid is re-wrapped
  under the active kid. The data keys themselves, and so every operator secret, stay
  as they are: one small write per operator.
* **New data keys** (``new_data_keys=True``). Every operator whose live data key has
  ever been wrapped by a kid other than the active one gets a fresh data key; its
  credential ciphertexts and webhook signing secrets are re-encrypted under it, and the
  old data key is destroyed once nothing references it. Use it when an old root key may
  have leaked: a re-wrap alone would leave the data keys that key once protected in
  service.

Both modes also re-seal the PKCE verifiers of install attempts still in flight.

Every write is a compare-and-swap, the same fence token refreshes use, so rotation
never overwrites a concurrent change; a row that moved under it is skipped, counted,
and picked up by the next run. Each batch commits, and the selection ("rows not yet on
the active kid") is itself the resume point: an interrupted run simply runs again.

Rotation works through the ``Vault`` API only and never logs a secret or a ciphertext:
log lines carry row ids, kids and exception class names.

Run one rotation at a time. Concurrent runs stay correct (every write is fenced) but
may each create a replacement data key for the same operator, leaving a spare one.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, func, or_, select, update

from partner_app.connections.credentials import TABLE as CREDENTIALS_TABLE
from partner_app.connections.models import Credential, OAuthState
from partner_app.db import db, utcnow
from partner_app.security.models import DataKey
from partner_app.security.vault import (
    FORMAT_VERSION,
    PURPOSE_INSTALL_STATE,
    DecryptionError,
    OperatorCipher,
    Vault,
    VaultError,
)
from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE
from partner_app.webhooks.models import WebhookSubscription

log = logging.getLogger(__name__)

Progress = Callable[[int], None]

# Every column holding a ciphertext under an operator's data key: these and
# ``webhook_subscriptions.secret_ct``. A data key is destroyed only when no row of either
# table references it; a new table encrypted with data keys must be added to both the
# re-encryption and that check.
CREDENTIAL_CT_COLUMNS = ("access_token_ct", "refresh_token_ct")
# How often one credential is re-read and retried when a concurrent write trips the
# fence before the operator is left for the next run.
MAX_FENCE_ATTEMPTS = 5
MALFORMED_KID = "(malformed)"


@dataclass
class RotationReport:
    """What one run did, and what is still left on other kids afterwards."""

    active_kid: str
    new_data_keys: bool = False
    rewrapped: int = 0  # data keys re-wrapped under the active kid
    created_keys: int = 0  # replacement data keys created
    reencrypted: int = 0  # credentials re-encrypted under a replacement data key
    destroyed_keys: int = 0  # old data keys destroyed after replacement
    resealed: int = 0  # install-state verifiers re-sealed under the active kid
    fence_retries: int = 0  # fenced writes that lost to a concurrent write and were retried
    skipped_conflicts: int = 0  # rows left for the next run because they moved under us
    failed: int = 0  # rows that could not be opened (unknown kid, tampered): see the log
    remaining_by_kid: dict[str, int] = field(default_factory=dict)

    @property
    def remaining(self) -> int:
        return sum(self.remaining_by_kid.values())

    def summary(self) -> str:
        """One human-readable line; contains counts and kids only."""
        if self.new_data_keys:
            work = (f"{self.created_keys} new data keys, {self.reencrypted} credentials "
                    f"re-encrypted, {self.destroyed_keys} old data keys destroyed")
        else:
            work = f"{self.rewrapped} data keys re-wrapped"
        parts = [f"rotated to {self.active_kid}: {work}",
                 f"{self.resealed} install states re-sealed"]
        if self.skipped_conflicts:
            parts.append(f"{self.skipped_conflicts} skipped (changed concurrently; run again)")
        if self.failed:
            parts.append(f"{self.failed} unreadable (see log)")
        remaining = ", ".join(f"{kid}={count}"
                              for kid, count in sorted(self.remaining_by_kid.items()))
        parts.append(f"remaining: {remaining or 'none'}")
        return "; ".join(parts)


@dataclass(frozen=True)
class _KeyRef:
    """A data key as read for one rotation step (no ORM identity, so nothing goes stale)."""

    id: int
    operator_id: int
    wrapped_key: str | None


# -- selections ------------------------------------------------------------------------------
def _live_key() -> tuple[ColumnElement[bool], ...]:
    return DataKey.destroyed_at.is_(None), DataKey.wrapped_key.is_not(None)


def _key_needs_work(active_kid: str, new_data_keys: bool) -> ColumnElement[bool]:
    if not new_data_keys:
        return DataKey.wrapping_kid != active_kid
    # ``version`` only moves when a key is re-wrapped, and re-wraps only happen off
    # another kid: version > 1 marks a key that an older root key once protected.
    return or_(DataKey.wrapping_kid != active_kid, DataKey.version > 1)


def _open_states_off(active_kid: str, now: datetime) -> tuple[ColumnElement[bool], ...]:
    """Install attempts still usable whose verifier is sealed under another kid."""
    prefix = f"{FORMAT_VERSION}.{active_kid}."
    return (OAuthState.consumed_at.is_(None), OAuthState.expires_at > now,
            # autoescape: "_" may appear in a kid and is a LIKE wildcard
            ~OAuthState.code_verifier_ct.startswith(prefix, autoescape=True))


def _state_context(state_hash: str) -> str:
    # Must match what connections.install binds the sealed verifier to.
    return f"oauth_states:{state_hash}"


def _keyset(model: Any, columns: Sequence[Any], criteria: Sequence[ColumnElement[bool]],
            batch_size: int) -> Iterator[Sequence[Row[Any]]]:
    """Batches of matching rows in id order, each read fresh.

    Paginating on id (not re-selecting from the start) visits each row at most once per
    run, so a row that cannot be processed cannot stall the run; rows skipped this way
    still match the selection and the next run finds them.
    """
    after = 0
    while True:
        rows = db.session.execute(
            select(*columns).where(*criteria, model.id > after)
            .order_by(model.id).limit(batch_size)).all()
        if not rows:
            return
        yield rows
        after = rows[-1].id


# -- counts ----------------------------------------------------------------------------------
def _pending_by_kid(vault: Vault, *, new_data_keys: bool, now: datetime) -> Counter[str]:
    active = vault.keyring.active_kid
    counts: Counter[str] = Counter()
    for kid, count in db.session.execute(
            select(DataKey.wrapping_kid, func.count())
            .where(*_live_key(), _key_needs_work(active, new_data_keys))
            .group_by(DataKey.wrapping_kid)):
        counts[kid] += count
    # Open install states live minutes and are few: reading their headers is cheap.
    for ciphertext in db.session.scalars(
            select(OAuthState.code_verifier_ct).where(*_open_states_off(active, now))):
        try:
            counts[Vault.kid_of(ciphertext)] += 1
        except DecryptionError:
            counts[MALFORMED_KID] += 1
    return counts


def pending_rotation_count(*, vault: Vault, new_data_keys: bool) -> int:
    """How many rows (data keys and install states) ``rotate_keys`` would process now."""
    return sum(_pending_by_kid(vault, new_data_keys=new_data_keys, now=utcnow()).values())


# -- entry point -----------------------------------------------------------------------------
def rotate_keys(*, vault: Vault, batch_size: int = 200, new_data_keys: bool = False,
                progress: Progress | None = None) -> RotationReport:
    """Move every stored secret onto ``vault.keyring.active_kid``; see the module docstring.

    Needs an app context. Commits after every batch, then calls ``progress`` with the
    number of rows that batch processed (the units of ``pending_rotation_count``). An
    exception (including one raised by ``progress``) rolls back only the unfinished
    batch; running again resumes. Never raises for an unreadable row: it is logged and
    counted in ``failed``.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    report = RotationReport(active_kid=vault.keyring.active_kid, new_data_keys=new_data_keys)
    now = utcnow()
    try:
        if new_data_keys:
            _replace_data_keys(vault, batch_size, report, progress)
        else:
            _rewrap_data_keys(vault, batch_size, report, progress)
        _reseal_install_states(vault, batch_size, report, progress, now)
        report.remaining_by_kid = dict(_pending_by_kid(vault, new_data_keys=new_data_keys,
                                                       now=now))
        db.session.commit()
    except BaseException:
        db.session.rollback()
        raise
    log.info("keys.rotation.done", extra={
        "active_kid": report.active_kid, "rewrapped": report.rewrapped,
        "reencrypted": report.reencrypted, "destroyed": report.destroyed_keys,
        "resealed": report.resealed, "skipped": report.skipped_conflicts,
        "failed": report.failed, "remaining": report.remaining})
    return report


def _batch_done(table: str, size: int, report: RotationReport,
                progress: Progress | None) -> None:
    log.info("keys.rotation.batch", extra={"table": table, "rows": size,
                                           "active_kid": report.active_kid})
    if progress is not None:
        progress(size)


def _unreadable(report: RotationReport, table: str, row_id: int, exc: VaultError) -> None:
    # A tag mismatch means tampering or a row bound elsewhere: an incident, not noise.
    report.failed += 1
    log.error("keys.rotation.unreadable", extra={"table": table, "row_id": row_id,
                                                 "error": type(exc).__name__})


# -- mode 1: re-wrap -------------------------------------------------------------------------
def _rewrap_data_keys(vault: Vault, batch_size: int, report: RotationReport,
                      progress: Progress | None) -> None:
    columns = (DataKey.id, DataKey.operator_id, DataKey.wrapped_key, DataKey.version)
    criteria = (*_live_key(), _key_needs_work(report.active_kid, new_data_keys=False))
    for batch in _keyset(DataKey, columns, criteria, batch_size):
        for row in batch:
            _rewrap_one(row, vault, report)
        db.session.commit()
        _batch_done("data_keys", len(batch), report, progress)


def _rewrap_one(row: Row[Any], vault: Vault, report: RotationReport) -> None:
    """Re-wrap one data key, fenced on the version read with it."""
    try:
        rewrapped = vault.rewrap(operator_id=row.operator_id, wrapped_key=row.wrapped_key)
    except VaultError as exc:
        _unreadable(report, "data_keys", row.id, exc)
        return
    result = db.session.execute(
        update(DataKey)
        # destroyed_at: a re-wrap must never bring back a key destroyed meanwhile
        .where(DataKey.id == row.id, DataKey.version == row.version,
               DataKey.destroyed_at.is_(None))
        .values(wrapped_key=rewrapped.wrapped_key, wrapping_kid=rewrapped.wrapping_kid,
                version=DataKey.version + 1)
        .execution_options(synchronize_session=False))
    if result.rowcount == 1:
        report.rewrapped += 1
    else:
        report.skipped_conflicts += 1


# -- mode 2: new data keys -------------------------------------------------------------------
def _replace_data_keys(vault: Vault, batch_size: int, report: RotationReport,
                       progress: Progress | None) -> None:
    columns = (DataKey.id, DataKey.operator_id, DataKey.wrapped_key)
    criteria = (*_live_key(), _key_needs_work(report.active_kid, new_data_keys=True))
    for batch in _keyset(DataKey, columns, criteria, batch_size):
        old_keys = [_KeyRef(row.id, row.operator_id, row.wrapped_key) for row in batch]
        # Re-encrypt the whole batch before destroying anything: a writer that picked
        # an old key just before its replacement appeared has the longest possible time
        # to finish (its write then keeps the old key alive, see _destroy_if_unreferenced).
        released = [old for old in old_keys
                    if _move_credential_off(old, vault, report)
                    and _move_secrets_off(old, vault, report)]
        for old in released:
            _destroy_if_unreferenced(old, report)
        _batch_done("data_keys", len(batch), report, progress)


def _replacement_for(operator_id: int, vault: Vault, report: RotationReport) -> _KeyRef:
    """The operator's newest live data key if it needs no replacement, else a new one.

    Writers (``live_data_key``) use the newest live key, so once this commits every new
    token of the operator is written under the replacement.
    """
    newest = db.session.execute(
        select(DataKey.id, DataKey.operator_id, DataKey.wrapped_key, DataKey.wrapping_kid,
               DataKey.version)
        .where(DataKey.operator_id == operator_id, DataKey.destroyed_at.is_(None))
        .order_by(DataKey.id.desc()).limit(1)).first()
    # The same test as _key_needs_work(new_data_keys=True), negated.
    if newest is not None and newest.wrapped_key is not None and \
            newest.wrapping_kid == report.active_kid and newest.version <= 1:
        return _KeyRef(newest.id, newest.operator_id, newest.wrapped_key)
    wrapped = vault.new_data_key(operator_id)
    key = DataKey(operator_id=operator_id, wrapped_key=wrapped.wrapped_key,
                  wrapping_kid=wrapped.wrapping_kid, version=1)
    db.session.add(key)
    db.session.flush()
    ref = _KeyRef(key.id, operator_id, wrapped.wrapped_key)
    db.session.commit()
    report.created_keys += 1
    return ref


def _move_credential_off(old: _KeyRef, vault: Vault, report: RotationReport) -> bool:
    """Re-encrypt the operator's credential from ``old`` to a replacement key.

    Returns True when no credential references ``old`` any more (it may be destroyed),
    False when it must stay: unreadable, or the fence kept tripping.
    """
    target = _replacement_for(old.operator_id, vault, report)
    old_cipher: OperatorCipher | None = None
    for _attempt in range(MAX_FENCE_ATTEMPTS):
        credential = db.session.execute(
            select(Credential.id, Credential.version, Credential.data_key_id,
                   *(getattr(Credential, column) for column in CREDENTIAL_CT_COLUMNS))
            .where(Credential.operator_id == old.operator_id)).first()
        if credential is None or credential.data_key_id != old.id:
            db.session.commit()  # end the read; nothing of ours to move
            return True
        try:
            old_cipher = old_cipher or vault.cipher_for(
                operator_id=old.operator_id, data_key_id=old.id, wrapped_key=old.wrapped_key)
            new_cipher = vault.cipher_for(operator_id=target.operator_id,
                                          data_key_id=target.id, wrapped_key=target.wrapped_key)
            values = _reencrypted(credential, old_cipher, new_cipher)
        except VaultError as exc:
            db.session.rollback()
            _unreadable(report, "credentials", credential.id, exc)
            return False
        result = db.session.execute(
            update(Credential)
            .where(Credential.id == credential.id, Credential.version == credential.version)
            .values(data_key_id=target.id, version=Credential.version + 1, **values)
            .execution_options(synchronize_session=False))
        if result.rowcount == 1:
            db.session.commit()
            report.reencrypted += 1
            return True
        # A token write landed between our read and our write: never overwrite it.
        # Re-read; it usually already went to the replacement key.
        db.session.rollback()
        report.fence_retries += 1
    report.skipped_conflicts += 1
    return False


def _move_secrets_off(old: _KeyRef, vault: Vault, report: RotationReport) -> bool:
    """Re-encrypt the operator's webhook signing secrets from ``old`` to its replacement.

    The fence is the ciphertext itself: a subscription whose secret changed (a new
    endpoint, a disable) since we read it is left alone and re-read by the next run.
    Returns True when no secret references ``old`` any more.
    """
    rows = db.session.execute(
        select(WebhookSubscription.id, WebhookSubscription.secret_ct)
        .where(WebhookSubscription.data_key_id == old.id,
               WebhookSubscription.secret_ct.is_not(None))).all()
    if not rows:
        db.session.commit()
        return True
    target = _replacement_for(old.operator_id, vault, report)
    moved = 0
    try:
        old_cipher = vault.cipher_for(operator_id=old.operator_id, data_key_id=old.id,
                                      wrapped_key=old.wrapped_key)
        new_cipher = vault.cipher_for(operator_id=target.operator_id, data_key_id=target.id,
                                      wrapped_key=target.wrapped_key)
        for row in rows:
            secret = old_cipher.decrypt(SECRET_TABLE, SECRET_COLUMN, row.secret_ct)
            result = db.session.execute(
                update(WebhookSubscription)
                .where(WebhookSubscription.id == row.id,
                       WebhookSubscription.data_key_id == old.id,
                       WebhookSubscription.secret_ct == row.secret_ct)
                .values(data_key_id=target.id,
                        secret_ct=new_cipher.encrypt(SECRET_TABLE, SECRET_COLUMN, secret))
                .execution_options(synchronize_session=False))
            moved += result.rowcount
    except VaultError as exc:
        db.session.rollback()
        _unreadable(report, SECRET_TABLE, rows[0].id, exc)
        return False
    db.session.commit()
    report.reencrypted += moved
    if moved < len(rows):
        report.fence_retries += len(rows) - moved
        return False
    return True


def _reencrypted(credential: Row[Any], old: OperatorCipher,
                 new: OperatorCipher) -> dict[str, str | None]:
    values: dict[str, str | None] = {}
    for column in CREDENTIAL_CT_COLUMNS:
        ciphertext = getattr(credential, column)
        values[column] = (None if ciphertext is None else
                          new.encrypt(CREDENTIALS_TABLE, column,
                                      old.decrypt(CREDENTIALS_TABLE, column, ciphertext)))
    return values


def _destroy_if_unreferenced(old: _KeyRef, report: RotationReport) -> None:
    """Crypto-shred ``old`` if, at commit time, no credential references it.

    On PostgreSQL the credential row and then the key row are locked first, in the
    order a token write takes them (row update, then the foreign-key check's share lock
    on the key), so a write in flight is waited for and then seen by the check. The
    credential's version is bumped with the destruction: a writer that read the version
    before this commit, possibly together with the old key, is fenced off.

    Not covered from here: a writer that picked the old key before its replacement
    existed but reads the credential's version only after this commit. Closing that
    needs the writer to check, after its write, that its key is still live.
    """
    db.session.execute(select(Credential.id)
                       .where(Credential.operator_id == old.operator_id).with_for_update())
    db.session.execute(select(DataKey.id).where(DataKey.id == old.id).with_for_update())
    referenced = select(Credential.id).where(Credential.data_key_id == old.id).exists()
    # A secret stored under the old key after _move_secrets_off read the table (a new
    # endpoint created meanwhile) keeps the key alive until the next run moves it.
    protects_secret = select(WebhookSubscription.id).where(
        WebhookSubscription.data_key_id == old.id,
        WebhookSubscription.secret_ct.is_not(None)).exists()
    result = db.session.execute(
        update(DataKey)
        .where(DataKey.id == old.id, DataKey.destroyed_at.is_(None), ~referenced,
               ~protects_secret)
        .values(destroyed_at=utcnow(), wrapped_key=None, version=DataKey.version + 1)
        .execution_options(synchronize_session=False))
    if result.rowcount == 1:
        db.session.execute(
            update(Credential).where(Credential.operator_id == old.operator_id)
            .values(version=Credential.version + 1)
            .execution_options(synchronize_session=False))
        report.destroyed_keys += 1
    else:
        report.skipped_conflicts += 1  # a write re-attached it; the next run retries
    db.session.commit()


# -- install states --------------------------------------------------------------------------
def _reseal_install_states(vault: Vault, batch_size: int, report: RotationReport,
                           progress: Progress | None, now: datetime) -> None:
    columns = (OAuthState.id, OAuthState.state_hash, OAuthState.code_verifier_ct)
    for batch in _keyset(OAuthState, columns, _open_states_off(report.active_kid, now),
                         batch_size):
        for row in batch:
            _reseal_one(row, vault, report)
        db.session.commit()
        _batch_done("oauth_states", len(batch), report, progress)


def _reseal_one(row: Row[Any], vault: Vault, report: RotationReport) -> None:
    """Re-seal one verifier, fenced on the ciphertext read and on not being consumed."""
    context = _state_context(row.state_hash)
    try:
        verifier = vault.unseal(row.code_verifier_ct, purpose=PURPOSE_INSTALL_STATE,
                                context=context)
    except VaultError as exc:
        _unreadable(report, "oauth_states", row.id, exc)
        return
    sealed = vault.seal(verifier, purpose=PURPOSE_INSTALL_STATE, context=context)
    result = db.session.execute(
        update(OAuthState)
        .where(OAuthState.id == row.id, OAuthState.code_verifier_ct == row.code_verifier_ct,
               OAuthState.consumed_at.is_(None))
        .values(code_verifier_ct=sealed)
        .execution_options(synchronize_session=False))
    if result.rowcount == 1:
        report.resealed += 1
    else:
        report.skipped_conflicts += 1
