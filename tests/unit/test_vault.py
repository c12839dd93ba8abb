"""Encryption properties (reliability.md T-8) and the settings that feed the keyring.

Pure: no database, no Redis. Example counts are kept modest so the file stays fast.
"""

from __future__ import annotations

import base64
import os

import pytest
from hypothesis import given
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st

from partner_app.security.vault import (
    NONCE_BYTES,
    PURPOSE_DATA_KEYS,
    PURPOSE_INSTALL_STATE,
    PURPOSES,
    DecryptionError,
    KeyDestroyedError,
    Keyring,
    OperatorCipher,
    UnknownKeyError,
    Vault,
    VaultError,
    parse_ciphertext,
)
from partner_app.settings import ConfigError, Settings, parse_encryption_keys

FAST = hyp_settings(max_examples=60, deadline=None)

OLD_ROOT = os.urandom(32)
NEW_ROOT = os.urandom(32)
OLD_VAULT = Vault(Keyring((("k0", OLD_ROOT),)))
ROTATED_VAULT = Vault(Keyring((("k1", NEW_ROOT), ("k0", OLD_ROOT))))
NEW_ONLY_VAULT = Vault(Keyring((("k1", NEW_ROOT),)))

OPERATOR = 7
DATA_KEY_ID = 3
WRAPPED = OLD_VAULT.new_data_key(OPERATOR)
CIPHER = OLD_VAULT.cipher_for(operator_id=OPERATOR, data_key_id=DATA_KEY_ID,
                              wrapped_key=WRAPPED.wrapped_key)
TABLE = "credentials"
COLUMNS = ("access_token_ct", "refresh_token_ct")

# Raw key bytes for ciphers that differ from CIPHER only in what the AAD binds, so a
# failure can only come from the binding, never from a different key.
SAME_KEY = os.urandom(32)
BOUND = OperatorCipher(OPERATOR, DATA_KEY_ID, SAME_KEY)

tokens = st.text(max_size=300)
identifiers = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_:0123456789", min_size=1,
                      max_size=20)


