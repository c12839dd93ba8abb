"""Key rotation against the real database (reliability.md T-8): every row moves to the
active kid, nothing is lost, an interrupted run resumes, and rotation running alongside
token writes never loses a token.

Tokens are stored straight through ``store_token_set`` with made-up values; the
rotated deployment is a second app on the same database whose ``ENCRYPTION_KEYS`` puts
a new key first and keeps the old one.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import os
import threading
import time
from collections import Counter
from datetime import timedelta

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.exc import OperationalError

from partner_app import create_app
from partner_app.connections.credentials import (
    StaleCredential,
    cipher_for_key,
    live_data_key,
    store_token_set,
)
from partner_app.connections.models import Credential, OAuthState, Operator, OperatorStatus
from partner_app.db import db, utcnow
from partner_app.security.models import DataKey
from partner_app.security.rotation import (
    RotationReport,
    pending_rotation_count,
    rotate_keys,
)
from partner_app.security.vault import (
    PURPOSE_INSTALL_STATE,
    Keyring,
    UnknownKeyError,
    Vault,
)
from partner_app.settings import parse_encryption_keys
from partner_app.stora.oauth import TokenSet
from tests.conftest import BACKEND, TEST_ENCRYPTION_KEYS, make_settings

OLD_KID = TEST_ENCRYPTION_KEYS.split(":", 1)[0]
NEW_KID = "new"
NEW_ENTRY = f"{NEW_KID}:{base64.b64encode(b'rotation-test-key-00000000000000').decode()}"
ROTATED_KEYS = f"{NEW_ENTRY},{TEST_ENCRYPTION_KEYS}"


class Interrupted(Exception):
    """Raised from a progress callback to stop a run half-way."""


@pytest.fixture(scope="module")
def rotated_app(backend_urls):
    """The same deployment after the key change: new key first, old key still known."""
    application = create_app(make_settings(backend_urls, ENCRYPTION_KEYS=ROTATED_KEYS))
    yield application
    with application.app_context():
        db.engine.dispose()


@pytest.fixture
def old_vault(app_ctx) -> Vault:
    return app_ctx.extensions["vault"]


@pytest.fixture
def new_vault(rotated_app) -> Vault:
    return rotated_app.extensions["vault"]


def _token_set(operator_id: int, n: int) -> TokenSet:
    now = utcnow()
    return TokenSet(access_token=f"access-{operator_id}-{n}",
                    refresh_token=f"refresh-{operator_id}-{n}",
                    expires_at=now + timedelta(hours=2), created_at=now,
                    scope="public.site:read")


def _connect(vault: Vault, count: int, *, with_credentials: bool = True) -> list[int]:
    """Operators with a data key and (by default) a stored token pair, committed."""
    ids = []
    for _ in range(count):
        operator = Operator(status=OperatorStatus.ACTIVE, name="Rotation Storage")
        db.session.add(operator)
        db.session.flush()
        operator.stora_identity = f"id:rot-{operator.id}"
        live_data_key(operator, vault=vault)
        if with_credentials:
            store_token_set(operator, _token_set(operator.id, 0), vault=vault, now=utcnow())
        ids.append(operator.id)
    db.session.commit()
    return ids


def _stored_tokens(operator_id: int, vault: Vault) -> tuple[str, str | None]:
    credential = db.session.scalars(
        select(Credential).where(Credential.operator_id == operator_id)
        .execution_options(populate_existing=True)).one()
    key = db.session.get(DataKey, credential.data_key_id, populate_existing=True)
    cipher = cipher_for_key(key, vault=vault)
    refresh = credential.refresh_token_ct
    return (cipher.decrypt("credentials", "access_token_ct", credential.access_token_ct),
            cipher.decrypt("credentials", "refresh_token_ct", refresh) if refresh else None)


def _live_keys_by_kid() -> dict[str, int]:
    db.session.expire_all()
    return dict(db.session.execute(
        select(DataKey.wrapping_kid, func.count())
        .where(DataKey.destroyed_at.is_(None)).group_by(DataKey.wrapping_kid)).all())


def _add_state(vault: Vault, *, expires_in: timedelta = timedelta(minutes=10),
               consumed: bool = False) -> tuple[int, str]:
    """An install attempt with a sealed PKCE verifier; returns (id, verifier)."""
    state_hash = hashlib.sha256(os.urandom(16)).hexdigest()
    verifier = base64.urlsafe_b64encode(os.urandom(32)).decode()
    row = OAuthState(
        state_hash=state_hash, browser_hash=hashlib.sha256(b"browser").hexdigest(),
        code_verifier_ct=vault.seal(verifier, purpose=PURPOSE_INSTALL_STATE,
                                    context=f"oauth_states:{state_hash}"),
        redirect_uri="http://127.0.0.1:5999/oauth/callback", issuer="http://127.0.0.1:9",
        expires_at=utcnow() + expires_in, consumed_at=utcnow() if consumed else None)
    db.session.add(row)
    db.session.commit()
    return row.id, verifier


def _state_verifier(state_id: int, vault: Vault) -> str:
    row = db.session.get(OAuthState, state_id, populate_existing=True)
    return vault.unseal(row.code_verifier_ct, purpose=PURPOSE_INSTALL_STATE,
                        context=f"oauth_states:{row.state_hash}")


def _rotate(application, **kwargs) -> RotationReport:
    db.session.commit()  # the test's own session must hold no transaction open
    with application.app_context():
        return rotate_keys(vault=application.extensions["vault"], **kwargs)


def _pending(application, *, new_data_keys: bool = False) -> int:
    db.session.commit()
    with application.app_context():
        return pending_rotation_count(vault=application.extensions["vault"],
                                      new_data_keys=new_data_keys)


# -- re-wrap -----------------------------------------------------------------------------------
def test_rotation_rewraps_every_data_key_and_every_token_still_decrypts(
        app_ctx, rotated_app, old_vault, new_vault, caplog):
    operators = _connect(old_vault, 5)
    spare = _connect(old_vault, 1, with_credentials=False)
    open_state, verifier = _add_state(old_vault)
    consumed_state, _ = _add_state(old_vault, consumed=True)
    expired_state, _ = _add_state(old_vault, expires_in=timedelta(seconds=-1))
    credential_versions = dict(db.session.execute(
        select(Credential.operator_id, Credential.version)).all())
    assert _live_keys_by_kid() == {OLD_KID: 6}
    assert _pending(rotated_app) == 6 + 1

    caplog.set_level(logging.INFO)
    report = _rotate(rotated_app, batch_size=4)

    assert (report.rewrapped, report.resealed, report.skipped_conflicts, report.failed) == \
        (6, 1, 0, 0)
    assert report.remaining_by_kid == {} and report.remaining == 0
    assert _live_keys_by_kid() == {NEW_KID: 6}
    assert _pending(rotated_app) == 0
    assert "6 data keys re-wrapped" in report.summary()
    assert report.summary().endswith("remaining: none")
    # A re-wrap leaves the data keys, so the token rows, untouched.
    assert dict(db.session.execute(
        select(Credential.operator_id, Credential.version)).all()) == credential_versions
    new_only = Vault.from_settings(parse_encryption_keys(NEW_ENTRY))
    for operator_id in operators:
        expected = (f"access-{operator_id}-0", f"refresh-{operator_id}-0")
        assert _stored_tokens(operator_id, new_vault) == expected
        # The old kid can now be retired: the new key alone opens everything.
        assert _stored_tokens(operator_id, new_only) == expected
        with pytest.raises(UnknownKeyError):
            _stored_tokens(operator_id, old_vault)
    assert db.session.scalars(select(DataKey.version)
                              .where(DataKey.operator_id == spare[0])).one() == 2
    assert _state_verifier(open_state, new_only) == verifier
    # Finished install attempts are left alone: they can never be used again.
    for state_id in (consumed_state, expired_state):
        row = db.session.get(OAuthState, state_id)
        assert Vault.kid_of(row.code_verifier_ct) == OLD_KID

    logged = " ".join(record.getMessage() + repr(vars(record)) for record in caplog.records)
    assert "keys.rotation.done" in logged
    assert "access-" not in logged and "refresh-" not in logged and "v1." not in logged


def test_rotation_with_nothing_to_do_is_a_no_op(app_ctx, rotated_app, new_vault):
    _connect(new_vault, 2)
    assert _pending(rotated_app) == 0
    report = _rotate(rotated_app)
    assert (report.rewrapped, report.resealed, report.remaining) == (0, 0, 0)


def test_rotation_resumes_after_an_interruption(app_ctx, rotated_app, old_vault, new_vault):
    operators = _connect(old_vault, 7)
    calls = []

    def stop_after_first_batch(rows: int) -> None:
        calls.append(rows)
        raise Interrupted

    with pytest.raises(Interrupted):
        _rotate(rotated_app, batch_size=3, progress=stop_after_first_batch)
    assert calls == [3]
    assert _live_keys_by_kid() == {NEW_KID: 3, OLD_KID: 4}  # the first batch committed
    assert _pending(rotated_app) == 4

    seen = []
    report = _rotate(rotated_app, batch_size=3, progress=seen.append)
    assert seen == [3, 1]
    assert (report.rewrapped, report.remaining) == (4, 0)
    assert _live_keys_by_kid() == {NEW_KID: 7}
    for operator_id in operators:
        assert _stored_tokens(operator_id, new_vault)[0] == f"access-{operator_id}-0"


class _MeddlingVault(Vault):
    """A vault that lets a concurrent writer in, once, at a chosen point of rotation."""

    def __init__(self, keyring: Keyring, *, on_rewrap=None, on_cipher=None):
        super().__init__(keyring)
        self._on_rewrap, self._on_cipher = on_rewrap, on_cipher

    def rewrap(self, *, operator_id, wrapped_key):
        rewrapped = super().rewrap(operator_id=operator_id, wrapped_key=wrapped_key)
        if self._on_rewrap:
            self._on_rewrap(operator_id)
            self._on_rewrap = None
        return rewrapped

    def cipher_for(self, *, operator_id, data_key_id, wrapped_key):
        cipher = super().cipher_for(operator_id=operator_id, data_key_id=data_key_id,
                                    wrapped_key=wrapped_key)
        if self._on_cipher:
            self._on_cipher(operator_id)
            self._on_cipher = None
        return cipher


def test_rewrap_skips_a_key_changed_under_it_and_the_next_run_takes_it(
        app_ctx, rotated_app, old_vault, new_vault):
    operators = _connect(old_vault, 3)

    def bump_elsewhere(operator_id: int) -> None:
        with db.engine.begin() as conn:  # another connection, committed at once
            conn.execute(update(DataKey).where(DataKey.operator_id == operator_id)
                         .values(version=DataKey.version + 1))

    meddling = _MeddlingVault(new_vault.keyring, on_rewrap=bump_elsewhere)
    db.session.commit()
    with rotated_app.app_context():
        report = rotate_keys(vault=meddling)
    assert (report.rewrapped, report.skipped_conflicts) == (2, 1)
    assert report.remaining_by_kid == {OLD_KID: 1}
    assert "1 skipped" in report.summary()

    report = _rotate(rotated_app)
    assert (report.rewrapped, report.skipped_conflicts, report.remaining) == (1, 0, 0)
    for operator_id in operators:
        assert _stored_tokens(operator_id, new_vault)[0] == f"access-{operator_id}-0"


def test_unreadable_rows_are_reported_and_do_not_stop_the_run(
        app_ctx, rotated_app, old_vault, new_vault, caplog):
    _connect(old_vault, 2)
    gone = Vault(Keyring((("gone", os.urandom(32)),)))  # a kid removed too early
    orphan = _connect(gone, 1, with_credentials=False)[0]
    _add_state(gone)
    tampered_id, _ = _add_state(old_vault)
    row = db.session.get(OAuthState, tampered_id)
    row.code_verifier_ct = old_vault.seal("x", purpose=PURPOSE_INSTALL_STATE,
                                          context="oauth_states:another-row")
    db.session.commit()

    caplog.set_level(logging.INFO)
    report = _rotate(rotated_app, batch_size=1)
    assert (report.rewrapped, report.failed) == (2, 3)
    assert report.remaining_by_kid == {"gone": 2, OLD_KID: 1}
    assert "3 unreadable" in report.summary()
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert {(record.table, record.error) for record in errors} == {
        ("data_keys", "UnknownKeyError"), ("oauth_states", "UnknownKeyError"),
        ("oauth_states", "DecryptionError")}
    assert db.session.scalars(select(DataKey.wrapping_kid)
                              .where(DataKey.operator_id == orphan)).one() == "gone"


# -- new data keys -------------------------------------------------------------------------------
def test_new_data_keys_reencrypts_credentials_and_destroys_old_keys(
        app_ctx, rotated_app, old_vault, new_vault):
    operators = _connect(old_vault, 4)
    spare = _connect(old_vault, 1, with_credentials=False)[0]
    old_keys = dict(db.session.execute(select(DataKey.operator_id, DataKey.id)).all())
    versions = dict(db.session.execute(select(Credential.operator_id, Credential.version)).all())
    assert _pending(rotated_app, new_data_keys=True) == 5

    report = _rotate(rotated_app, batch_size=2, new_data_keys=True)

    assert (report.created_keys, report.reencrypted, report.destroyed_keys,
            report.skipped_conflicts, report.failed, report.remaining) == (5, 4, 5, 0, 0, 0)
    assert _live_keys_by_kid() == {NEW_KID: 5}
    assert _pending(rotated_app, new_data_keys=True) == 0
    for operator_id, old_key_id in old_keys.items():
        old = db.session.get(DataKey, old_key_id, populate_existing=True)
        assert old.wrapped_key is None and old.destroyed_at is not None
        (live,) = db.session.scalars(select(DataKey).where(
            DataKey.operator_id == operator_id, DataKey.destroyed_at.is_(None))).all()
        assert (live.wrapping_kid, live.version) == (NEW_KID, 1) and live.id != old_key_id
        if operator_id == spare:
            continue
        credential = db.session.scalars(
            select(Credential).where(Credential.operator_id == operator_id)).one()
        assert credential.data_key_id == live.id
        assert credential.version > versions[operator_id]  # every write is fenced
        assert _stored_tokens(operator_id, new_vault) == (f"access-{operator_id}-0",
                                                          f"refresh-{operator_id}-0")
    # Nothing references a destroyed key.
    assert db.session.scalar(select(func.count()).select_from(Credential).join(
        DataKey, DataKey.id == Credential.data_key_id).where(
        DataKey.destroyed_at.is_not(None))) == 0
    assert set(old_keys) == {*operators, spare}

    again = _rotate(rotated_app, new_data_keys=True)
    assert (again.created_keys, again.reencrypted, again.destroyed_keys) == (0, 0, 0)


def test_new_data_keys_also_replaces_keys_that_were_only_rewrapped(
        app_ctx, rotated_app, old_vault, new_vault):
    operators = _connect(old_vault, 2)
    assert _rotate(rotated_app).rewrapped == 2
    assert _pending(rotated_app, new_data_keys=True) == 2
    report = _rotate(rotated_app, new_data_keys=True)
    assert (report.created_keys, report.reencrypted, report.destroyed_keys) == (2, 2, 2)
    for operator_id in operators:
        assert _stored_tokens(operator_id, new_vault)[0] == f"access-{operator_id}-0"


def test_new_data_keys_never_overwrites_a_token_written_during_reencryption(
        app_ctx, rotated_app, old_vault, new_vault):
    (operator_id,) = _connect(old_vault, 1)

    def refresh_elsewhere(op_id: int) -> None:
        # Runs after rotation read the credential and before it writes it back.
        with rotated_app.app_context():
            store_token_set(db.session.get(Operator, op_id), _token_set(op_id, 1),
                            vault=new_vault, now=utcnow())
            db.session.commit()

    meddling = _MeddlingVault(new_vault.keyring, on_cipher=refresh_elsewhere)
    db.session.commit()
    with rotated_app.app_context():
        report = rotate_keys(vault=meddling, new_data_keys=True)

    assert report.fence_retries == 1
    # The concurrent write already went to the new key: nothing left to re-encrypt.
    assert (report.created_keys, report.reencrypted, report.destroyed_keys) == (1, 0, 1)
    assert _stored_tokens(operator_id, new_vault) == (f"access-{operator_id}-1",
                                                      f"refresh-{operator_id}-1")
    assert _live_keys_by_kid() == {NEW_KID: 1}


def test_resumed_new_data_keys_run_reuses_the_replacement_key(
        app_ctx, rotated_app, old_vault, new_vault):
    operators = _connect(old_vault, 3)

    def interrupt(operator_id: int) -> None:
        raise Interrupted  # after the first replacement key committed, before re-encrypting

    meddling = _MeddlingVault(new_vault.keyring, on_cipher=interrupt)
    db.session.commit()
    with rotated_app.app_context(), pytest.raises(Interrupted):
        rotate_keys(vault=meddling, new_data_keys=True)
    assert _live_keys_by_kid() == {NEW_KID: 1, OLD_KID: 3}
    # Token writes meanwhile go to the newest live key, the replacement.
    store_token_set(db.session.get(Operator, operators[0]), _token_set(operators[0], 1),
                    vault=new_vault, now=utcnow())
    db.session.commit()
    assert _pending(rotated_app, new_data_keys=True) == 3

    report = _rotate(rotated_app, batch_size=2, new_data_keys=True)
    assert (report.created_keys, report.reencrypted, report.destroyed_keys) == (2, 2, 3)
    assert _live_keys_by_kid() == {NEW_KID: 3}
    assert _stored_tokens(operators[0], new_vault)[0] == f"access-{operators[0]}-1"
    for operator_id in operators[1:]:
        assert _stored_tokens(operator_id, new_vault)[0] == f"access-{operator_id}-0"


# -- concurrency ---------------------------------------------------------------------------------
def test_rotation_concurrent_with_token_writes_loses_nothing(
        app_ctx, rotated_app, old_vault, new_vault):
    """Writers keep storing new token pairs (each write its own app context, session and
    commit) while new-data-key rotation runs; afterwards every operator holds exactly
    the last pair its writer committed, under a live key on the new kid."""
    operators = _connect(old_vault, 12)
    last_written: dict[int, str] = {operator_id: f"access-{operator_id}-0"
                                    for operator_id in operators}
    rotating = threading.Event()
    rotation_over = threading.Event()
    stats: Counter[str] = Counter()
    errors: list[BaseException] = []

    def write(operator_id: int, n: int) -> bool:
        with rotated_app.app_context():
            try:
                operator = db.session.get(Operator, operator_id)
                store_token_set(operator, _token_set(operator_id, n), vault=new_vault,
                                now=utcnow())
                db.session.commit()
            except StaleCredential:
                db.session.rollback()
                stats["stale"] += 1
                return False
            except OperationalError as exc:  # SQLite: the writer lock stayed busy
                if BACKEND == "services":
                    raise
                db.session.rollback()
                stats[f"busy: {exc.orig}"] += 1
                return False
        stats["during rotation" if rotating.is_set() else "outside rotation"] += 1
        return True

    def writer(owned: list[int]) -> None:
        try:
            n, rounds_after = 0, 0
            while rounds_after < 2:  # keep writing for two full rounds after rotation
                if rotation_over.is_set():
                    rounds_after += 1
                n += 1
                for operator_id in owned:
                    for _attempt in range(50):
                        if write(operator_id, n):
                            last_written[operator_id] = f"access-{operator_id}-{n}"
                            break
                    else:
                        raise AssertionError(f"writer for operator {operator_id} starved")
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    writers = [threading.Thread(target=writer, args=(operators[i::2],), daemon=True)
               for i in range(2)]
    for thread in writers:
        thread.start()
    deadline = time.monotonic() + 10
    while stats["outside rotation"] < 4 and time.monotonic() < deadline:
        time.sleep(0.01)

    db.session.commit()
    reports: list[RotationReport] = []
    try:
        with rotated_app.app_context():
            rotating.set()
            for _run in range(20):
                reports.append(rotate_keys(vault=new_vault, batch_size=3,
                                           new_data_keys=True))
                if reports[-1].remaining == 0:
                    break
            rotating.clear()
    finally:
        rotation_over.set()
        for thread in writers:
            thread.join(timeout=120)
    assert not errors, errors
    assert not any(thread.is_alive() for thread in writers)
    assert reports[-1].remaining == 0, [report.summary() for report in reports]
    assert stats["during rotation"] > 0, stats  # the writes really overlapped rotation
    assert sum(report.destroyed_keys for report in reports) == len(operators)

    with rotated_app.app_context():
        assert _live_keys_by_kid() == {NEW_KID: len(operators)}
        for operator_id in operators:
            access, refresh = _stored_tokens(operator_id, new_vault)
            assert access == last_written[operator_id]
            assert refresh == last_written[operator_id].replace("access-", "refresh-")


def _subscription_under_old_key(old_vault):
    """A connected operator with an active subscription whose secret ("whsec-1") is
    sealed under its old-kid data key: (data key, that key's cipher, subscription)."""
    from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE
    from partner_app.webhooks.models import WebhookSubscription

    (operator_id,) = _connect(old_vault, 1)
    key = db.session.scalars(select(DataKey).where(DataKey.operator_id == operator_id)).one()
    cipher = old_vault.cipher_for(operator_id=operator_id, data_key_id=key.id,
                                  wrapped_key=key.wrapped_key)
    sub = WebhookSubscription(operator_id=operator_id, url="https://p.example/w",
                              status="active", data_key_id=key.id,
                              secret_ct=cipher.encrypt(SECRET_TABLE, SECRET_COLUMN, "whsec-1"))
    db.session.add(sub)
    db.session.commit()
    return key, cipher, sub


def test_new_data_keys_move_webhook_secrets_then_shred_the_old_key(
        app_ctx, rotated_app, old_vault, new_vault):
    from partner_app.webhooks.inbox import subscription_secret
    from partner_app.webhooks.models import WebhookSubscription

    key, _, sub = _subscription_under_old_key(old_vault)
    old_ciphertext = sub.secret_ct

    report = _rotate(rotated_app, new_data_keys=True)

    assert report.destroyed_keys == 1
    db.session.expire_all()
    shredded = db.session.get(DataKey, key.id)
    assert shredded.destroyed_at is not None and shredded.wrapped_key is None
    moved = db.session.get(WebhookSubscription, sub.id)
    assert moved.data_key_id != key.id and moved.secret_ct != old_ciphertext
    assert subscription_secret(moved, vault=new_vault) == "whsec-1"


def test_a_secret_written_under_the_old_key_during_rotation_keeps_it_alive(
        app_ctx, rotated_app, old_vault, new_vault):
    """The fence: a subscription whose ciphertext changed after rotation read it is not
    overwritten, and the key under it is not shredded; the next run moves it."""
    from sqlalchemy import event

    from partner_app.webhooks.inbox import SECRET_COLUMN, SECRET_TABLE, subscription_secret
    from partner_app.webhooks.models import WebhookSubscription

    key, cipher, sub = _subscription_under_old_key(old_vault)
    sub_id = sub.id
    with rotated_app.app_context():
        engine = db.engine  # the engine rotation writes through
    swapped = []

    def new_secret_lands(conn, cursor, statement, parameters, context, executemany):
        # Just before rotation's compare-and-swap, a new endpoint's secret is stored.
        if statement.startswith("UPDATE webhook_subscriptions") and not swapped:
            swapped.append(True)
            with engine.connect() as other:
                other.execute(update(WebhookSubscription)
                              .where(WebhookSubscription.id == sub_id)
                              .values(secret_ct=cipher.encrypt(SECRET_TABLE, SECRET_COLUMN,
                                                               "whsec-2")))
                other.commit()

    event.listen(engine, "before_cursor_execute", new_secret_lands)
    try:
        first = _rotate(rotated_app, new_data_keys=True)
    finally:
        event.remove(engine, "before_cursor_execute", new_secret_lands)

    assert swapped and first.destroyed_keys == 0 and first.fence_retries >= 1
    db.session.expire_all()
    assert db.session.get(DataKey, key.id).destroyed_at is None
    assert subscription_secret(db.session.get(WebhookSubscription, sub_id),
                               vault=new_vault) == "whsec-2"

    second = _rotate(rotated_app, new_data_keys=True)

    assert second.destroyed_keys == 1
    db.session.expire_all()
    assert subscription_secret(db.session.get(WebhookSubscription, sub_id),
                               vault=new_vault) == "whsec-2"
