"""Recovery rules, rehost and the blacklist over the real HTTP API, on every backend."""

from __future__ import annotations

import json
from datetime import timedelta

import httpx
from sqlalchemy import func, select

from tessera.core.blacklist import BlacklistEntry, parse_blacklist
from tessera.core.clock import ManualClock
from tessera.core.model import License
from tessera.core.protocol import ServerResponse
from tessera.core.signing import Keyring
from tessera.core.verify import check_binding, load_signed
from tessera.server import licenses
from tessera.server.app import ServerState
from tessera.server.models import AuditEntry, BlacklistHit, Recovery, WebhookDelivery
from tessera.server.refusals import RefusalLimit
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import FakeAgent, agent, setup_license

RECOVER = "/api/v1/recover"


def _activate(
    client: httpx.Client, a: FakeAgent, key: str, keyring: Keyring, path: str = "/api/v1/activate"
) -> ServerResponse:
    request = a.activation(key)
    response = client.post(path, content=request.to_json())
    assert response.status_code == 200, response.text
    return ServerResponse.from_json(response.content, keyring, request.nonce)


def _checkin(client: httpx.Client, a: FakeAgent, key: str, keyring: Keyring) -> ServerResponse:
    request = a.checkin(key)
    response = client.post("/api/v1/checkin", content=request.to_json())
    assert response.status_code == 200, response.text
    return ServerResponse.from_json(response.content, keyring, request.nonce)


def _count(state: ServerState, model: type, **where: object) -> int:
    with state.db.read() as session:
        stmt = select(func.count()).select_from(model)
        for name, value in where.items():
            stmt = stmt.where(getattr(model, name) == value)
        return int(session.execute(stmt).scalar_one())


def test_rehost_blacklists_the_old_container_everywhere(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
) -> None:
    serial, key = setup_license(state, admin, START)
    _, other_key = setup_license(state, admin, START)
    connect = live_server.client()
    api = live_server.client(admin_token)
    old, new = agent(1), agent(2)
    # A loopback receiver that is not there: the events still land in the outbox.
    hook = api.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook"})
    assert hook.status_code in (200, 201), hook.text
    _activate(connect, old, key, keyring)
    response = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": new.locking_id})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["rule"] == "connect"  # the old machine was activated within its failover period
    document = load_signed(body["license"], keyring).document
    assert isinstance(document, License)
    check_binding(document, new.locking_id)
    # The new machine activates with the same key into the reserved slot.
    got = _activate(connect, new, key, keyring)
    assert got.license is not None
    with state.db.read() as session:
        machines = licenses.license_view(licenses.get_license(session, serial))["machines"]
    assert [m["system_id"] for m in machines] == [new.system_id]
    # (a) honeypot: the old machine's next check-in is told to lock.
    assert _checkin(connect, old, key, keyring).directives == ("lock",)
    # (b) it cannot activate anything else.
    refused = connect.post("/api/v1/activate", content=old.activation(other_key).to_json())
    assert refused.status_code == 403 and "blacklisted" in refused.json()["detail"]
    hits = api.get("/api/v1/reports/blacklist-hits").json()
    assert [(h["how"], h["action"]) for h in hits] == [
        ("checkin", "lock"),
        ("activation", "refused"),
    ]
    assert {h["locking_id"] for h in hits} == {old.locking_id}
    # (c) the signed export lists it; every export gets a higher sequence.
    first = api.post("/api/v1/blacklist/export").json()
    second = api.post("/api/v1/blacklist/export").json()
    assert second["sequence"] > first["sequence"]
    listed = parse_blacklist(second["file"]).verify(keyring)
    entry = listed.container_entry(old.locking_id)
    assert entry is not None and entry.delay_days == 0
    # The new machine keeps working.
    assert _checkin(connect, new, key, keyring).directives == ()
    # A blacklisted container is no target of a rehost either: refused, recorded.
    again = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": old.locking_id})
    assert again.status_code == 403 and "blacklisted" in again.json()["detail"]
    assert _count(state, Recovery, granted=False) == 1
    assert _count(state, AuditEntry, action="license.recover-denied") == 1
    with state.db.read() as session:
        events = set(session.execute(select(WebhookDelivery.event)).scalars())
    assert {"license.rehosted", "license.blacklisted", "blacklist.hit"} <= events