def _b64e(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _body(ciphertext: str) -> bytes:
    return parse_ciphertext(ciphertext)[1]


def _relabel(ciphertext: str, kid: str) -> str:
    version, _kid, body = ciphertext.split(".")
    return f"{version}.{kid}.{body}"


# -- round trip and binding ------------------------------------------------------------------
@FAST
@given(plaintext=tokens, column=st.sampled_from(COLUMNS))
def test_round_trip_for_arbitrary_text(plaintext, column):
    ciphertext = CIPHER.encrypt(TABLE, column, plaintext)
    assert CIPHER.decrypt(TABLE, column, ciphertext) == plaintext
    assert ciphertext.startswith(f"v1.{CIPHER.kid}.")
    if len(plaintext) >= 4:
        assert plaintext not in ciphertext


@FAST
@given(plaintext=tokens, other_operator=st.integers(min_value=1, max_value=10**9))
def test_ciphertext_moved_to_another_operator_fails(plaintext, other_operator):
    if other_operator == OPERATOR:
        other_operator += 1
    ciphertext = BOUND.encrypt(TABLE, "access_token_ct", plaintext)
    elsewhere = OperatorCipher(other_operator, DATA_KEY_ID, SAME_KEY)
    with pytest.raises(DecryptionError):
        elsewhere.decrypt(TABLE, "access_token_ct", ciphertext)


@FAST
@given(plaintext=tokens, table=identifiers, column=identifiers)
def test_ciphertext_moved_to_another_table_or_column_fails(plaintext, table, column):
    ciphertext = BOUND.encrypt(TABLE, "access_token_ct", plaintext)
    if (table, column) == (TABLE, "access_token_ct"):
        assert BOUND.decrypt(table, column, ciphertext) == plaintext
        return
    with pytest.raises(DecryptionError):
        BOUND.decrypt(table, column, ciphertext)


def test_ciphertext_swapped_between_columns_fails():
    access = BOUND.encrypt(TABLE, "access_token_ct", "a")
    with pytest.raises(DecryptionError):
        BOUND.decrypt(TABLE, "refresh_token_ct", access)


@FAST
@given(plaintext=tokens, other_key_id=st.integers(min_value=1, max_value=10**6))
def test_relabelled_data_key_id_fails(plaintext, other_key_id):
    if other_key_id == DATA_KEY_ID:
        other_key_id += 1
    ciphertext = BOUND.encrypt(TABLE, "access_token_ct", plaintext)
    # Same key, other id: the header check passes, so only the AAD can reject it.
    other = OperatorCipher(OPERATOR, other_key_id, SAME_KEY)
    with pytest.raises(DecryptionError):
        other.decrypt(TABLE, "access_token_ct", _relabel(ciphertext, other.kid))
    with pytest.raises(DecryptionError):
        BOUND.decrypt(TABLE, "access_token_ct", _relabel(ciphertext, other.kid))


def test_relabelled_keyring_kid_fails():
    # Both kids hold the same root key: only the kid inside the AAD tells them apart.
    twins = Vault(Keyring((("ka", OLD_ROOT), ("kb", OLD_ROOT))))
    sealed = twins.seal("verifier", purpose=PURPOSE_INSTALL_STATE, context="c")
    with pytest.raises(DecryptionError):
        twins.unseal(_relabel(sealed, "kb"), purpose=PURPOSE_INSTALL_STATE, context="c")
    wrapped = twins.new_data_key(OPERATOR).wrapped_key
    with pytest.raises(DecryptionError):
        twins.cipher_for(operator_id=OPERATOR, data_key_id=1,
                         wrapped_key=_relabel(wrapped, "kb"))


@FAST
@given(plaintext=tokens, data=st.data())
def test_any_single_bit_flip_in_the_body_fails(plaintext, data):
    ciphertext = CIPHER.encrypt(TABLE, "access_token_ct", plaintext)
    body = bytearray(_body(ciphertext))
    bit = data.draw(st.integers(min_value=0, max_value=len(body) * 8 - 1), label="bit")
    body[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(DecryptionError):
        CIPHER.decrypt(TABLE, "access_token_ct", f"v1.{CIPHER.kid}.{_b64e(bytes(body))}")


@FAST
@given(plaintext=tokens, data=st.data())
def test_truncated_ciphertext_raises_decryption_error(plaintext, data):
    ciphertext = CIPHER.encrypt(TABLE, "access_token_ct", plaintext)
    cut = data.draw(st.integers(min_value=0, max_value=len(ciphertext) - 1), label="cut")
    with pytest.raises(DecryptionError):
        CIPHER.decrypt(TABLE, "access_token_ct", ciphertext[:cut])


garbage = st.one_of(
    st.text(max_size=200),
    st.binary(max_size=120).map(lambda raw: f"v1.{CIPHER.kid}.{_b64e(raw)}"),
    st.binary(max_size=120).map(lambda raw: f"v1.k0.{_b64e(raw)}"),
    st.from_regex(r"\Av1\.[A-Za-z0-9_-]{1,8}\.[A-Za-z0-9_=.+/-]{0,80}\Z"),
)


@FAST
@given(value=garbage)
def test_garbage_raises_decryption_error_and_nothing_else(value):
    with pytest.raises(DecryptionError):
        CIPHER.decrypt(TABLE, "access_token_ct", value)


@FAST
@given(value=garbage)
def test_garbage_given_to_the_keyring_raises_only_vault_errors(value):
    # A well-formed header naming a kid the keyring lacks is UnknownKeyError; anything
    # else that is not a valid ciphertext for a known kid is DecryptionError.
    header_kid = value.split(".")[1] if value.count(".") == 2 else None
    expected = DecryptionError if header_kid == "k0" else (DecryptionError, UnknownKeyError)
    with pytest.raises(expected):
        OLD_VAULT.unseal(value, purpose=PURPOSE_INSTALL_STATE, context="c")
    # An empty wrapped key is how a destroyed data key is stored.
    with pytest.raises(expected if value else KeyDestroyedError):
        OLD_VAULT.cipher_for(operator_id=OPERATOR, data_key_id=1, wrapped_key=value)


@pytest.mark.parametrize("suffix", ["\n", " ", "\r\n", "."])
def test_ciphertext_with_trailing_characters_is_rejected(suffix):
    ciphertext = CIPHER.encrypt(TABLE, "access_token_ct", "token")
    with pytest.raises(DecryptionError):
        CIPHER.decrypt(TABLE, "access_token_ct", ciphertext + suffix)
    with pytest.raises(DecryptionError):
        CIPHER.decrypt(TABLE, "access_token_ct", suffix + ciphertext)


def test_no_repeated_nonce_over_100k_encryptions():
    count = 10**5
    nonces = {_body(CIPHER.encrypt(TABLE, "access_token_ct", "same plaintext"))[:NONCE_BYTES]
              for _ in range(count)}
    assert len(nonces) == count


def test_same_plaintext_encrypts_differently_every_time():
    first = CIPHER.encrypt(TABLE, "access_token_ct", "t")
    assert first != CIPHER.encrypt(TABLE, "access_token_ct", "t")


# -- platform secrets --------------------------------------------------------------------------
@FAST
@given(plaintext=tokens, context=identifiers, other=identifiers)
def test_seal_is_bound_to_its_context(plaintext, context, other):
    sealed = OLD_VAULT.seal(plaintext, purpose=PURPOSE_INSTALL_STATE, context=context)
    assert OLD_VAULT.unseal(sealed, purpose=PURPOSE_INSTALL_STATE, context=context) == plaintext
    if other != context:
        with pytest.raises(DecryptionError):
            OLD_VAULT.unseal(sealed, purpose=PURPOSE_INSTALL_STATE, context=other)
    with pytest.raises(DecryptionError):
        OLD_VAULT.unseal(sealed, purpose=PURPOSE_DATA_KEYS, context=context)


def test_seal_uses_the_active_kid_and_old_kids_still_open():
    sealed = OLD_VAULT.seal("v", purpose=PURPOSE_INSTALL_STATE, context="c")
    assert Vault.kid_of(sealed) == "k0"
    assert ROTATED_VAULT.unseal(sealed, purpose=PURPOSE_INSTALL_STATE, context="c") == "v"
    assert Vault.kid_of(ROTATED_VAULT.seal("v", purpose=PURPOSE_INSTALL_STATE,
                                           context="c")) == "k1"


# -- data keys -------------------------------------------------------------------------------
def test_rewrap_moves_the_data_key_to_the_active_kid_and_keeps_it_usable():
    ciphertext = CIPHER.encrypt(TABLE, "access_token_ct", "secret token")
    rewrapped = ROTATED_VAULT.rewrap(operator_id=OPERATOR, wrapped_key=WRAPPED.wrapped_key)
    assert rewrapped.wrapping_kid == "k1" == Vault.kid_of(rewrapped.wrapped_key)
    assert rewrapped.wrapped_key != WRAPPED.wrapped_key
    # Only the new root key is needed from now on: the old kid can be retired.
    cipher = NEW_ONLY_VAULT.cipher_for(operator_id=OPERATOR, data_key_id=DATA_KEY_ID,
                                       wrapped_key=rewrapped.wrapped_key)
    assert cipher.decrypt(TABLE, "access_token_ct", ciphertext) == "secret token"
    assert CIPHER.decrypt(TABLE, "access_token_ct",
                          cipher.encrypt(TABLE, "access_token_ct", "x")) == "x"


def test_wrapped_data_key_is_bound_to_its_operator():
    with pytest.raises(DecryptionError):
        OLD_VAULT.cipher_for(operator_id=OPERATOR + 1, data_key_id=DATA_KEY_ID,
                             wrapped_key=WRAPPED.wrapped_key)
    with pytest.raises(DecryptionError):
        OLD_VAULT.rewrap(operator_id=OPERATOR + 1, wrapped_key=WRAPPED.wrapped_key)


def test_keyring_lacking_the_old_kid_raises_unknown_key_error():
    sealed = OLD_VAULT.seal("v", purpose=PURPOSE_INSTALL_STATE, context="c")
    with pytest.raises(UnknownKeyError):
        NEW_ONLY_VAULT.cipher_for(operator_id=OPERATOR, data_key_id=DATA_KEY_ID,
                                  wrapped_key=WRAPPED.wrapped_key)
    with pytest.raises(UnknownKeyError):
        NEW_ONLY_VAULT.rewrap(operator_id=OPERATOR, wrapped_key=WRAPPED.wrapped_key)
    with pytest.raises(UnknownKeyError):
        NEW_ONLY_VAULT.unseal(sealed, purpose=PURPOSE_INSTALL_STATE, context="c")


@pytest.mark.parametrize("wrapped_key", [None, ""])
def test_destroyed_data_key_raises_key_destroyed_error(wrapped_key):
    with pytest.raises(KeyDestroyedError):
        OLD_VAULT.cipher_for(operator_id=OPERATOR, data_key_id=DATA_KEY_ID,
                             wrapped_key=wrapped_key)


def test_data_keys_are_random_per_call():
    first = OLD_VAULT.cipher_for(operator_id=1, data_key_id=1,
                                 wrapped_key=OLD_VAULT.new_data_key(1).wrapped_key)
    second = OLD_VAULT.cipher_for(operator_id=1, data_key_id=1,
                                  wrapped_key=OLD_VAULT.new_data_key(1).wrapped_key)
    with pytest.raises(DecryptionError):
        second.decrypt(TABLE, "access_token_ct", first.encrypt(TABLE, "access_token_ct", "t"))


def test_reprs_carry_no_key_material():
    assert OLD_ROOT.hex() not in repr(OLD_VAULT.keyring)
    assert repr(OLD_ROOT) not in repr(OLD_VAULT.keyring)
    assert repr(CIPHER) == f"<OperatorCipher operator={OPERATOR} dk{DATA_KEY_ID}>"


# -- keyring -----------------------------------------------------------------------------------
def test_hkdf_gives_a_different_sub_key_per_purpose_and_kid():
    keyring = ROTATED_VAULT.keyring
    sub_keys = {(kid, purpose): keyring.subkey(kid, purpose)
                for kid in keyring.kids for purpose in PURPOSES}
    assert len(set(sub_keys.values())) == len(sub_keys)
    assert all(len(key) == 32 for key in sub_keys.values())
    assert not {OLD_ROOT, NEW_ROOT} & set(sub_keys.values())
    assert keyring.subkey("k0", PURPOSE_DATA_KEYS) == \
        OLD_VAULT.keyring.subkey("k0", PURPOSE_DATA_KEYS)


def test_keyring_rejects_unknown_purposes_and_kids_and_bad_keys():
    with pytest.raises(VaultError):
        OLD_VAULT.keyring.subkey("k0", "oauth-tokens")
    with pytest.raises(UnknownKeyError):
        OLD_VAULT.keyring.subkey("k9", PURPOSE_DATA_KEYS)
    with pytest.raises(VaultError):
        Keyring(())
    with pytest.raises(VaultError, match="'short'") as excinfo:
        Keyring((("short", b"x" * 16),))
    assert "x" * 16 not in str(excinfo.value)


def test_first_key_is_active():
    assert ROTATED_VAULT.keyring.active_kid == "k1"
    assert ROTATED_VAULT.keyring.kids == ("k1", "k0")


# -- settings: ENCRYPTION_KEYS ---------------------------------------------------------------
KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))


