"""The generic agent of the CLI: no product or version given, it adopts the license's."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from agent_support import LOCKING_ID, PRODUCT, make_license

from tessera.agent import Agent
from tessera.core import Keyring, ManualClock, SigningKey
from tessera.core.errors import VerificationError


def _meta(state: Path) -> dict[str, str]:
    db = sqlite3.connect(state / "state.db")
    try:
        return dict(db.execute("SELECT name, value FROM meta").fetchall())
    finally:
        db.close()


def test_generic_agent_adopts_the_product_of_its_first_license(
    tmp_path: Path, vendor: SigningKey, keyring: Keyring, clock: ManualClock
) -> None:
    state = tmp_path / "state"
    with Agent(state, keyring, None, None, clock=clock, locking_id=LOCKING_ID) as agent:
        assert agent.installation.product is None
        agent.import_license(make_license(vendor, version="9.*"))  # no version known: no range check
        assert agent.check("uniplex")
        assert agent.installation.product == PRODUCT
    meta = _meta(state)
    assert meta["product"] == PRODUCT
    assert meta["lockid_salt"] == "tessera"  # the salt stays what the first open used

    with Agent(state, keyring, None, None, clock=clock, locking_id=LOCKING_ID) as again:
        assert again.installation.product == PRODUCT
        assert again.check("uniplex")
        with pytest.raises(VerificationError, match="for product 'other'"):
            again.import_license(make_license(vendor, product="other", serial="2026-000009"))


def test_an_embedded_agent_keeps_checking_product_and_version(
    tmp_path: Path, vendor: SigningKey, keyring: Keyring, clock: ManualClock
) -> None:
    with Agent(tmp_path / "s", keyring, PRODUCT, "4.2", clock=clock, locking_id=LOCKING_ID) as agent:
        with pytest.raises(VerificationError):
            agent.import_license(make_license(vendor, version="9.*"))
        with pytest.raises(VerificationError):
            agent.import_license(make_license(vendor, product="other"))
        assert _meta(tmp_path / "s")["lockid_salt"] == PRODUCT
