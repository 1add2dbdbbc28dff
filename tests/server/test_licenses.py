"""Issuing and changing licenses: validation, revisions, the admin API's error shapes."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import select

from tessera.server import licenses
from tessera.server.app import ServerState
from tessera.server.errors import Invalid, NotFound
from tessera.server.models import LicenseRevision
from tessera.server.schemas import LicenseUpdate
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import setup_license


def test_update_makes_a_new_revision_with_a_snapshot(state: ServerState, admin: Principal) -> None:
    serial, _ = setup_license(state, admin, START, machines=3, emergency=["backup"], version="4.*")
    with state.db.write() as session:
        row = licenses.update_license(
            session,
            admin,
            serial,
            LicenseUpdate.model_validate(
                {
                    "entitlements": [{"feature": "reporting", "count": 2, "expiry": "2028-01-01"}],
                    "remove": ["backup"],
                    "failover_days": 10,
                }
            ),
            START,
        )
        view = licenses.license_view(row)
    assert view["revision"] == 2 and view["failover_days"] == 10 and view["version"] == "4.*"
    assert view["features"] == {
        "reporting": {"count": 2, "expiry": "2028-01-01"},
        "uniplex": {"count": 5, "expiry": "2027-01-15"},
    }
    with state.db.read() as session:
        snapshots = (
            session.execute(select(LicenseRevision).order_by(LicenseRevision.revision)).scalars().all()
        )
    assert [s.revision for s in snapshots] == [1, 2]
    assert "backup" in json.loads(snapshots[0].snapshot)["features"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"entitlements": [{"feature": "nope", "count": 1}]}, "not a feature of product cortex"),
        ({"version": "4.x"}, "version"),
        ({"emergency": ["nope"]}, "emergency"),
    ],
)
def test_bad_licenses_are_refused_naming_the_field(
    state: ServerState, admin: Principal, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(Invalid, match=message):
        setup_license(state, admin, START, **fields)


def test_unknown_serial_is_404(state: ServerState, admin: Principal) -> None:
    with state.db.write() as session, pytest.raises(NotFound):
        licenses.update_license(session, admin, "2026-999999", LicenseUpdate(), START)


def test_api_errors_are_json_and_name_the_field(live_server: LiveServer, admin_token: str) -> None:
    admin = live_server.client(admin_token)
    bad = admin.post("/api/v1/customers", json={"name": ""})
    assert bad.status_code == 422 and bad.json()["detail"][0]["loc"] == ["body", "name"]
    missing = admin.post("/api/v1/licenses", json={"customer_id": 1, "product": "cortex", "entitlements": []})
    assert missing.status_code == 422 and "entitlements" in json.dumps(missing.json())
    unknown = admin.post(
        "/api/v1/licenses",
        json={
            "customer_id": 42,
            "product": "cortex",
            "entitlements": [{"feature": "a", "count": 1}],
        },
    )
    assert unknown.status_code == 404 and unknown.json() == {"detail": "customer 42 not found"}
    assert admin.get("/api/v1/customers/42").status_code == 404
    assert admin.get("/api/v1/licenses/nope").status_code == 404
    garbage = admin.post("/api/v1/customers", content=b"\xff{", headers={"Content-Type": "application/json"})
    assert garbage.status_code in (400, 422) and "detail" in garbage.json()
    for body in (b"", b"[]", b'{"protocol":"tessera-connect/1"}', b"\x00" * 10):
        response = live_server.client().post("/api/v1/activate", content=body)
        assert response.status_code == 422 and isinstance(response.json()["detail"], str), body
    made = admin.post("/api/v1/tokens", json={"name": "p", "role": "partner"})
    assert made.status_code == 422 and made.json()["detail"].startswith("partner:")
    huge = admin.post("/api/v1/customers", content=b"[" + b"1," * (3 * 1024 * 1024) + b"1]")
    assert huge.status_code == 413 and "too large" in huge.json()["detail"]
    openapi = live_server.client().get("/openapi.json").json()
    assert {"/api/v1/activate", "/api/v1/checkin", "/api/v1/licenses"} <= set(openapi["paths"])


def test_revisions_are_listed_over_the_api(
    live_server: LiveServer, state: ServerState, admin: Principal, admin_token: str
) -> None:
    serial, _ = setup_license(state, admin, START)
    client = live_server.client(admin_token)
    changed = client.patch(f"/api/v1/licenses/{serial}", json={"failover_days": 3})
    assert changed.status_code == 200 and changed.json()["revision"] == 2
    revisions = client.get(f"/api/v1/licenses/{serial}/revisions").json()
    assert [(r["revision"], r["license"]["failover_days"]) for r in revisions] == [(1, 30), (2, 3)]
    assert revisions[1]["actor"] == "admin:http-admin"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"entitlements": [{"feature": "uniplex", "count": 2}, {"feature": "uniplex", "count": 3}]},
            r"entitlements\[1\]: feature uniplex listed twice",
        ),
        (
            {"entitlements": [{"feature": "backup", "count": 1}], "remove": ["backup"]},
            r"remove\[0\]: feature backup is also set in entitlements",
        ),
        ({"remove": ["backup", "backup"]}, r"remove\[1\]: feature backup listed twice"),
        ({"emergency": ["backup", "backup"]}, "emergency: a feature is listed twice"),
    ],
)
def test_a_contradictory_change_is_refused_naming_the_field(
    state: ServerState, admin: Principal, fields: dict[str, object], message: str
) -> None:
    serial, _ = setup_license(state, admin, START)
    with state.db.write() as session, pytest.raises(Invalid, match=message):
        licenses.update_license(session, admin, serial, LicenseUpdate.model_validate(fields), START)
    with state.db.read() as session:
        assert licenses.license_view(licenses.get_license(session, serial))["revision"] == 1


def test_a_contradictory_change_over_the_api_is_422(live_server: LiveServer, admin_token: str) -> None:
    serial, _ = setup_license(live_server.state, _admin(live_server.state), START)
    client = live_server.client(admin_token)
    answer = client.patch(
        f"/api/v1/licenses/{serial}",
        json={"entitlements": [{"feature": "uniplex", "count": 2}, {"feature": "uniplex", "count": 3}]},
    )
    assert answer.status_code == 422 and answer.json()["detail"].startswith("entitlements[1]:")
    assert client.get(f"/api/v1/licenses/{serial}").json()["features"]["uniplex"]["count"] == 5


def _admin(state: ServerState) -> Principal:
    from tessera.server.tokens import Role, create_token

    with state.db.write() as session:
        row, _ = create_token(session, name="m5-admin", role=Role.ADMIN, now=START)
        return Principal(row.id, row.name, Role.ADMIN)


def test_emergency_features_must_be_entitled(state: ServerState, admin: Principal) -> None:
    # reporting is a feature of the product but not granted by this license.
    with pytest.raises(Invalid, match=r"emergency\[1\]: reporting is not among"):
        setup_license(state, admin, START, emergency=["backup", "reporting"])
    serial, _ = setup_license(state, admin, START, emergency=["backup"])
    with state.db.write() as session, pytest.raises(Invalid, match=r"emergency\[0\]: reporting"):
        licenses.update_license(
            session, admin, serial, LicenseUpdate.model_validate({"emergency": ["reporting"]}), START
        )
    with state.db.write() as session:
        row = licenses.update_license(
            session,
            admin,
            serial,
            LicenseUpdate.model_validate(
                {"entitlements": [{"feature": "reporting", "count": 1}], "emergency": ["reporting"]}
            ),
            START,
        )
        assert licenses.license_view(row)["emergency"] == ["reporting"]


def test_a_request_that_contradicts_itself_is_422(state: ServerState, admin: Principal) -> None:
    from tessera.server import catalog
    from tessera.server.schemas import ProductIn

    body = {"code": "p2", "name": "X", "features": [{"code": "a"}, {"code": "a", "description": "dup"}]}
    with state.db.write() as session, pytest.raises(Invalid, match=r"features\[1\]: feature code a"):
        catalog.create_product(session, admin, ProductIn.model_validate(body), START)
    serial, _ = setup_license(state, admin, START)
    for fields, message in (
        (
            {"entitlements": [{"feature": "uniplex", "count": 1}, {"feature": "uniplex", "count": 2}]},
            r"entitlements\[1\]: feature uniplex listed twice",
        ),
        (
            {"entitlements": [{"feature": "uniplex", "count": 3}], "remove": ["uniplex"]},
            r"remove\[0\]: feature uniplex is also set in entitlements",
        ),
    ):
        with state.db.write() as session, pytest.raises(Invalid, match=message):
            licenses.update_license(session, admin, serial, LicenseUpdate.model_validate(fields), START)


def test_a_new_license_grants_at_least_one_seat_and_nothing_already_expired(
    live_server: LiveServer, admin_token: str, state: ServerState, admin: Principal
) -> None:
    """An entitlement that ended before the server's day, or a count of 0, would make a
    license that grants nothing (the agent refuses an expired license and a 0-count
    feature): refused at issue, single and bulk, with 422 naming the field. The server's
    clock decides (here START, 2026-11-22): its expiry day itself is still valid."""
    client = live_server.client(admin_token)
    setup_license(state, admin, START)  # the product cortex and customer 1
    issued_before = len(client.get("/api/v1/licenses").json())

    def body(**entitlement: object) -> dict[str, object]:
        return {
            "customer_id": 1,
            "product": "cortex",
            "entitlements": [{"feature": "uniplex", **entitlement}],
        }

    for path, extra in (("/api/v1/licenses", {}), ("/api/v1/licenses/bulk", {"count": 2})):
        past = client.post(path, json={**body(count=1, expiry="2026-11-21"), **extra})
        assert past.status_code == 422, past.text
        assert past.json()["detail"].startswith("entitlements[0].expiry: 2026-11-21 (uniplex) is in the past")
        none = client.post(path, json={**body(count=0), **extra})
        assert none.status_code == 422, none.text
        assert none.json()["detail"][0]["loc"] == ["body", "entitlements", 0, "count"]
    assert len(client.get("/api/v1/licenses").json()) == issued_before
    today = client.post("/api/v1/licenses", json=body(count=1, expiry="2026-11-22"))
    assert today.status_code == 201, today.text
    # A change may still set 0 or an expiry in the past (that ends the feature at once).
    serial = today.json()["serial"]
    changed = client.patch(
        f"/api/v1/licenses/{serial}",
        json={"entitlements": [{"feature": "uniplex", "count": 0, "expiry": "2026-01-01"}]},
    )
    assert changed.status_code == 200, changed.text


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"connect": False, "checkpoint_days": 3}, r"^checkpoint_days: a checkpoint license .* connect"),
        ({"binding": "user", "checkpoint_days": 3}, r"^checkpoint_days: a user-bound license"),
    ],
)
def test_a_checkpoint_that_can_never_be_met_is_refused_at_issue(
    state: ServerState, admin: Principal, fields: dict[str, object], message: str
) -> None:
    with pytest.raises(Invalid, match=message):
        setup_license(state, admin, START, **fields)


def test_a_checkpoint_that_can_never_be_met_is_refused_on_update(
    state: ServerState, admin: Principal
) -> None:
    checkpoint, _ = setup_license(state, admin, START, checkpoint_days=3)
    offline, _ = setup_license(state, admin, START, connect=False)
    user, _ = setup_license(state, admin, START, binding="user")
    for serial, fields, message in (
        (checkpoint, {"connect": False}, rf"^connect: license {checkpoint} is a checkpoint license"),
        (offline, {"checkpoint_days": 3}, r"^checkpoint_days: a checkpoint license .* connect"),
        (user, {"checkpoint_days": 3}, r"^checkpoint_days: a user-bound license"),
    ):
        with state.db.write() as session, pytest.raises(Invalid, match=message):
            licenses.update_license(session, admin, serial, LicenseUpdate.model_validate(fields), START)
    # Both at once, the other way round, is a consistent change.
    with state.db.write() as session:
        both = LicenseUpdate.model_validate({"connect": True, "checkpoint_days": 3})
        view = licenses.license_view(licenses.update_license(session, admin, offline, both, START))
    assert (view["connect"], view["checkpoint_days"]) == (True, 3)


def test_a_checkpoint_without_connect_over_the_api_is_422(live_server: LiveServer, admin_token: str) -> None:
    state = live_server.state
    serial, _ = setup_license(state, _admin(state), START, checkpoint_days=3)
    client = live_server.client(admin_token)
    with state.db.read() as session:
        customer_id = licenses.get_license(session, serial).customer_id
    body = {
        "customer_id": customer_id,
        "product": "cortex",
        "entitlements": [{"feature": "uniplex", "count": 1}],
        "connect": False,
        "checkpoint_days": 3,
    }
    issued = client.post("/api/v1/licenses", json=body)
    assert issued.status_code == 422 and issued.json()["detail"].startswith("checkpoint_days:"), issued.text
    changed = client.patch(f"/api/v1/licenses/{serial}", json={"connect": False})
    assert changed.status_code == 422 and changed.json()["detail"].startswith("connect:"), changed.text
    assert client.get(f"/api/v1/licenses/{serial}").json()["connect"] is True
