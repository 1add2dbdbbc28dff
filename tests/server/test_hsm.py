"""The vendor key in an HSM (SoftHSM 2 through PKCS#11): made there at init, used there by
the server, never exported; every mistake is one clear line and leaves nothing behind.
``tests/cli/test_hsm_journey.py`` runs it end to end with real processes."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from pathlib import Path

import pkcs11
import pytest

from tessera.core import sign_document
from tessera.core.errors import KeyFileError
from tessera.core.signing import Keyring
from tessera.core.verify import load_signed
from tessera.server.checklist import Check, audit
from tessera.server.config import ConfigError, HsmConfig, load_config
from tessera.server.hsm import HsmError, HsmSigningKey, generate_key, open_signing_key
from tessera.server.runner import build_state
from tessera.server.setup import initialize

from ..core.test_fileformat import sample
from .softhsm import Token, new_token

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def hsm_of(token: Token, key: str = "tessera-vendor") -> HsmConfig:
    return HsmConfig(module=token.module, token=token.label, key=key)


@pytest.fixture(name="token")
def _token() -> Token:
    return new_token()


@pytest.fixture
def pin(token: Token, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("TESSERA_HSM_PIN", token.pin)
    monkeypatch.delenv("TESSERA_HSM_PIN_FILE", raising=False)
    monkeypatch.delenv("TESSERA_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("TESSERA_KEY_PASSPHRASE_FILE", raising=False)
    return token.pin


def test_init_makes_the_vendor_key_in_the_token_and_no_key_file(
    tmp_path: Path, token: Token, pin: str
) -> None:
    result = initialize(tmp_path / "var", None, NOW, hsm_of(token))
    config = load_config(tmp_path / "var")
    assert config.hsm == hsm_of(token)
    # No key file, and no passphrase: there is nothing to encrypt.
    assert not config.vendor_key.exists()
    assert not config.passphrase_file.exists()
    assert result.passphrase_generated is False
    keyring = Keyring.loads(config.vendor_pub.read_text())
    assert [k.key_id for k in keyring] == [result.key_id]

    state = build_state(tmp_path / "var")
    try:
        key = state.signing_key
        assert isinstance(key, HsmSigningKey)
        assert key.key_id == result.key_id
        # What the server signs verifies with the vendor.pub shipped to agents.
        assert key.public.verify(key.sign(b"a check-in batch root"), b"a check-in batch root")
        # The key never leaves the token, and never shows in a repr.
        with pytest.raises(KeyFileError, match="cannot be exported"):
            key.to_raw()
        with pytest.raises(KeyFileError, match="cannot be exported"):
            key.to_pem(b"passphrase")
        assert token.pin not in repr(key) and result.key_id in repr(key)
    finally:
        state.db.dispose()
        assert isinstance(state.signing_key, HsmSigningKey)
        state.signing_key.close()


def test_a_license_file_signed_in_the_token_verifies_like_any(tmp_path: Path, token: Token, pin: str) -> None:
    initialize(tmp_path / "var", None, NOW, hsm_of(token))
    config = load_config(tmp_path / "var")
    key = open_signing_key(hsm_of(token), token.pin)
    try:
        keyring = Keyring.loads(config.vendor_pub.read_text())
        text = sign_document(sample(), key)
        assert load_signed(text, keyring).document == sample()
        # Ed25519 is deterministic: the token's signature is the one any holder would make.
        assert key.sign(b"license body") == key.sign(b"license body")
    finally:
        key.close()


def test_the_checklist_sees_the_key_in_the_hsm(tmp_path: Path, token: Token, pin: str) -> None:
    initialize(tmp_path / "var", None, NOW, hsm_of(token))
    config = load_config(tmp_path / "var")
    measures = {m.id: m for m in audit(Check(config))}
    assert measures["vendor-key-encrypted"].executed == "yes"
    assert token.label in measures["vendor-key-encrypted"].finding
    assert measures["key-passphrase-apart"].executed == "n/a"
    # A key file left beside it is a finding.
    config.vendor_key.write_text("-----BEGIN ENCRYPTED PRIVATE KEY-----\n")
    measures = {m.id: m for m in audit(Check(config))}
    assert measures["vendor-key-encrypted"].executed == "no"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"pin": "wrong"}, "wrong PIN"),
        ({"token": "no-such-token"}, "no token labelled 'no-such-token'"),
        ({"module": "/nonexistent/libpkcs11.so"}, "does not exist"),
        ({"pin": None}, "TESSERA_HSM_PIN"),
    ],
)
def test_init_refuses_a_token_it_cannot_use_and_makes_nothing(
    tmp_path: Path,
    token: Token,
    pin: str,
    monkeypatch: pytest.MonkeyPatch,
    change: dict[str, str | None],
    words: str,
) -> None:
    hsm = hsm_of(token)
    if "token" in change:
        hsm = dataclasses.replace(hsm, token=str(change["token"]))
    if "module" in change:
        hsm = dataclasses.replace(hsm, module=Path(str(change["module"])))
    if "pin" in change:
        if change["pin"] is None:
            monkeypatch.delenv("TESSERA_HSM_PIN")
        else:
            monkeypatch.setenv("TESSERA_HSM_PIN", str(change["pin"]))
    with pytest.raises(ConfigError, match=words) as raised:
        initialize(tmp_path / "var", None, NOW, hsm)
    assert "\n" not in str(raised.value)
    assert not (tmp_path / "var").exists()


def test_init_never_replaces_a_vendor_key_in_the_token(tmp_path: Path, token: Token, pin: str) -> None:
    initialize(tmp_path / "a", None, NOW, hsm_of(token))
    with pytest.raises(ConfigError, match="holds a key labelled 'tessera-vendor' already"):
        initialize(tmp_path / "b", None, NOW, hsm_of(token))
    assert not (tmp_path / "b").exists()
    # Another label in the same token is another vendor key.
    other = initialize(tmp_path / "c", None, NOW, hsm_of(token, key="second-product"))
    first = load_config(tmp_path / "a").vendor_pub.read_text()
    assert other.key_id not in first


def test_the_server_does_not_start_without_the_pin_or_with_a_wrong_one(
    tmp_path: Path, token: Token, pin: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    initialize(tmp_path / "var", None, NOW, hsm_of(token))
    monkeypatch.setenv("TESSERA_HSM_PIN", "0000")
    with pytest.raises(ConfigError, match="HSM: wrong PIN"):
        build_state(tmp_path / "var")
    monkeypatch.delenv("TESSERA_HSM_PIN")
    pin_file = tmp_path / "pin"
    pin_file.write_text(token.pin + "\n")
    monkeypatch.setenv("TESSERA_HSM_PIN_FILE", str(pin_file))
    state = build_state(tmp_path / "var")  # the PIN from a file works
    state.db.dispose()
    assert isinstance(state.signing_key, HsmSigningKey)
    state.signing_key.close()
    monkeypatch.setenv("TESSERA_HSM_PIN_FILE", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="not readable"):
        build_state(tmp_path / "var")


@pytest.mark.parametrize(
    ("section", "words"),
    [
        ('[hsm]\nmodule = ""\ntoken = "t"\n', r"\[hsm\] module must be a non-empty string"),
        ('[hsm]\nmodule = "/m.so"\n', r"\[hsm\] token must be"),
        ('[hsm]\nmodule = "/m.so"\ntoken = "t"\nslot = 1\n', "unknown key"),
        ('hsm = "yes"\n', r"\[hsm\] must be a table"),
    ],
)
def test_a_damaged_hsm_section_is_one_clear_error(tmp_path: Path, section: str, words: str) -> None:
    data_dir = tmp_path / "var"
    data_dir.mkdir()
    (data_dir / "tessera.toml").write_text(section + '[server]\ndatabase = "sqlite:///x.db"\n')
    with pytest.raises(ConfigError, match=words):
        load_config(data_dir)


def _tokens_dir(token: Token) -> Path:
    return token.conf.parent / "tokens"


def test_signing_resumes_when_the_token_comes_back(token: Token, pin: str) -> None:
    # QA: with the token directory moved away and back, every signature still failed with
    # ObjectHandleInvalid (a 503 on every activation) until the server was restarted.
    generate_key(hsm_of(token), pin)
    key = open_signing_key(hsm_of(token))
    try:
        before = key.sign(b"a batch root")
        tokens = _tokens_dir(token)
        away = tokens.with_name("tokens.away")
        tokens.rename(away)
        try:
            for _ in range(2):  # gone: refused each time, one clear error, no crash
                with pytest.raises(HsmError):
                    key.sign(b"a batch root")
        finally:
            away.rename(tokens)
        assert key.sign(b"a batch root") == before  # the very next signature succeeds
    finally:
        key.close()


def test_a_session_lost_under_the_key_is_reopened_at_once(token: Token, pin: str) -> None:
    # The module finalized and initialized again (an HSM restart looks alike): the key's
    # session and handle are dead while the token is fine; the next signature still works.
    generate_key(hsm_of(token), pin)
    key = open_signing_key(hsm_of(token))
    try:
        before = key.sign(b"x")
        pkcs11.lib(str(token.module)).reinitialize()
        assert key.sign(b"x") == before
        assert key.sign(b"x") == before
    finally:
        key.close()


def test_a_closed_key_does_not_reopen(token: Token, pin: str) -> None:
    generate_key(hsm_of(token), pin)
    key = open_signing_key(hsm_of(token))
    key.close()
    with pytest.raises(HsmError, match="cannot be re-opened"):
        key.sign(b"x")


def test_a_reopened_session_signs_only_with_the_same_vendor_key(token: Token, pin: str) -> None:
    # Between the outage and the re-open the label may name another key (a token replaced
    # by a fresh one): signing with it would orphan what agents trust, so nothing is signed.
    generate_key(hsm_of(token), pin)
    key = open_signing_key(hsm_of(token))
    try:
        lib = pkcs11.lib(str(token.module))
        lib.reinitialize()  # the key's session is gone
        with lib.get_token(token_label=token.label).open(rw=True, user_pin=pin) as session:
            for item in list(session.get_objects({pkcs11.Attribute.LABEL: "tessera-vendor"})):
                item.destroy()
        generate_key(hsm_of(token), pin)
        with pytest.raises(HsmError):
            key.sign(b"x")
        with pytest.raises(HsmError, match="another key"):
            key.sign(b"x")
    finally:
        key.close()
