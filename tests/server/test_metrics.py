"""Prometheus metrics: what is counted, who may scrape, and that off means off.

Several worker processes adding up: ``tests/cli/test_metrics_workers.py``.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import select

from tessera.core.signing import Keyring
from tessera.server.app import Interfaces, ServerState
from tessera.server.metrics import STOCK_TTL, StockCollector, interface_of
from tessera.server.models import Customer
from tessera.server.tokens import Principal, Role, create_token

from .conftest import START, serve
from .helpers import activate, agent, setup_license


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    found = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            found[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return found


def token(state: ServerState, role: Role, **scope: int) -> str:
    with state.db.write() as session:
        return create_token(session, name=f"t-{role.value}", role=role, now=START, **scope)[1]


@pytest.mark.parametrize(
    ("path", "interface"),
    [
        ("/api/v1/checkin", "checkin"),
        ("/api/v1/activate", "activate"),
        ("/api/v1/activate-offline", "offline"),
        ("/api/v1/licenses/2026-000001", "admin"),
        ("/portal/licenses", "portal"),
        ("/metrics", "metrics"),
        ("/wp-login.php", "other"),
        ("/api/v2/x", "other"),
    ],
)
def test_paths_map_to_a_fixed_set_of_interfaces(path: str, interface: str) -> None:
    assert interface_of(path) == interface


def test_metrics_count_traffic_and_stock(state: ServerState, admin: Principal) -> None:
    _, key = setup_license(state, admin, START)
    readonly = token(state, Role.READONLY)
    with serve(state, Interfaces(metrics=True)) as live, live.client() as client:
        a = agent(1)
        assert client.post("/api/v1/activate", content=a.activation(key).to_json()).status_code == 200
        for _ in range(3):
            assert client.post("/api/v1/checkin", content=a.checkin(key).to_json()).status_code == 200
        assert client.post("/api/v1/checkin", content=b"{}").status_code == 422
        assert client.get("/wp-login.php").status_code == 404
        assert client.get("/api/v1/health").status_code == 200
        scraped = client.get("/metrics", headers={"Authorization": f"Bearer {readonly}"})
        assert scraped.status_code == 200, scraped.text
        assert scraped.headers["content-type"].startswith("text/plain")
        found = samples(scraped.text)
    requests = "tessera_http_requests_total"
    assert found[(requests, (("interface", "activate"), ("status", "200")))] == 1
    assert found[(requests, (("interface", "checkin"), ("status", "200")))] == 3
    assert found[(requests, (("interface", "checkin"), ("status", "422")))] == 1
    assert found[(requests, (("interface", "other"), ("status", "404")))] == 1
    assert found[("tessera_http_request_duration_seconds_count", (("interface", "checkin"),))] == 4
    assert found[("tessera_licenses", (("status", "active"),))] == 1
    assert found[("tessera_licenses", (("status", "revoked"),))] == 0
    assert found[("tessera_machines", ())] == 1
    assert found[("tessera_blacklist_hits", ())] == 0
    for state in ("pending", "delivered", "failed", "cancelled"):  # there before the first one
        assert found[("tessera_webhook_deliveries", (("state", state),))] == 0
    assert not any(name == requests and ("path", "/wp-login.php") in labels for name, labels in found)


def test_only_operators_may_scrape(state: ServerState, admin: Principal) -> None:
    setup_license(state, admin, START)
    with state.db.read() as session:
        customer_id = session.execute(select(Customer.id)).scalar_one()
    customer = token(state, Role.CUSTOMER, customer_id=customer_id)
    support = token(state, Role.SUPPORT)
    with serve(state, Interfaces(metrics=True)) as live, live.client() as client:
        assert client.get("/metrics").status_code == 401
        refused = client.get("/metrics", headers={"Authorization": f"Bearer {customer}"})
        assert refused.status_code == 403 and "role customer may not" in refused.json()["detail"]
        assert client.get("/metrics", headers={"Authorization": f"Bearer {support}"}).status_code == 200
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_off_means_not_routed_and_not_counted(state: ServerState, admin_token: str) -> None:
    with serve(state) as live, live.client(admin_token) as client:
        response = client.get("/metrics")
        assert response.status_code == 404 and response.json() == {"detail": "no such endpoint"}


def test_database_figures_are_cached_for_a_while(state: ServerState, admin: Principal) -> None:
    ticks = [100.0]
    collector = StockCollector(state.db, state.now, clock=lambda: ticks[0])

    def machines() -> float:
        return next(m for m in collector.collect() if m.name == "tessera_machines").samples[0].value

    _, key = setup_license(state, admin, START)
    assert machines() == 0
    activate(state, agent(1), key, Keyring([state.signing_key.public]))
    ticks[0] += STOCK_TTL - 1
    assert machines() == 0  # still the cached count
    ticks[0] += 1
    assert machines() == 1
