"""The server killed (SIGKILL) and restarted during a stream of check-ins loses none it
acknowledged.

A check-in answered with 200 and a response signed by the vendor key over the client's
nonce is a promise: the server has committed it. Agents keep checking in through three
kills and restarts on the same port; afterwards every acknowledged check-in must be a row
in ``checkins`` (same machine, same second), on SQLite and on PostgreSQL. Check-ins in
flight at the kill may or may not be recorded; unacknowledged ones are simply retried.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from tessera.core.errors import TesseraError
from tessera.core.protocol import ServerResponse
from tessera.core.signing import Keyring
from tessera.server.config import load_config
from tessera.server.models import Checkin, Machine
from tessera.server.storage import Database

from .conftest import backends, create_pg_database, drop_pg_database
from .helpers import FakeAgent, agent
from .processes import free_port, init_data_dir, start_server, stop_server

pytestmark = pytest.mark.reliability

MACHINES = 4
KILLS = 3 * int(os.environ.get("TESSERA_RELIABILITY_SCALE", "1"))  # `make reliability`: more
ACKS_BETWEEN_KILLS = 25  # the stream must be flowing before each kill
# Bounded in count (attempts, failed ones included: ~75 per agent while a server restarts) ...
MAX_ATTEMPTS_PER_AGENT = 500 * KILLS
STREAM_SECONDS = 30 * KILLS  # ... and in time


@pytest.fixture(params=backends())
def data_dir(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """An initialised data dir on each backend and its admin token."""
    pg = create_pg_database() if request.param == "postgresql" else None
    try:
        info = init_data_dir(tmp_path / "data", pg.url if pg else None)
        yield tmp_path / "data", info["admin_token"]
    finally:
        if pg is not None:
            drop_pg_database(pg)


def _license(url: str, token: str) -> str:
    admin = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30)
    product = {"code": "cortex", "name": "Cortex", "features": [{"code": "uniplex"}]}
    assert admin.post("/api/v1/products", json=product).status_code == 201
    customer = admin.post("/api/v1/customers", json={"name": "Restart Inc"}).json()
    issued = admin.post(
        "/api/v1/licenses",
        json={
            "customer_id": customer["id"],
            "product": "cortex",
            "entitlements": [{"feature": "uniplex", "count": 1}],
            "machines": MACHINES,
        },
    )
    assert issued.status_code == 201, issued.text
    key: str = issued.json()["key"]
    return key


class Stream:
    """Agents checking in until told to stop; what each saw acknowledged, by second."""

    def __init__(self, url: str, key: str, keyring: Keyring, agents: list[FakeAgent]) -> None:
        self.url, self.key, self.keyring, self.agents = url, key, keyring, agents
        self.acked: dict[str, Counter[datetime]] = {a.system_id: Counter() for a in agents}
        self.total = 0
        self.failures = 0
        self.errors: list[str] = []
        self.stop = threading.Event()
        self._lock = threading.Lock()

    def run(self, a: FakeAgent) -> None:
        deadline = time.monotonic() + STREAM_SECONDS
        with httpx.Client(timeout=10) as client:
            for _ in range(MAX_ATTEMPTS_PER_AGENT):
                if self.stop.is_set() or time.monotonic() > deadline:
                    return
                request = a.checkin(self.key)
                try:
                    answer = client.post(f"{self.url}/api/v1/checkin", content=request.to_json())
                except httpx.HTTPError:
                    with self._lock:
                        self.failures += 1
                    time.sleep(0.02)  # down: retry, as an agent would
                    continue
                if answer.status_code != 200:
                    self.errors.append(f"{answer.status_code} {answer.text[:200]}")
                    continue
                try:
                    response = ServerResponse.from_json(answer.content, self.keyring, request.nonce)
                except TesseraError as exc:
                    self.errors.append(f"bad signed response: {exc}")
                    continue
                with self._lock:
                    self.acked[a.system_id][response.server_time] += 1
                    self.total += 1


def test_acknowledged_checkins_survive_kill_9(data_dir: tuple[Path, str]) -> None:
    path, token = data_dir
    keyring = Keyring.loads((path / "vendor.pub").read_bytes())
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    proc = start_server(path, port)
    try:
        key = _license(url, token)
        agents = [agent(i) for i in range(MACHINES)]
        for a in agents:
            activated = httpx.post(f"{url}/api/v1/activate", content=a.activation(key).to_json())
            assert activated.status_code == 200, activated.text
        stream = Stream(url, key, keyring, agents)
        threads = [threading.Thread(target=stream.run, args=(a,)) for a in agents]
        for t in threads:
            t.start()
        rng = random.Random(3)
        try:
            for _ in range(KILLS):
                target = stream.total + ACKS_BETWEEN_KILLS
                deadline = time.monotonic() + 30
                while stream.total < target:
                    assert time.monotonic() < deadline, "the check-in stream stalled"
                    assert not stream.errors, stream.errors[:3]
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.05))
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
                proc = start_server(path, port)
            target = stream.total + ACKS_BETWEEN_KILLS  # it flows again after the last one
            deadline = time.monotonic() + 30
            while stream.total < target and time.monotonic() < deadline:
                time.sleep(0.005)
        finally:
            stream.stop.set()
            for t in threads:
                t.join(30)
    finally:
        stop_server(proc)
    assert stream.errors == []
    assert stream.total >= (KILLS + 1) * ACKS_BETWEEN_KILLS
    assert stream.failures > 0  # the kills really hit the stream

    db = Database(load_config(path).database)
    try:
        with db.read() as session:
            rows = session.execute(
                select(Machine.system_id, Checkin.at).join(Checkin, Checkin.machine_id == Machine.id)
            ).all()
    finally:
        db.dispose()
    recorded: dict[str, Counter[datetime]] = {a.system_id: Counter() for a in agents}
    for system_id, at in rows:
        recorded[system_id][at.astimezone(UTC)] += 1
    for system_id, acked in stream.acked.items():
        missing = acked - recorded[system_id]
        assert not missing, f"{system_id}: acknowledged but not on record: {missing}"
