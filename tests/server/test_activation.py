"""Online activation and Connect check-ins at the service level, on every backend."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from tessera.core.clock import ManualClock
from tessera.core.errors import BindingError, DecryptionError
from tessera.core.protocol import ActivationRequest, ServerResponse
from tessera.core.sealing import unseal
from tessera.core.signing import Keyring, SigningKey
from tessera.core.verify import check_binding, load_signed
from tessera.server import activation, licenses
from tessera.server.app import ServerState
from tessera.server.errors import Forbidden, NotFound
from tessera.server.models import Checkin, LicenseRow
from tessera.server.schemas import LicenseUpdate
from tessera.server.tokens import Principal

from .conftest import START
from .helpers import FakeAgent, activate, agent, check_in, setup_license


def test_activation_returns_a_signed_license_bound_to_the_machine_and_agent(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START)
    a = agent(1)
    response = activate(state, a, key, keyring)
    assert response.serial == serial and response.kind == "activation"
    assert response.server_time == START
    signed = load_signed(response.license or "", keyring)
    lic = signed.document
    assert lic.serial == serial and lic.licensee == "myCompany, Berlin"
    assert lic.locking_id == a.locking_id and lic.agent_key == a.key.public.to_base64()
    assert lic.location().get("uniplex").count == 5  # type: ignore[union-attr]
    check_binding(lic, a.locking_id)
    with pytest.raises(BindingError):
        check_binding(lic, agent(2).locking_id)


def test_a_key_for_another_product_is_refused_before_it_takes_a_slot(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START, machines=1)
    a = agent(1)
    wrong = ActivationRequest.create(key, a.locking_id, a.system_id, a.key, product="reportix")
    with pytest.raises(Forbidden, match="product 'cortex', not 'reportix'"), state.db.write() as session:
        activation.activate(session, wrong, START, state.signing_key, state.pepper)
    with state.db.read() as session:
        assert licenses.license_view(licenses.get_license(session, serial))["machines"] == []
    right = ActivationRequest.create(key, a.locking_id, a.system_id, a.key, product="cortex")
    with state.db.write() as session:
        raw = activation.activate(session, right, START, state.signing_key, state.pepper).to_json()
    assert ServerResponse.from_json(raw, keyring, right.nonce).serial == serial


def test_machine_limit_and_reactivation_reuse_the_slot(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START, machines=2)
    first, second = agent(1), agent(2)
    activate(state, first, key, keyring)
    activate(state, second, key, keyring)
    with pytest.raises(Forbidden, match=r"no free machine left.*2 of 2"):
        activate(state, agent(3), key, keyring)
    # The same machine again, with a new agent key and one changed component: same slot.
    again = FakeAgent(first.machine, first.system_id, facts=[*first.facts[:3], ("c", "new cpu")])
    activate(state, again, key, keyring)
    # A reinstalled system (new system id) on the same hardware: same slot too.
    reinstalled = FakeAgent(second.machine, "system-reinstalled-1")
    activate(state, reinstalled, key, keyring)
    with state.db.read() as session:
        view = licenses.license_view(licenses.get_license(session, serial))
    assert [m["slot"] for m in view["machines"]] == [0, 1]
    assert view["machines"][1]["system_id"] == "system-reinstalled-1"
    # The old agent key of the first machine is no longer accepted; the new one is.
    with pytest.raises(Forbidden, match="signature"):
        check_in(state, first, key, keyring)
    assert check_in(state, again, key, keyring).directives == ()


def test_unknown_key_is_404_and_changes_nothing(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    setup_license(state, admin, START)
    with pytest.raises(NotFound):
        activate(state, agent(1), "AAAAA-AAAAA-AAAAA-AAAAA-AAAAA", keyring)
    with state.db.read() as session:
        assert session.execute(select(LicenseRow)).scalar_one().machines == []


def test_checkin_delivers_a_central_change_once(
    state: ServerState, admin: Principal, keyring: Keyring, clock: ManualClock
) -> None:
    serial, key = setup_license(state, admin, START)
    a = agent(1)
    activate(state, a, key, keyring)
    assert check_in(state, a, key, keyring).license is None
    with state.db.write() as session:
        licenses.update_license(
            session,
            admin,
            serial,
            LicenseUpdate.model_validate({"entitlements": [{"feature": "uniplex", "count": 9}]}),
            state.now(),
        )
    clock.advance(hours=1)
    response = check_in(state, a, key, keyring)
    assert response.server_time == START + timedelta(hours=1)
    lic = load_signed(response.license or "", keyring).document
    assert lic.revision == 2 and lic.location().get("uniplex").count == 9  # type: ignore[union-attr]
    assert lic.agent_key == a.key.public.to_base64()
    assert check_in(state, a, key, keyring).license is None
    with state.db.read() as session:
        assert len(session.execute(select(Checkin)).scalars().all()) == 3


def test_a_central_change_whose_answer_was_lost_is_sent_again(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    """The server recorded revision 2 as delivered, but the answer never reached the agent,
    which still names revision 1: it gets revision 2 again, until it names it."""
    serial, key = setup_license(state, admin, START)
    a = agent(1)
    activate(state, a, key, keyring)
    with state.db.write() as session:
        licenses.update_license(
            session, admin, serial,
            LicenseUpdate.model_validate({"entitlements": [{"feature": "uniplex", "count": 9}]}),
            state.now(),
        )  # fmt: skip
    assert check_in(state, a, key, keyring, revision=1).license is not None  # lost on the way
    assert check_in(state, a, key, keyring).license is None  # an older agent: as before
    again = check_in(state, a, key, keyring, revision=1)
    assert load_signed(again.license or "", keyring).document.revision == 2
    assert check_in(state, a, key, keyring, revision=2).license is None


def test_every_rule_is_checked_on_every_validation(
    state: ServerState, admin: Principal, keyring: Keyring, clock: ManualClock
) -> None:
    serial, key = setup_license(
        state,
        admin,
        START,
        entitlements=[{"feature": "uniplex", "count": 1, "expiry": "2026-12-31"}],
    )
    a = agent(1)
    activate(state, a, key, keyring)
    clock.set(START.replace(year=2027))
    assert "expired" in (check_in(state, a, key, keyring).message or "")
    with pytest.raises(Forbidden, match="expired"):
        activate(state, agent(2), key, keyring)
    with state.db.write() as session:
        licenses.update_license(session, admin, serial, LicenseUpdate(status="revoked"), state.now())
    response = check_in(state, a, key, keyring)
    assert response.directives == ("revoke",) and "revoked" in (response.message or "")
    with pytest.raises(Forbidden, match="revoked"):
        activate(state, a, key, keyring)


def test_checkin_refuses_strangers(state: ServerState, admin: Principal, keyring: Keyring) -> None:
    _, key = setup_license(state, admin, START)
    a = agent(1)
    activate(state, a, key, keyring)
    with pytest.raises(Forbidden, match="not activated"):
        check_in(state, agent(2), key, keyring)
    forged = FakeAgent(a.machine, a.system_id, key=SigningKey.generate())
    with pytest.raises(Forbidden, match="signature"):
        check_in(state, forged, key, keyring)
    moved = FakeAgent("elsewhere", a.system_id, key=a.key)
    with pytest.raises(Forbidden, match="no longer matches"):
        check_in(state, moved, key, keyring)


def test_a_sealed_license_is_shipped_encrypted_to_its_key(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START, seal=True)
    a = agent(1)
    shipped = load_signed(activate(state, a, key, keyring).license or "", keyring).document
    assert shipped.sealed is not None and shipped.locations == ()  # type: ignore[union-attr]
    opened = unseal(shipped, key)  # type: ignore[arg-type]
    assert opened.location().get("uniplex").count == 5  # type: ignore[union-attr]
    with state.db.write() as session:
        licenses.update_license(session, admin, serial, LicenseUpdate(failover_days=7), state.now())
    again = load_signed(check_in(state, a, key, keyring).license or "", keyring).document
    assert again.sealed is not None and unseal(again, key).failover_days == 7  # type: ignore[arg-type]
    with pytest.raises(DecryptionError):
        unseal(again, "AAAAA-BBBBB-CCCCC-DDDDD-EEEEE")  # type: ignore[arg-type]


def test_a_copied_installation_on_other_hardware_is_a_recovery_not_a_move(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    serial, key = setup_license(state, admin, START, recovery_allowance=0, connect=False)
    original = agent(1)
    activate(state, original, key, keyring)
    # The same state directory (system id, agent key) copied to a different machine.
    copied = FakeAgent("elsewhere", original.system_id, original.key)
    with pytest.raises(Forbidden, match=r"other hardware.*--recover"):
        activate(state, copied, key, keyring)
    # Asked for as a recovery, the license's rule decides (no allowance: refused, recorded).
    with state.db.write() as session, pytest.raises(Forbidden, match="recover"):
        activation.activate(
            session, copied.activation(key), state.now(), state.signing_key, state.pepper, recover=True
        )
    with state.db.read() as session:
        view = licenses.license_view(licenses.get_license(session, serial))
    assert [m["locking_id"] for m in view["machines"]] == [original.locking_id]