def test_revoke_only_withdraws_just_the_recovered_license(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
) -> None:
    serial, key = setup_license(state, admin, START)
    _, other_key = setup_license(state, admin, START)
    connect, api = live_server.client(), live_server.client(admin_token)
    old, new = agent(1), agent(2)
    _activate(connect, old, key, keyring)
    response = api.post(
        f"/api/v1/licenses/{serial}/rehost",
        json={"locking_id": new.locking_id, "old_container": "revoke"},
    )
    assert response.status_code == 200, response.text
    answer = _checkin(connect, old, key, keyring)
    assert answer.directives == ("revoke",)
    # The container itself is not blacklisted: it may still activate other licenses.
    _activate(connect, old, other_key, keyring)
    assert _checkin(connect, old, other_key, keyring).directives == ()
    export = parse_blacklist(api.post("/api/v1/blacklist/export").json()["file"]).verify(keyring)
    assert export.containers == () and export.serial_entry(serial) is not None


def _copy(text: str | None, keyring: Keyring) -> License:
    assert text is not None
    document = load_signed(text, keyring).document
    assert isinstance(document, License)
    return document


def test_a_revoke_only_entry_reaches_exactly_the_old_containers_copies(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    """Two seats; the one on A moves to B with "revoke only" on the day A was activated.
    The exported entry must reach A's copy of that very day, and neither the other seat's
    copy (issued days before the move) nor B's."""
    serial, key = setup_license(state, admin, START, machines=2)
    connect, api = live_server.client(), live_server.client(admin_token)
    seat, old, new = agent(3), agent(1), agent(2)
    seat_copy = _copy(_activate(connect, seat, key, keyring).license, keyring)
    clock.advance(timedelta(days=2))
    old_copy = _copy(_activate(connect, old, key, keyring).license, keyring)
    clock.advance(timedelta(hours=5, microseconds=250_000))
    response = api.post(
        f"/api/v1/licenses/{serial}/rehost",
        json={"locking_id": new.locking_id, "old_container": "revoke", "slot": 1},
    )
    assert response.status_code == 200, response.text
    new_copy = _copy(response.json()["license"], keyring)
    assert new_copy.issued == old_copy.issued + timedelta(hours=5)  # the second of the move
    exported = api.post("/api/v1/blacklist/export").json()
    assert exported["file"].startswith("[BLACKLIST]\nformat = tessera/2\n") and exported["serials"] == 1
    listed = parse_blacklist(exported["file"]).verify(keyring)
    (entry,) = listed.serial_entries(serial)
    assert (entry.locking_id, entry.moved, entry.delay_days) == (old.locking_id, new_copy.issued, 0)
    assert listed.withdrawing(old_copy) == entry
    assert listed.withdrawing(seat_copy) is None
    assert listed.withdrawing(new_copy) is None
    clock.advance(timedelta(minutes=1))
    assert listed.withdrawing(_copy(_activate(connect, new, key, keyring).license, keyring)) is None
    # The seat moves too, later: each move is an entry of its own.
    clock.advance(timedelta(days=1))
    moved = api.post(
        f"/api/v1/licenses/{serial}/rehost",
        json={"locking_id": agent(4).locking_id, "old_container": "revoke", "slot": 0},
    )
    assert moved.status_code == 200, moved.text
    listed = parse_blacklist(api.post("/api/v1/blacklist/export").json()["file"]).verify(keyring)
    assert [e.locking_id for e in listed.serial_entries(serial)] == sorted([old.locking_id, seat.locking_id])
    assert listed.withdrawing(seat_copy) is not None and listed.withdrawing(old_copy) is not None


def test_an_instance_bound_license_keeps_the_day_grain_entry(
    live_server: LiveServer, state: ServerState, admin: Principal, admin_token: str, keyring: Keyring
) -> None:
    """Its copies name an instance, no Locking ID: a container-scoped entry could reach none."""
    serial, key = setup_license(
        state, admin, START, binding="instance", recovery_allowance=1, recovery_old_container="revoke"
    )
    connect = live_server.client()
    _activate(connect, agent(1), key, keyring)
    _activate(connect, agent(2), key, keyring, RECOVER)
    exported = live_server.client(admin_token).post("/api/v1/blacklist/export").json()["file"]
    assert exported.startswith("[BLACKLIST]\nformat = tessera/1\n")
    assert f"[SERIALS]\n{serial} = {START.date().isoformat()}, 0\n" in exported


def test_moves_recorded_before_migration_0012_keep_their_day_grain_entry(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    """A row written before 0012 names no container: exported as before (tessera/1), so a
    server upgrade alone does not make the files unreadable for shipped agents."""
    from alembic import command
    from sqlalchemy import inspect

    from tessera.server.migrate import alembic_config, upgrade

    serial, key = setup_license(state, admin, START)
    connect, api = live_server.client(), live_server.client(admin_token)
    old, new = agent(1), agent(2)
    _activate(connect, old, key, keyring)
    clock.advance(timedelta(hours=3))
    moved = api.post(
        f"/api/v1/licenses/{serial}/rehost", json={"locking_id": new.locking_id, "old_container": "revoke"}
    )
    assert moved.status_code == 200, moved.text

    def columns() -> set[str]:
        with state.db.engine.connect() as connection:
            return {c["name"] for c in inspect(connection).get_columns("recovered_machines")}

    config = alembic_config()
    with state.db.engine.begin() as connection:
        config.attributes["connection"] = connection
        command.downgrade(config, "0011")
    assert "file_locking_id" not in columns()
    upgrade(state.db)
    assert "file_locking_id" in columns()
    exported = api.post("/api/v1/blacklist/export").json()
    listed = parse_blacklist(exported["file"]).verify(keyring)
    assert exported["file"].startswith("[BLACKLIST]\nformat = tessera/1\n")
    assert f"[SERIALS]\n{serial} = {START.date().isoformat()}, 0\n[SIGNATURE]" in exported["file"]
    assert listed.serial_entries(serial) == (BlacklistEntry(serial, START.date(), 0),)


def test_without_connect_the_allowance_then_support_decides(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    serial, key = setup_license(
        state, admin, START, connect=False, recovery_allowance=2, recovery_old_container="revoke"
    )
    connect, api = live_server.client(), live_server.client(admin_token)
    machines = [agent(n) for n in range(1, 6)]
    _activate(connect, machines[0], key, keyring)
    # A plain activation beyond the count is refused, whatever the rule.
    plain = connect.post("/api/v1/activate", content=machines[1].activation(key).to_json())
    assert plain.status_code == 403 and "no free machine" in plain.json()["detail"]
    # Agent-side recovery: a new machine with the same key, all machines bound.
    for n in (1, 2):
        clock.advance(timedelta(days=1))
        _activate(connect, machines[n], key, keyring, RECOVER)
    clock.advance(timedelta(days=1))
    refused = connect.post(RECOVER, content=machines[3].activation(key).to_json())
    assert refused.status_code == 403
    assert "allowance is used up (2 of 2)" in refused.json()["detail"]
    rehost = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": machines[3].locking_id})
    assert rehost.status_code == 403 and "support can authorize" in rehost.json()["detail"]
    # Support authorizes exactly one more.
    granted = api.post(f"/api/v1/licenses/{serial}/authorize-recovery", json={"count": 1})
    assert granted.json()["recoveries_authorized"] == 1
    _activate(connect, machines[3], key, keyring, RECOVER)
    again = connect.post(RECOVER, content=machines[4].activation(key).to_json())
    assert again.status_code == 403
    decisions = api.get(f"/api/v1/licenses/{serial}/recoveries").json()
    assert [(d["granted"], d["rule"]) for d in decisions] == [
        (True, "allowance"),
        (True, "allowance"),
        (False, "none"),
        (False, "none"),
        (True, "authorized"),
        (False, "none"),
    ]
    assert all(d["reason"] for d in decisions)
    # Each old machine learns at its next check-in that the license went away.
    assert _checkin(connect, machines[0], key, keyring).directives == ("revoke",)


def test_recovery_interval_gives_another_one_later(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    _, key = setup_license(
        state, admin, START, connect=False, recovery_allowance=0, recovery_interval_days=30
    )
    connect = live_server.client()
    _activate(connect, agent(1), key, keyring)
    clock.advance(timedelta(days=1))
    early = connect.post(RECOVER, content=agent(2).activation(key).to_json())
    assert early.status_code == 403 and "from 2026-12-22" in early.json()["detail"]
    clock.advance(timedelta(days=30))
    _activate(connect, agent(2), key, keyring, RECOVER)
    clock.advance(timedelta(days=1))
    late = connect.post(RECOVER, content=agent(3).activation(key).to_json())
    assert late.status_code == 403 and "from 2027-01-22" in late.json()["detail"]


def test_bad_rehost_input_changes_nothing(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
) -> None:
    serial, key = setup_license(state, admin, START)
    connect, api = live_server.client(), live_server.client(admin_token)
    _activate(connect, agent(1), key, keyring)
    unknown = api.post("/api/v1/licenses/2026-999999/rehost", json={"locking_id": agent(2).locking_id})
    assert unknown.status_code == 404 and "not found" in unknown.json()["detail"]
    malformed = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": "TL1-x"})
    assert malformed.status_code == 422
    added = api.post("/api/v1/blacklist", json={"locking_id": agent(3).locking_id})
    assert added.status_code == 201
    target = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": agent(3).locking_id})
    assert target.status_code == 403
    with state.db.read() as session:
        machines = licenses.license_view(licenses.get_license(session, serial))["machines"]
    assert [m["system_id"] for m in machines] == [agent(1).system_id]
    assert _count(state, BlacklistHit) == 0


def test_roles_and_a_narrower_blacklist_entry(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
) -> None:
    serial, key = setup_license(state, admin, START)
    api = live_server.client(admin_token)
    sales = api.post("/api/v1/tokens", json={"name": "seller", "role": "sales"}).json()["token"]
    as_sales = live_server.client(sales)
    first = agent(1)
    _activate(live_server.client(), first, key, keyring)
    refused = as_sales.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": agent(2).locking_id})
    assert refused.status_code == 403 and "role sales" in refused.json()["detail"]
    assert as_sales.post("/api/v1/blacklist/export").status_code == 403
    assert as_sales.get("/api/v1/reports/blacklist-hits").status_code == 200
    # A container blacklisted whole stays so when a narrower entry is added later.
    lid = first.locking_id
    assert api.post("/api/v1/blacklist", json={"locking_id": lid}).json()["scope"] == "container"
    narrower = api.post("/api/v1/blacklist", json={"locking_id": lid, "revoke_recovered_only": True})
    assert narrower.json()["scope"] == "container"
    assert _checkin(live_server.client(), first, key, keyring).directives == ("lock",)
    # "revoke only" entries do not lock the container.
    other = agent(5).locking_id
    api.post("/api/v1/blacklist", json={"locking_id": other, "revoke_recovered_only": True})
    export = parse_blacklist(api.post("/api/v1/blacklist/export").json()["file"]).verify(keyring)
    assert export.container_entry(lid) is not None and export.container_entry(other) is None


def test_a_blacklisted_container_whose_hardware_drifted_is_still_refused(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
) -> None:
    _, key = setup_license(state, admin, START)
    listed = agent(1)
    api = live_server.client(admin_token)
    assert api.post("/api/v1/blacklist", json={"locking_id": listed.locking_id}).is_success
    drifted = FakeAgent(
        machine="m1",
        system_id="system-0001-abcdef",
        facts=[(k, "new-nic" if k == "n" else v) for k, v in listed.facts],
    )
    assert drifted.locking_id != listed.locking_id
    refused = live_server.client().post("/api/v1/activate", content=drifted.activation(key).to_json())
    assert refused.status_code == 403 and "blacklisted" in refused.json()["detail"]
    stranger = live_server.client().post("/api/v1/activate", content=agent(2).activation(key).to_json())
    assert stranger.status_code == 200


def _rehosted_with_a_limit(
    state: ServerState,
    admin: Principal,
    connect: httpx.Client,
    api: httpx.Client,
    keyring: Keyring,
    *,
    burst: int,
) -> tuple[str, str, FakeAgent]:
    """A license whose machine was rehosted away (its container blacklisted), with a
    server that records ``burst`` refusals of a license at once and one a minute more;
    the serial, the key and the old machine."""
    state.recorded_refusals = RefusalLimit(burst=burst, per_minute=1, total_burst=100, total_per_minute=100)
    serial, key = setup_license(state, admin, START)
    old, new = agent(1), agent(2)
    _activate(connect, old, key, keyring)
    rehost = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": new.locking_id})
    assert rehost.status_code == 200
    return serial, key, old


def test_refused_activations_are_recorded_within_a_limit_and_all_counted(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    """A blacklisted container's activation needs only a license key and a made-up key
    pair: each recorded one is a row, an audit entry and a webhook event. Past the limit
    they are still refused, and the next one recorded counts those left out."""
    connect, api = live_server.client(), live_server.client(admin_token)
    _, _, old = _rehosted_with_a_limit(state, admin, connect, api, keyring, burst=3)
    _, other_key = setup_license(state, admin, START)
    audit_before = _count(state, AuditEntry)
    for _ in range(10):
        refused = connect.post("/api/v1/activate", content=old.activation(other_key).to_json())
        assert refused.status_code == 403 and "blacklisted" in refused.json()["detail"]
    hits = api.get("/api/v1/reports/blacklist-hits").json()
    assert [(h["how"], h["suppressed"]) for h in hits] == [("activation", 0)] * 3
    assert _count(state, AuditEntry) == audit_before + 3
    # A minute later the allowance has one more: that hit counts the seven left out.
    clock.advance(timedelta(minutes=1))
    refused = connect.post("/api/v1/activate", content=old.activation(other_key).to_json())
    assert refused.status_code == 403
    hits = api.get("/api/v1/reports/blacklist-hits").json()
    assert [h["suppressed"] for h in hits] == [0, 0, 0, 7]
    assert sum(1 + h["suppressed"] for h in hits) == 11  # every refused activation counted
    with state.db.read() as session:
        last = session.execute(select(AuditEntry).order_by(AuditEntry.id.desc()).limit(1)).scalar_one()
    assert last.action == "blacklist.hit" and json.loads(last.details)["suppressed"] == 7


def test_a_blacklisted_machine_checking_in_again_and_again_is_counted_within_the_limit(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    """The honeypot answers every check-in with 'lock'; a machine that ignores it and keeps
    checking in is written down within the limit, and every check-in is counted."""
    connect, api = live_server.client(), live_server.client(admin_token)
    _, key, old = _rehosted_with_a_limit(state, admin, connect, api, keyring, burst=2)
    for _ in range(6):
        assert _checkin(connect, old, key, keyring).directives == ("lock",)
    assert [h["suppressed"] for h in api.get("/api/v1/reports/blacklist-hits").json()] == [0, 0]
    clock.advance(timedelta(minutes=1))
    assert _checkin(connect, old, key, keyring).directives == ("lock",)
    hits = api.get("/api/v1/reports/blacklist-hits").json()
    assert [(h["how"], h["action"], h["suppressed"]) for h in hits] == [
        ("checkin", "lock", 0),
        ("checkin", "lock", 0),
        ("checkin", "lock", 4),
    ]
    assert sum(1 + h["suppressed"] for h in hits) == 7


def test_an_existing_blacklist_entry_is_never_weakened(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
    clock: ManualClock,
) -> None:
    """A re-add, by hand or by a rehost, keeps the earlier enforcement day and the
    original reason; only stricter options (whole container, an earlier day) apply."""
    serial, key = setup_license(state, admin, START)
    api, connect = live_server.client(admin_token), live_server.client()
    old = agent(1)
    _activate(connect, old, key, keyring)
    lid = old.locking_id
    first = api.post("/api/v1/blacklist", json={"locking_id": lid, "reason": "stolen laptop"}).json()
    assert (first["delay_days"], first["reason"]) == (0, "stolen laptop")
    clock.advance(timedelta(days=3))
    again = api.post("/api/v1/blacklist", json={"locking_id": lid, "delay_days": 400}).json()
    assert (again["since"], again["delay_days"], again["reason"]) == (first["since"], 0, "stolen laptop")
    # A rehost that blacklists the old container with a delay does not postpone it either.
    moved = api.post(
        f"/api/v1/licenses/{serial}/rehost",
        json={"locking_id": agent(2).locking_id, "old_container": "blacklist", "delay_days": 90},
    )
    assert moved.status_code == 200, moved.text
    [entry] = [e for e in api.get("/api/v1/blacklist").json() if e["locking_id"] == lid]
    assert (entry["since"], entry["delay_days"], entry["reason"]) == (first["since"], 0, "stolen laptop")
    export = parse_blacklist(api.post("/api/v1/blacklist/export").json()["file"]).verify(keyring)
    listed = export.container_entry(lid)
    assert listed is not None and listed.enforced_on(clock.now().date())
    # Stricter options do apply: an earlier day, a whole container instead of recovered only.
    later = agent(3).locking_id
    assert api.post("/api/v1/blacklist", json={"locking_id": later, "delay_days": 30}).is_success
    clock.advance(timedelta(days=2))
    sooner = api.post("/api/v1/blacklist", json={"locking_id": later, "delay_days": 7}).json()
    assert (sooner["since"], sooner["delay_days"]) == (clock.now().date().isoformat(), 7)
    narrow = agent(4).locking_id
    api.post("/api/v1/blacklist", json={"locking_id": narrow, "revoke_recovered_only": True})
    whole = api.post("/api/v1/blacklist", json={"locking_id": narrow}).json()
    assert whole["scope"] == "container"
    log = api.get("/api/v1/audit", params={"target": lid}).json()
    added = [e for e in log if e["action"] == "blacklist.add"]
    assert len(added) == 1  # the re-adds that changed nothing wrote no audit line


def test_a_rehost_onto_a_blacklisted_container_whose_hardware_drifted_is_refused(
    live_server: LiveServer,
    state: ServerState,
    admin: Principal,
    admin_token: str,
    keyring: Keyring,
) -> None:
    """The rehost target is checked as tolerantly as an activation: a listed machine with
    one fact changed (a new hostname) is still that machine, so no recovery is used up and
    the license's working machine is not blacklisted."""
    serial, key = setup_license(state, admin, START, connect=False, recovery_allowance=1)
    api = live_server.client(admin_token)
    working, listed = agent(1), agent(2)
    _activate(live_server.client(), working, key, keyring)
    assert api.post("/api/v1/blacklist", json={"locking_id": listed.locking_id}).is_success
    drifted = FakeAgent(
        machine="m2",
        system_id="system-0002-abcdef",
        facts=[(k, "new-hostname" if k == "m" else v) for k, v in listed.facts],
    )
    assert drifted.locking_id != listed.locking_id
    refused = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": drifted.locking_id})
    assert refused.status_code == 403, refused.text
    assert refused.json()["detail"] == f"the target container {drifted.locking_id} is blacklisted"
    assert [e["locking_id"] for e in api.get("/api/v1/blacklist").json()] == [listed.locking_id]
    decisions = api.get(f"/api/v1/licenses/{serial}/recoveries").json()
    assert [(d["granted"], d["rule"]) for d in decisions] == [(False, "none")]
    # The allowance is untouched: a rehost to a clean machine still goes through.
    moved = api.post(f"/api/v1/licenses/{serial}/rehost", json={"locking_id": agent(3).locking_id})
    assert moved.status_code == 200 and moved.json()["rule"] == "allowance"
