"""Bulk issue (``POST /api/v1/licenses/bulk``), on every backend: the licenses work like
single-issued ones, pre-bound files verify and their machines activate and check in, bad
input and foreign namespaces issue nothing, and the audit chain commits to the serials."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import func, select

from tessera.core.signing import Keyring
from tessera.core.verify import check_binding, load_signed
from tessera.server import audit, bulk, catalog, licenses, recovery
from tessera.server.app import ServerState
from tessera.server.errors import Forbidden, Invalid, NotFound
from tessera.server.models import AuditEntry, LicenseRevision, LicenseRow, Machine, WebhookDelivery
from tessera.server.schemas import BulkLicenseIn, CustomerIn, PartnerIn
from tessera.server.tokens import Principal, Role, create_token
from tessera.server.webhooks import add_endpoint

from .conftest import START, LiveServer
from .helpers import FakeAgent, activate, agent, check_in, setup_license


def _template(state: ServerState, admin: Principal, **extra: Any) -> dict[str, Any]:
    """The catalog of ``setup_license`` (one license issued there), and a bulk body."""
    setup_license(state, admin, START)
    with state.db.read() as session:
        customer_id = session.execute(select(LicenseRow.customer_id)).scalar_one()
    return {
        "customer_id": customer_id,
        "product": "cortex",
        "entitlements": [
            {"feature": "uniplex", "count": 5, "expiry": "2027-01-15"},
            {"feature": "backup", "count": 1},
        ],
        "emergency": ["backup"],
        **extra,
    }


def _issue(state: ServerState, principal: Principal, body: dict[str, Any]) -> bulk.BulkResult:
    with state.db.write() as session:
        return bulk.issue_bulk(
            session,
            principal,
            BulkLicenseIn.model_validate(body),
            state.now(),
            state.pepper,
            state.signing_key,
        )


def _counts(state: ServerState) -> tuple[int, int, int, int]:
    with state.db.read() as session:
        return (
            session.execute(select(func.count()).select_from(LicenseRow)).scalar_one(),
            session.execute(select(func.count()).select_from(LicenseRevision)).scalar_one(),
            session.execute(select(func.count()).select_from(Machine)).scalar_one(),
            session.execute(select(func.count()).select_from(AuditEntry)).scalar_one(),
        )


def test_count_issues_working_licenses_with_one_audit_entry(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    body = _template(state, admin, count=25, machines=2)
    before = _counts(state)
    result = _issue(state, admin, body)
    assert len(result.serials) == len(set(result.keys)) == 25 and result.locking_ids is None
    # One consecutive block after the single license issued by the template.
    assert result.serials == [f"2026-{n:06d}" for n in range(2, 27)]
    assert _counts(state) == (before[0] + 25, before[1] + 25, before[2], before[3] + 1)
    with state.db.read() as session:
        single = licenses.license_view(licenses.get_license(session, "2026-000001"), with_machines=False)
        view = licenses.license_view(licenses.get_license(session, result.serials[7]), with_machines=False)
        snapshot = session.execute(
            select(LicenseRevision.snapshot)
            .join(LicenseRow, LicenseRow.id == LicenseRevision.license_id)
            .where(LicenseRow.serial == result.serials[7])
        ).scalar_one()
        entry = session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).scalar_one()
        assert audit.verify_chain(session).ok
    # The same license as one issued singly (but for serial, machines and emergency set).
    differ = {"serial", "machines_allowed", "emergency"}
    assert {k: v for k, v in view.items() if k not in differ} == {
        k: v for k, v in single.items() if k not in differ
    }
    assert view["machines_allowed"] == 2 and view["emergency"] == ["backup"]
    assert json.loads(snapshot) == view
    details = json.loads(entry.details)
    assert entry.action == "license.issue-bulk" and entry.target == "2026-000002..2026-000026"
    assert details["count"] == 25 and details["prebound"] is False
    assert details["serials_sha256"] == bulk.serials_digest(result.serials) == result.serials_sha256
    assert details["template"]["machines_allowed"] == 2
    # Every key activates its own license, like a single-issued one, and checks in.
    for i in (0, 24):
        a = agent(i)
        response = activate(state, a, result.keys[i], keyring)
        assert response.serial == result.serials[i]
        assert check_in(state, a, result.keys[i], keyring).serial == result.serials[i]


def test_prebound_files_verify_and_their_machines_activate_and_check_in(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    machines = [agent(i) for i in range(3)]
    body = _template(state, admin, locking_ids=[m.locking_id for m in machines])
    result = _issue(state, admin, body)
    assert result.files is not None and result.locking_ids == [m.locking_id for m in machines]
    for m, serial, text in zip(machines, result.serials, result.files, strict=True):
        lic = load_signed(text.encode(), keyring).document
        assert lic.serial == serial and lic.locking_id == m.locking_id and lic.agent_key is None
        check_binding(lic, m.locking_id)
    with state.db.read() as session:
        view = licenses.license_view(licenses.get_license(session, result.serials[1]))
    assert [(x["slot"], x["locking_id"]) for x in view["machines"]] == [(0, machines[1].locking_id)]
    # No agent key is registered yet: nothing can check in as the pre-bound machine.
    with pytest.raises(Forbidden):
        check_in(state, machines[1], result.keys[1], keyring)
    # The key on another machine finds the only slot taken by the pre-bound one.
    with pytest.raises(Forbidden, match="no free machine left"):
        activate(state, agent(9), result.keys[1], keyring)
    # The machine itself activates onto its slot (its agent key is registered), then checks in.
    response = activate(state, machines[1], result.keys[1], keyring)
    online = load_signed((response.license or "").encode(), keyring).document
    assert online.agent_key == machines[1].key.public.to_base64()
    # The pre-bound file is the activation's file but for the agent key.
    offline = load_signed(result.files[1].encode(), keyring).document
    assert offline.evolve(agent_key=online.agent_key) == online
    assert check_in(state, machines[1], result.keys[1], keyring).serial == result.serials[1]
    with state.db.read() as session:
        after = licenses.license_view(licenses.get_license(session, result.serials[1]))
    assert [(x["slot"], x["system_id"]) for x in after["machines"]] == [(0, machines[1].system_id)]


def test_sealed_prebound_files_are_sealed_to_their_own_key(
    state: ServerState, admin: Principal, keyring: Keyring
) -> None:
    from tessera.core.sealing import unseal

    machines = [agent(i) for i in range(2)]
    result = _issue(
        state, admin, _template(state, admin, seal=True, locking_ids=[m.locking_id for m in machines])
    )
    assert result.files is not None
    for key, text in zip(result.keys, result.files, strict=True):
        lic = load_signed(text.encode(), keyring).document
        assert lic.sealed is not None and unseal(lic, key).location().get("uniplex").count == 5  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("extra", "error", "message"),
    [
        ({"count": 3, "entitlements": [{"feature": "nope", "count": 1}]}, Invalid, "entitlements"),
        ({"count": 3, "emergency": ["nope"]}, Invalid, "emergency"),
        ({"count": 3, "version": "4.x"}, Invalid, "version"),
        ({}, Invalid, "count: give either count or locking_ids"),
        ({"count": 2, "locking_ids": ["TL1-AAAAAAAA"]}, Invalid, "exactly one"),
        ({"locking_ids": ["TL1-AAAAAAAA"], "binding": "instance"}, Invalid, "binding"),
        ({"locking_ids": ["TL1-AAAAAAAA"]}, Invalid, r"locking_ids\[0\]"),
    ],
)
def test_bad_input_issues_nothing(
    state: ServerState, admin: Principal, extra: dict[str, Any], error: type[Exception], message: str
) -> None:
    body = _template(state, admin) | extra
    before = _counts(state)
    with pytest.raises(error, match=message):
        _issue(state, admin, body)
    assert _counts(state) == before
    # The serial counter is untouched: the next license is the next number.
    assert setup_license(state, admin, START)[0] == "2026-000002"


def test_duplicate_and_blacklisted_locking_ids_issue_nothing(state: ServerState, admin: Principal) -> None:
    good, listed = agent(1), agent(2)
    body = _template(state, admin)
    before = _counts(state)
    with pytest.raises(Invalid, match=r"locking_ids\[1\].*listed twice"):
        _issue(state, admin, body | {"locking_ids": [good.locking_id, good.locking_id]})
    with state.db.write() as session:
        recovery.add_to_blacklist(
            session, admin, listed.locking_id, recovered_only=False, delay_days=0, reason="test", now=START
        )
    before = _counts(state)
    # The blacklisted machine with one component changed: still that container (tolerant).
    drifted = FakeAgent(listed.machine, "system-x-12345", facts=[*listed.facts[:3], ("c", "new cpu")])
    for lid in (listed.locking_id, drifted.locking_id):
        with pytest.raises(Forbidden, match=r"locking_ids\[1\].*blacklisted"):
            _issue(state, admin, body | {"locking_ids": [good.locking_id, lid]})
    assert _counts(state) == before


def test_partner_bulk_issues_only_inside_its_namespace(state: ServerState, admin: Principal) -> None:
    body = _template(state, admin)
    with state.db.write() as session:
        partner = catalog.create_partner(session, admin, PartnerIn(code="acme", name="Acme"), START)
        from tessera.server.schemas import FeatureIn

        catalog.add_feature(session, admin, "cortex", FeatureIn(code="partner.acme.reporting"))
        row, _ = create_token(session, name="acme", role=Role.PARTNER, now=START, partner_id=partner.id)
        acme = Principal(row.id, row.name, Role.PARTNER, partner_id=partner.id)
        row, _ = create_token(session, name="ro", role=Role.READONLY, now=START)
        readonly = Principal(row.id, row.name, Role.READONLY)
    before = _counts(state)
    # The vendor's customer is not the partner's: as a missing one.
    with pytest.raises(NotFound, match=f"customer {body['customer_id']} not found"):
        _issue(
            state,
            acme,
            body | {"count": 2, "entitlements": [{"feature": "partner.acme.reporting", "count": 1}]},
        )
    with state.db.write() as session:
        body["customer_id"] = catalog.create_customer(session, acme, CustomerIn(name="Carol"), START).id
    with pytest.raises(Forbidden, match="outside partner namespace"):
        _issue(state, acme, body | {"count": 2})
    with pytest.raises(Forbidden):
        _issue(state, readonly, body | {"count": 2})
    assert _counts(state) == before
    own = body | {
        "count": 2,
        "entitlements": [{"feature": "partner.acme.reporting", "count": 1}],
        "emergency": [],
    }
    result = _issue(state, acme, own)
    with state.db.read() as session:
        assert licenses.get_license(session, result.serials[1]).partner_id == partner.id


def test_one_webhook_event_per_bulk_request(state: ServerState, admin: Principal) -> None:
    body = _template(state, admin, count=50)
    with state.db.write() as session:
        add_endpoint(
            session, url="http://127.0.0.1:9/hook", secret=None, events=[], ca_pem=None,
            pepper=state.pepper, now=START,
        )  # fmt: skip
    result = _issue(state, admin, body)
    with state.db.read() as session:
        rows = session.execute(select(WebhookDelivery)).scalars().all()
    assert [r.event for r in rows] == ["license.bulk-issued"]
    data = json.loads(rows[0].payload)["data"]
    assert data["count"] == 50 and data["first_serial"] == result.serials[0]
    assert data["last_serial"] == result.serials[-1] and data["serials_sha256"] == result.serials_sha256


def test_bulk_api_caps_requests_and_names_the_field(
    live_server: LiveServer, state: ServerState, admin: Principal, admin_token: str, keyring: Keyring
) -> None:
    body = _template(state, admin)
    client = live_server.client(admin_token)
    before = _counts(state)
    over = client.post("/api/v1/licenses/bulk", json=body | {"count": 10_001})
    assert over.status_code == 422 and over.json()["detail"][0]["loc"] == ["body", "count"]
    many = client.post("/api/v1/licenses/bulk", json=body | {"locking_ids": [agent(1).locking_id] * 10_001})
    assert many.status_code == 422 and many.json()["detail"][0]["loc"] == ["body", "locking_ids"]
    bad = client.post("/api/v1/licenses/bulk", json=body | {"count": 5, "product": "nope"})
    assert bad.status_code == 404
    both = client.post(
        "/api/v1/licenses/bulk", json=body | {"count": 5, "locking_ids": [agent(1).locking_id]}
    )
    assert both.status_code == 422 and both.json()["detail"].startswith("count:")
    assert (
        client.post(
            "/api/v1/licenses/bulk", json=body | {"count": 5}, headers={"Authorization": ""}
        ).status_code
        == 401
    )
    assert _counts(state) == before
    machines = [agent(i) for i in range(4)]
    made = client.post("/api/v1/licenses/bulk", json=body | {"locking_ids": [m.locking_id for m in machines]})
    assert made.status_code == 201, made.text
    out = made.json()
    assert out["count"] == 4 and out["first_serial"] == "2026-000002" and out["last_serial"] == "2026-000005"
    assert [x["locking_id"] for x in out["licenses"]] == [m.locking_id for m in machines]
    for item in out["licenses"]:
        assert load_signed(item["license"].encode(), keyring).document.serial == item["serial"]
    plain = client.post("/api/v1/licenses/bulk", json=body | {"count": 3}).json()
    assert [sorted(x) for x in plain["licenses"]] == [["key", "serial"]] * 3
    assert client.get("/api/v1/audit/verify").json()["ok"] is True
    openapi = live_server.client().get("/openapi.json").json()
    assert "/api/v1/licenses/bulk" in openapi["paths"]