def _std(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def test_parse_encryption_keys_keeps_order_and_tolerates_blanks():
    parsed = parse_encryption_keys(f" new:{_std(KEY_B)} , ,old:{_std(KEY_A)},")
    assert parsed == (("new", KEY_B), ("old", KEY_A))


@FAST
@given(raw=st.binary(min_size=32, max_size=32))
def test_parse_encryption_keys_accepts_both_alphabets_with_or_without_padding(raw):
    standard = base64.b64encode(raw).decode()
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    for encoded in (standard, urlsafe, standard.rstrip("="), urlsafe.rstrip("=")):
        assert parse_encryption_keys(f"k_1-x:{encoded}") == (("k_1-x", raw),)


def test_parse_encryption_keys_url_safe_example():
    raw = b"\xfb\xff" * 16  # encodes to "+/" in the standard alphabet, "-_" url-safe
    urlsafe = base64.urlsafe_b64encode(raw).decode()
    assert "-" in urlsafe and "_" in urlsafe
    assert parse_encryption_keys(f"k:{urlsafe}") == (("k", raw),)


@pytest.mark.parametrize(("value", "message"), [
    (f"a:{_std(KEY_A)},a:{_std(KEY_B)}", "appears twice"),
    (f"a:{_std(KEY_A[:16])}", "must decode to 32 bytes, got 16"),
    (f"a:{_std(KEY_A + b'x')}", "must decode to 32 bytes, got 33"),
    ("a:not*base64!", "not valid base64"),
    (f"a:{_std(KEY_A)[:-2]}%%", "not valid base64"),
    (_std(KEY_A), "not 'kid:base64key'"),
    (f"bad kid:{_std(KEY_A)}", "not 'kid:base64key'"),
    (f"{'k' * 33}:{_std(KEY_A)}", "not 'kid:base64key'"),
    ("", "no keys given"),
    (" , ", "no keys given"),
])
def test_parse_encryption_keys_rejects_bad_input_without_echoing_keys(value, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        parse_encryption_keys(value)
    text = str(excinfo.value)
    for secret in (_std(KEY_A), _std(KEY_B), _std(KEY_A)[:20], _std(KEY_A[:16]),
                   "not*base64!"):
        assert secret not in text


# -- settings: production ----------------------------------------------------------------------
REQUIRED_IN_PRODUCTION = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "ENCRYPTION_KEYS",
                          "STORA_CLIENT_ID", "STORA_CLIENT_SECRET", "PUBLIC_BASE_URL")


def test_production_without_configuration_lists_every_missing_variable():
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env({"APP_ENV": "production"})
    problems = excinfo.value.problems
    for name in REQUIRED_IN_PRODUCTION:
        assert any(problem.startswith(name) for problem in problems), name
        assert name in str(excinfo.value)
    assert len(problems) == len(REQUIRED_IN_PRODUCTION)


def test_production_default_mode_is_production():
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env({})
    assert len(excinfo.value.problems) == len(REQUIRED_IN_PRODUCTION)


def test_config_errors_never_contain_secrets_or_key_material():
    short_key = _std(KEY_A[:31])
    secrets_given = {
        "SECRET_KEY": "short-secret",  # too short: reported, but never echoed
        "ENCRYPTION_KEYS": f"good:{_std(KEY_B)},bad:{short_key}",
        "STORA_CLIENT_SECRET": "client-secret-value-123",
    }
    env = {"APP_ENV": "production", "DATABASE_URL": "postgresql://db/app",
           "REDIS_URL": "redis://cache:6379/0", "STORA_CLIENT_ID": "client",
           "PUBLIC_BASE_URL": "http://insecure.example", **secrets_given}
    with pytest.raises(ConfigError) as excinfo:
        Settings.from_env(env)
    text = str(excinfo.value) + repr(excinfo.value.problems)
    assert "SECRET_KEY must be at least 16 characters" in text
    assert "ENCRYPTION_KEYS: key 'bad' must decode to 32 bytes, got 31" in text
    assert "PUBLIC_BASE_URL must use https:// in production" in text
    for value in (*secrets_given.values(), short_key, _std(KEY_B)):
        assert value not in text


def test_settings_repr_hides_secrets():
    settings = Settings.from_env({
        "APP_ENV": "production", "DATABASE_URL": "postgresql://db/app",
        "REDIS_URL": "redis://cache:6379/0", "SECRET_KEY": "s" * 40,
        "ENCRYPTION_KEYS": f"k:{_std(KEY_A)}", "STORA_CLIENT_ID": "client",
        "STORA_CLIENT_SECRET": "client-secret-value-123",
        "PUBLIC_BASE_URL": "https://partner.example"})
    assert settings.encryption_keys == (("k", KEY_A),)
    text = repr(settings)
    for value in ("s" * 40, "client-secret-value-123", _std(KEY_A), repr(KEY_A)):
        assert value not in text
