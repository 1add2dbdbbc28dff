"""The security checklist's audit: what a fresh deployment leaves open, what each hardening
step changes, and that the audit reads without writing (SQLite and PostgreSQL)."""

from __future__ import annotations

import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import text, update

from tessera.server import audit as audit_log
from tessera.server.checklist import (
    MEASURE_IDS,
    Check,
    Probe,
    audit,
    read_comments,
    with_comments,
)
from tessera.server.config import ServerConfig, load_config
from tessera.server.models import ApiToken
from tessera.server.setup import initialize
from tessera.server.storage import Database
from tessera.server.webhooks import add_endpoint

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)


def _deployment(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> ServerConfig:
    """A data directory as ``server init`` leaves it (the passphrase generated into it)."""
    monkeypatch.delenv("TESSERA_KEY_PASSPHRASE", raising=False)
    monkeypatch.delenv("TESSERA_KEY_PASSPHRASE_FILE", raising=False)
    data_dir = tmp_path / "var"
    initialize(data_dir, None if db_url.startswith("sqlite") else db_url, NOW)
    return load_config(data_dir)


def _executed(measures: list) -> dict[str, str]:  # type: ignore[type-arg]
    return {m.id: m.executed for m in measures}


def _tls_ok(check: Check) -> Probe:
    return Probe(https=True, version="TLSv1.3", plain_http_answered=False, old_tls_refused=True)


def test_a_fresh_deployment_shows_what_init_leaves_open(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _deployment(tmp_path, db_url, monkeypatch)
    measures = audit(Check(config))
    assert tuple(m.id for m in measures) == MEASURE_IDS
    sqlite = db_url.startswith("sqlite")
    assert _executed(measures) == {
        "tls": "unchecked",  # no URL given: not guessed
        "vendor-key-encrypted": "yes",
        "key-passphrase-apart": "no",  # generated into secrets/ by init
        "ca-key-offline": "no",
        "secret-file-modes": "yes",  # init writes every secret, and the SQLite file, 0600
        "admin-api-off": "no",
        "offline-activation-off": "no",
        "web-portal-off": "yes",  # off unless switched on
        "portal-two-step": "n/a",  # no portal
        "metrics-off": "yes",
        "recovery-portal": "n/a",
        "webhooks-https": "n/a",
        "database-credentials": "n/a" if sqlite else "yes",
        "initial-token-revoked": "no",
        "audit-chain-intact": "yes",
    }
    every = {m.id: m for m in measures}
    assert "key-passphrase" in every["key-passphrase-apart"].finding
    assert str(config.ca_key) in every["ca-key-offline"].finding
    for m in measures:  # the seed's columns are all filled in
        assert m.title and m.measure and m.references and m.access_rights and m.finding


def test_each_hardening_step_turns_its_measure_to_yes(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _deployment(tmp_path, db_url, monkeypatch)
    offline = tmp_path / "offline"
    offline.mkdir()
    shutil.move(config.passphrase_file, offline / "key-passphrase")
    shutil.move(config.ca_key, offline / "ca.key")
    toml = config.config_file.read_text()
    config.config_file.write_text(
        toml.replace("admin_api = true", "admin_api = false").replace(
            "offline_activation = true", "offline_activation = false"
        )
    )
    db = Database(config.database)
    try:
        with db.write() as session:
            session.execute(update(ApiToken).where(ApiToken.name == "initial-admin").values(revoked=True))
            add_endpoint(
                session,
                url="https://crm.example.com/hooks",
                secret=None,
                events=[],
                ca_pem=None,
                pepper=config.read_pepper(),
                now=NOW,
            )
    finally:
        db.dispose()
    measures = audit(Check(load_config(config.data_dir), url="https://license.example.com"), probe=_tls_ok)
    executed = _executed(measures)
    assert executed.pop("recovery-portal") == "n/a"
    assert executed.pop("portal-two-step") == "n/a"  # the portal stayed off
    assert executed.pop("database-credentials") == ("n/a" if db_url.startswith("sqlite") else "yes")
    assert set(executed.values()) == {"yes"}, executed


def test_findings_name_what_is_wrong(tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _deployment(tmp_path, db_url, monkeypatch)
    os.chmod(config.vendor_key, 0o644)
    db = Database(config.database)
    try:
        with db.write() as session:
            add_endpoint(
                session,
                url="http://127.0.0.1:9000/relay",  # plain http, allowed to a loopback relay
                secret=None,
                events=[],
                ca_pem=None,
                pepper=config.read_pepper(),
                now=NOW,
            )
            entry = audit_log.append(
                session, at=NOW, actor="admin", action="license.issue", target="2026-000001", details={}
            )
        with db.write() as session:
            session.execute(text("UPDATE audit_log SET details = 'edited' WHERE id = :id"), {"id": entry.id})
    finally:
        db.dispose()
    every = {m.id: m for m in audit(Check(config))}
    assert every["secret-file-modes"].executed == "no"
    assert f"{config.vendor_key} is mode 644" in every["secret-file-modes"].finding
    assert every["webhooks-https"].executed == "no"
    assert "http://127.0.0.1:9000/relay" in every["webhooks-https"].finding
    assert every["audit-chain-intact"].executed == "no"
    assert f"entry {entry.id}: content does not match" in every["audit-chain-intact"].finding


@pytest.mark.parametrize(
    ("probe", "finding"),
    [
        (
            Probe(False, None, True, None, "Connection refused"),
            "no TLS at https://h:1: Connection refused; it answers plain HTTP",
        ),
        (Probe(True, "TLSv1.3", True, True), "the same port also answers plain HTTP"),
        (Probe(True, "TLSv1.2", False, False), "it accepted a TLS 1.1 handshake"),
    ],
)  # fmt: skip
def test_the_tls_measure_fails_on_what_the_probe_saw(
    tmp_path: Path, probe: Probe, finding: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _deployment(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", monkeypatch)
    tls = audit(Check(config, url="https://h:1"), probe=lambda _: probe)[0]
    assert tls.executed == "no" and finding in tls.finding


def test_the_database_measures_say_unchecked_when_it_cannot_be_read_and_nothing_is_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _deployment(tmp_path, f"sqlite:///{tmp_path / 'x.db'}", monkeypatch)
    (config.data_dir / "tessera.db").rename(tmp_path / "elsewhere.db")
    every = {m.id: m for m in audit(Check(config))}
    for ident in ("webhooks-https", "initial-token-revoked", "audit-chain-intact"):
        assert every[ident].executed == "unchecked"
        assert "does not exist" in every[ident].finding
    assert not (config.data_dir / "tessera.db").exists()  # the audit never creates one


def test_database_credentials_in_the_config_or_in_clear_over_the_network(tmp_path: Path) -> None:
    """Judged from the URL alone; the database facts for an unreachable host say unchecked."""
    from tessera.server.checklist import _database_credentials

    def judged(url: str) -> tuple[str, str]:
        m = _database_credentials(ServerConfig(data_dir=tmp_path, database=url))
        return m.executed, m.finding

    assert judged("postgresql+psycopg://tessera@127.0.0.1/lic")[0] == "yes"
    assert judged("postgresql+psycopg://tessera@db.internal/lic?sslmode=verify-full")[0] == "yes"
    state, finding = judged("postgresql+psycopg://tessera:hunter2@db.internal/lic")
    assert state == "no"
    assert "holds the password" in finding and "sslmode is not set" in finding
    assert "hunter2" not in finding


def test_comments_come_from_a_toml_file_of_known_measures() -> None:
    comments = read_comments(
        '[comments]\nadmin-api-off = "the CRM issues licenses over the API"\n', MEASURE_IDS
    )
    assert comments == {"admin-api-off": "the CRM issues licenses over the API"}
    with pytest.raises(ValueError, match="no measure 'admin-api'"):
        read_comments('[comments]\nadmin-api = "x"\n', MEASURE_IDS)
    with pytest.raises(ValueError, match="must be a string"):
        read_comments("[comments]\ntls = 1\n", MEASURE_IDS)
    with pytest.raises(ValueError, match="not TOML"):
        read_comments("[comments\n", MEASURE_IDS)
    with pytest.raises(ValueError, match=r"unknown table \[notes\]"):
        read_comments("[notes]\n", MEASURE_IDS)
    from tessera.server.checklist import Measure

    measure = Measure("tls", "t", "m", "r", "a", "yes", "f")
    assert with_comments([measure], {"tls": "why"})[0].comment == "why"


def test_portal_two_step_sign_in_is_required_of_admins_by_default(
    tmp_path: Path, db_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _deployment(tmp_path, db_url, monkeypatch)
    toml = config.config_file.read_text()
    assert 'two_step_roles = ["admin"]' in toml  # what init writes
    config.config_file.write_text(toml.replace("web_portal = false", "web_portal = true"))
    measure = {m.id: m for m in audit(Check(load_config(config.data_dir)))}["portal-two-step"]
    assert (measure.executed, measure.finding) == ("yes", "required for admin")
    config.config_file.write_text(
        config.config_file.read_text().replace('two_step_roles = ["admin"]', 'two_step_roles = ["support"]')
    )
    measure = {m.id: m for m in audit(Check(load_config(config.data_dir)))}["portal-two-step"]
    assert (measure.executed, measure.finding) == ("no", "required for support; not for admin")
