"""User-bound licenses: credentials, leases, heartbeats, refusals, concurrency (both backends)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from tessera.core.clock import ManualClock
from tessera.core.credential import LeaseRequest, LeaseResponse, SignedCredential, parse_credential
from tessera.core.signing import Keyring
from tessera.server import leases, licenses
from tessera.server.app import ServerState
from tessera.server.errors import Invalid
from tessera.server.models import AuditEntry, Lease, WebhookDelivery
from tessera.server.schemas import LicenseUpdate
from tessera.server.tokens import Principal

from .conftest import START, LiveServer
from .helpers import setup_license


def user_license(state: ServerState, admin: Principal, count: int = 2) -> str:
    serial, _ = setup_license(
        state,
        admin,
        START,
        binding="user",
        entitlements=[{"feature": "uniplex", "count": count}, {"feature": "backup", "count": 1}],
    )
    return serial


def credential(state: ServerState, admin: Principal, serial: str, user: str = "ann") -> SignedCredential:
    with state.db.write() as session:
        text, _, _ = leases.issue_credential(session, admin, serial, user, state.now(), state.signing_key)
    return parse_credential(text)


def send(state: ServerState, request: LeaseRequest) -> LeaseResponse | leases.LeaseRefused:
    now = state.now()
    try:
        with state.db.write() as session:
            return leases.handle_lease(session, request, now, state.signing_key, state.lease_seconds)
    except leases.LeaseRefused as refusal:
        with state.db.write() as session:
            leases.record_refusal(session, refusal, now)
        return refusal


def lease(state: ServerState, cred: SignedCredential, feature: str = "uniplex") -> Any:
    return send(state, LeaseRequest.create("lease", cred, feature, state.now()))


def in_use(state: ServerState) -> int:
    with state.db.read() as session:
        return int(
            session.execute(
                select(func.count()).select_from(Lease).where(Lease.expires_at > state.now())
            ).scalar_one()
        )


def refusals(state: ServerState) -> list[dict[str, Any]]:
    with state.db.read() as session:
        rows = session.execute(
            select(AuditEntry).where(AuditEntry.action == "lease.refused").order_by(AuditEntry.id)
        ).scalars()
        return [json.loads(r.details) for r in rows]


def test_count_heartbeat_release_and_expiry(
    state: ServerState, admin: Principal, keyring: Keyring, clock: ManualClock
) -> None:
    serial = user_license(state, admin)
    ann = credential(state, admin, serial)
    assert ann.verify(keyring).user_id == "ann"
    first, second = lease(state, ann), lease(state, ann)
    assert isinstance(first, LeaseResponse) and isinstance(second, LeaseResponse)
    assert (first.in_use, second.in_use, second.count) == (1, 2, 2)
    third = lease(state, ann)
    assert isinstance(third, leases.LeaseRefused)
    assert third.reason == f"all 2 leases of uniplex on license {serial} are in use"
    assert refusals(state)[-1]["kind"] == "denied"
    # Other features count on their own.
    assert isinstance(lease(state, ann, "backup"), LeaseResponse)
    # Release frees one at once.
    released = send(state, LeaseRequest.create("release", ann, "uniplex", state.now(), first.lease_id))
    assert isinstance(released, LeaseResponse) and released.in_use == 1
    assert isinstance(lease(state, ann), LeaseResponse)
    # A heartbeat keeps a lease; without one it is freed after the lease duration.
    clock.advance(seconds=state.lease_seconds - 10)
    renewed = send(state, LeaseRequest.create("renew", ann, "uniplex", state.now(), second.lease_id))
    assert isinstance(renewed, LeaseResponse)
    assert renewed.expires == state.now() + timedelta(seconds=state.lease_seconds)
    clock.advance(seconds=20)  # the other uniplex lease (no heartbeat) is stale now
    fresh = lease(state, ann)
    assert isinstance(fresh, LeaseResponse) and fresh.in_use == 2
    expired = send(state, LeaseRequest.create("renew", ann, "uniplex", state.now(), first.lease_id))
    assert isinstance(expired, leases.LeaseRefused) and "expired or was released" in expired.reason


def test_reissued_credential_makes_the_old_one_fail_at_once(state: ServerState, admin: Principal) -> None:
    serial = user_license(state, admin)
    old = credential(state, admin, serial)
    held = lease(state, old)
    assert isinstance(held, LeaseResponse)
    new = credential(state, admin, serial)
    assert new.credential.generation == 2
    assert in_use(state) == 0  # the old credential's leases were freed with it
    for request in (
        LeaseRequest.create("lease", old, "uniplex", state.now()),
        LeaseRequest.create("renew", old, "uniplex", state.now(), held.lease_id),
    ):
        refused = send(state, request)
        assert isinstance(refused, leases.LeaseRefused)
        assert "replaced by a newer one" in refused.reason
    assert [r["kind"] for r in refusals(state)] == ["stale-credential", "stale-credential"]
    assert in_use(state) == 0
    assert isinstance(lease(state, new), LeaseResponse)


def test_forged_and_replayed_requests_change_nothing(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    serial = user_license(state, admin)
    ann = credential(state, admin, serial)
    other_serial = user_license(state, admin)
    bob = credential(state, admin, other_serial, "bob")
    # Bob's key, Ann's name and license: refused as forged.
    forged = replace(LeaseRequest.create("lease", bob, "uniplex", state.now()), serial=serial, user_id="ann")
    result = send(state, forged)
    assert isinstance(result, leases.LeaseRefused) and "forged" in result.reason
    # A user without a credential on this license.
    nobody = replace(LeaseRequest.create("lease", bob, "uniplex", state.now()), serial=serial)
    result = send(state, nobody)
    assert isinstance(result, leases.LeaseRefused)
    assert "no credential was issued to bob" in result.reason
    # The same request twice: the second is a replay.
    request = LeaseRequest.create("lease", ann, "uniplex", state.now())
    assert isinstance(send(state, request), LeaseResponse)
    replay = send(state, request)
    assert isinstance(replay, leases.LeaseRefused) and "replayed" in replay.reason
    # Much later (nonce forgotten): refused by its own time.
    clock.advance(hours=2)
    late = send(state, request)
    assert isinstance(late, leases.LeaseRefused) and "too far from the server's time" in late.reason
    assert in_use(state) == 0  # the one lease expired; none of the refused requests added one
    kinds = [r["kind"] for r in refusals(state)]
    assert kinds == ["forged", "forged", "replay", "replay"]
    with state.db.read() as session:
        events = session.execute(select(func.count()).select_from(WebhookDelivery)).scalar_one()
    assert events == 0  # no endpoints configured: the outbox stays empty


def test_credentials_only_for_user_bound_licenses(state: ServerState, admin: Principal) -> None:
    serial, _ = setup_license(state, admin, START)
    with pytest.raises(Invalid, match="machine-bound"), state.db.write() as session:
        leases.issue_credential(session, admin, serial, "ann", state.now(), state.signing_key)


def test_parallel_leases_never_exceed_the_count(
    live_server: LiveServer, admin: Principal, admin_token: str, keyring: Keyring
) -> None:
    state = live_server.state
    serial = user_license(state, admin, count=3)
    with live_server.client(admin_token) as client:
        issued = client.post(f"/api/v1/licenses/{serial}/credentials", json={"user_id": "ann"})
        assert issued.status_code == 201, issued.text
    ann = parse_credential(issued.json()["credential"])
    requests = [LeaseRequest.create("lease", ann, "uniplex", state.now()) for _ in range(40)]

    def post(request: LeaseRequest) -> int:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            response = c.post("/api/v1/lease", content=request.to_json())
        if response.status_code == 200:
            LeaseResponse.from_json(response.content, keyring, request.nonce)
        else:
            assert "are in use" in response.json()["detail"], response.text
        return response.status_code

    with ThreadPoolExecutor(16) as pool:
        codes = list(pool.map(post, requests))
    assert codes.count(200) == 3
    assert codes.count(403) == 37
    assert in_use(state) == 3
    with live_server.client(admin_token) as client:
        view = client.get(f"/api/v1/licenses/{serial}/leases").json()
    assert len(view["leases"]) == 3
    assert view["credentials"] == [
        {"user_id": "ann", "generation": 1, "issued_at": view["credentials"][0]["issued_at"]}
    ]


def test_malformed_lease_requests_get_422(live_server: LiveServer) -> None:
    with httpx.Client(base_url=live_server.url) as c:
        for body in (b"", b"[]", b'{"protocol":"tessera-connect/1"}', b"\xff" * 10):
            response = c.post("/api/v1/lease", content=body)
            assert response.status_code == 422, response.text
            assert isinstance(response.json()["detail"], str)


def test_refused_lease_requests_are_recorded_up_to_a_limit(
    live_server: LiveServer, admin: Principal, clock: ManualClock
) -> None:
    """A refusal needs no secret (a serial and a made-up user are enough), so each one
    recorded (an audit entry that can never be pruned, a webhook event) is rate-limited:
    20 at once per license, then one every 5 s; the next one recorded counts the rest."""
    state = live_server.state
    serial = user_license(state, admin)
    other = credential(state, admin, user_license(state, admin), "bob")

    def forge() -> int:
        request = replace(
            LeaseRequest.create("lease", other, "uniplex", state.now()), serial=serial, user_id="eve"
        )
        with httpx.Client(base_url=live_server.url) as c:
            response = c.post("/api/v1/lease", content=request.to_json())
        assert "no credential was issued to eve" in response.json()["detail"]
        return response.status_code

    assert [forge() for _ in range(25)] == [403] * 25  # every one answered as before
    recorded = refusals(state)
    assert len(recorded) == 20 and all("suppressed" not in r for r in recorded)
    clock.advance(seconds=5)
    assert forge() == 403
    latest = refusals(state)
    assert len(latest) == 21 and latest[-1]["suppressed"] == 5 and latest[-1]["kind"] == "forged"


def test_the_refusal_limit_holds_per_license_and_in_all() -> None:
    limit = leases.RefusalLimit(burst=2, per_minute=60, total_burst=3, total_per_minute=60)
    t0 = START
    assert [limit.admit("a", t0) for _ in range(3)] == [0, 0, None]  # a's two, then held back
    assert limit.admit("b", t0) == 0  # b's own allowance, the last of the total
    assert limit.admit("c", t0) is None  # c has its own, but the total is used up
    later = t0 + timedelta(seconds=1)  # one more for each, and for the total
    assert limit.admit("a", later) == 1  # one of a's was not recorded
    assert limit.admit("c", later) is None  # the total's one went to a
    assert limit.admit("c", t0 - timedelta(minutes=10)) is None  # a clock set back refills nothing
    assert limit.admit("c", later + timedelta(seconds=2)) == 3  # c's three held back


def test_held_back_refusals_are_logged_once_a_minute_at_most(caplog: pytest.LogCaptureFixture) -> None:
    limit = leases.RefusalLimit(burst=1, per_minute=1, total_burst=1, total_per_minute=1)
    with caplog.at_level("WARNING", logger="tessera.server"):
        verdicts = [limit.admit(f"serial-{n}", START + timedelta(seconds=n)) for n in range(50)]
        assert verdicts == [0] + [None] * 49  # the total allowance: one, then one a minute
        assert len(caplog.records) == 1
        assert limit.admit("serial-0", START + timedelta(seconds=120)) == 0
        assert limit.admit("serial-0", START + timedelta(seconds=121)) is None
    assert len(caplog.records) == 2


def test_a_late_request_for_an_unknown_serial_is_a_404_and_not_recorded(
    live_server: LiveServer, admin: Principal
) -> None:
    """An unknown serial is a 404 before the request's time is looked at, so made-up
    serials leave no audit entries; a known one is refused for its time."""
    state = live_server.state
    cred = credential(state, admin, user_license(state, admin))
    late = LeaseRequest.create("lease", cred, "uniplex", state.now() - timedelta(hours=1))
    with httpx.Client(base_url=live_server.url) as c:
        unknown = c.post("/api/v1/lease", content=replace(late, serial="2026-999999").to_json())
        known = c.post("/api/v1/lease", content=late.to_json())
    assert unknown.status_code == 404 and "unknown license 2026-999999" in unknown.json()["detail"]
    assert known.status_code == 403 and "too far from the server's time" in known.json()["detail"]
    assert [r["kind"] for r in refusals(state)] == ["replay"]


def set_count(state: ServerState, admin: Principal, serial: str, count: int) -> None:
    with state.db.write() as session:
        update = LicenseUpdate.model_validate({"entitlements": [{"feature": "uniplex", "count": count}]})
        licenses.update_license(session, admin, serial, update, state.now())


def slots(state: ServerState) -> dict[str, int]:
    with state.db.read() as session:
        rows = session.execute(select(Lease.lease_id, Lease.slot).where(Lease.expires_at > state.now()))
        return {lease_id: slot for lease_id, slot in rows}


def test_a_lowered_count_holds_for_new_leases_and_for_renewals(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    """The QA reproduction: count 3, slots 1 and 2 held (slot 0 released), count lowered to
    1. A new lease must not take free slot 0 while two are held; of the two leases over the
    count, the first to renew keeps going (moved into slot 0), the other ends at its renewal."""
    serial = user_license(state, admin, count=3)
    u1, u2, u3, u4 = (credential(state, admin, serial, user) for user in ("u1", "u2", "u3", "u4"))
    a, b, c = lease(state, u1), lease(state, u2), lease(state, u3)
    assert isinstance(a, LeaseResponse) and isinstance(b, LeaseResponse) and isinstance(c, LeaseResponse)
    released = send(state, LeaseRequest.create("release", u1, "uniplex", state.now(), a.lease_id))
    assert isinstance(released, LeaseResponse)
    set_count(state, admin, serial, 1)

    refused = lease(state, u4)
    assert isinstance(refused, leases.LeaseRefused), refused
    assert refused.reason == (
        f"all 1 leases of uniplex on license {serial} are in use (2 held: the count was lowered)"
    )
    assert (refused.kind, refused.in_use, refused.count) == ("denied", 2, 1)

    renewed = send(state, LeaseRequest.create("renew", u2, "uniplex", state.now(), b.lease_id))
    assert isinstance(renewed, LeaseResponse), renewed
    assert (renewed.in_use, renewed.count) == (2, 1)
    assert slots(state)[b.lease_id] == 0  # moved under the count
    ended = send(state, LeaseRequest.create("renew", u3, "uniplex", state.now(), c.lease_id))
    assert isinstance(ended, leases.LeaseRefused), ended
    assert ended.reason == (
        f"lease {c.lease_id} ends: license {serial} now grants 1 lease(s) of uniplex and "
        "all are in use (the count was lowered)"
    )
    assert (ended.kind, ended.in_use, ended.count) == ("denied", 2, 1)
    assert [r["kind"] for r in refusals(state)] == ["denied", "denied"]
    # The refused renewal changed nothing: that lease counts until its expiry, then frees.
    assert isinstance(lease(state, u4), leases.LeaseRefused)
    clock.advance(seconds=state.lease_seconds - 10)
    assert isinstance(
        send(state, LeaseRequest.create("renew", u2, "uniplex", state.now(), b.lease_id)), LeaseResponse
    )
    clock.advance(seconds=20)  # c expired
    assert slots(state) == {b.lease_id: 0}
    assert isinstance(lease(state, u4), leases.LeaseRefused)  # b holds the one lease
    send(state, LeaseRequest.create("release", u2, "uniplex", state.now(), b.lease_id))
    assert isinstance(lease(state, u4), LeaseResponse)


def test_a_lease_over_a_lowered_count_ends_only_when_no_slot_under_it_is_free(
    state: ServerState, admin: Principal
) -> None:
    serial = user_license(state, admin, count=3)
    ann = credential(state, admin, serial)
    held = [lease(state, ann) for _ in range(3)]
    assert all(isinstance(h, LeaseResponse) for h in held)
    set_count(state, admin, serial, 2)

    def renew(h: LeaseResponse) -> LeaseResponse | leases.LeaseRefused:
        return send(state, LeaseRequest.create("renew", ann, "uniplex", state.now(), h.lease_id))

    # All three in force, slots 0 and 1 taken: the lease in slot 2 ends, the others go on.
    assert isinstance(renew(held[2]), leases.LeaseRefused)
    assert isinstance(renew(held[0]), LeaseResponse) and isinstance(renew(held[1]), LeaseResponse)
    # Once slot 0 is free, the lease in slot 2 moves there instead of ending.
    send(state, LeaseRequest.create("release", ann, "uniplex", state.now(), held[0].lease_id))
    assert isinstance(renew(held[2]), LeaseResponse)
    assert slots(state) == {held[1].lease_id: 1, held[2].lease_id: 0}


def test_parallel_renewals_over_a_lowered_count_keep_the_count(
    live_server: LiveServer, admin: Principal, keyring: Keyring
) -> None:
    """Two leases over a count lowered to 1 renew at once, among 20 new lease requests:
    exactly one request succeeds (a renewal), on both backends."""
    state = live_server.state
    serial = user_license(state, admin, count=3)
    ann = credential(state, admin, serial)
    held = [lease(state, ann) for _ in range(3)]
    assert all(isinstance(h, LeaseResponse) for h in held)
    send(state, LeaseRequest.create("release", ann, "uniplex", state.now(), held[0].lease_id))
    set_count(state, admin, serial, 1)
    requests = [LeaseRequest.create("renew", ann, "uniplex", state.now(), h.lease_id) for h in held[1:]]
    requests += [LeaseRequest.create("lease", ann, "uniplex", state.now()) for _ in range(20)]

    def post(request: LeaseRequest) -> tuple[str, int]:
        with httpx.Client(base_url=live_server.url, timeout=60) as c:
            response = c.post("/api/v1/lease", content=request.to_json())
        if response.status_code == 200:
            LeaseResponse.from_json(response.content, keyring, request.nonce)
        else:
            assert "are in use" in response.json()["detail"], response.text
        return request.action, response.status_code

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(post, requests))
    assert [r for r in results if r[1] == 200] == [("renew", 200)]
    # The renewed lease moved to slot 0; the ended one keeps its slot until it expires.
    assert sorted(slots(state).values()) in ([0, 1], [0, 2])


def test_a_release_names_the_lease_only_if_it_freed_one(state: ServerState, admin: Principal) -> None:
    """Releasing stays idempotent (always answered), but the signed answer says whether it
    freed a lease: its lease_id is empty for another user's lease, a made-up id, a lease
    released before and one that expired."""
    serial = user_license(state, admin)
    ann, bob = credential(state, admin, serial), credential(state, admin, serial, "bob")
    held = lease(state, ann)
    assert isinstance(held, LeaseResponse)

    def release(cred: SignedCredential, lease_id: str) -> LeaseResponse:
        answer = send(state, LeaseRequest.create("release", cred, "uniplex", state.now(), lease_id))
        assert isinstance(answer, LeaseResponse), answer
        return answer

    for cred, lease_id in ((bob, held.lease_id), (ann, "ls_" + "A" * 24)):
        answer = release(cred, lease_id)
        assert (answer.lease_id, answer.in_use) == ("", 1)
    answer = release(ann, held.lease_id)
    assert (answer.lease_id, answer.in_use) == (held.lease_id, 0)
    assert release(ann, held.lease_id).lease_id == ""


def test_a_reissue_counts_only_the_leases_in_force_it_freed(
    state: ServerState, admin: Principal, clock: ManualClock
) -> None:
    serial = user_license(state, admin, count=3)
    ann = credential(state, admin, serial)
    assert isinstance(lease(state, ann), LeaseResponse)
    clock.advance(seconds=state.lease_seconds + 1)  # that one expired (its row is still there)
    assert isinstance(lease(state, ann, "backup"), LeaseResponse)
    with state.db.write() as session:
        _, generation, freed = leases.issue_credential(
            session, admin, serial, "ann", state.now(), state.signing_key
        )
    assert (generation, freed) == (2, 1)
    with state.db.read() as session:
        entry = (
            session.execute(
                select(AuditEntry)
                .where(AuditEntry.action == "credential.issue")
                .order_by(AuditEntry.id.desc())
            )
            .scalars()
            .first()
        )
        assert entry is not None and json.loads(entry.details)["leases_freed"] == 1
        assert session.execute(select(func.count()).select_from(Lease)).scalar_one() == 0
