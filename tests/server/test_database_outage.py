"""The database unreachable: the server answers 503 with a reason, then recovers by itself.

PostgreSQL is reached through a loopback TCP proxy that the test cuts (every connection
reset, new ones refused) and restores; the machine's PostgreSQL itself is never touched.
SQLite is made unavailable the way it happens in the field: another process holds an
exclusive lock on the database file (a backup tool, a forgotten ``sqlite3`` shell). In both
cases no request may get a 500 or hang, and once the database is back the same server
process serves again without a restart.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psycopg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from tessera.core.protocol import ServerResponse
from tessera.core.signing import Keyring
from tessera.server.outage import describe_failure, outage_reason

from .conftest import PG_ENV, _pg_admin_url, create_pg_database, drop_pg_database
from .helpers import FakeAgent, agent
from .processes import free_port, init_data_dir, start_server, stop_server
from .tcp_proxy import TcpProxy

pytestmark = pytest.mark.reliability

#: Bounds every request: a server that hangs fails the test instead of stalling it.
CLIENT_TIMEOUT = 20.0
RECOVERY_ATTEMPTS = 50
OUTAGES = 2 * int(os.environ.get("TESSERA_RELIABILITY_SCALE", "1"))  # `make reliability`: more


class Setup:
    def __init__(self, data_dir: Path, token: str) -> None:
        self.data_dir = data_dir
        self.keyring = Keyring.loads((data_dir / "vendor.pub").read_bytes())
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=CLIENT_TIMEOUT)
        self.admin = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=CLIENT_TIMEOUT,
        )
        self.agent: FakeAgent = agent(1)
        self.key = ""

    def issue_and_activate(self) -> None:
        product = {"code": "cortex", "name": "Cortex", "features": [{"code": "uniplex"}]}
        assert self.admin.post("/api/v1/products", json=product).status_code == 201
        customer = self.admin.post("/api/v1/customers", json={"name": "Outage Inc"}).json()
        issued = self.admin.post(
            "/api/v1/licenses",
            json={
                "customer_id": customer["id"],
                "product": "cortex",
                "entitlements": [{"feature": "uniplex", "count": 1}],
                "machines": 3,
            },
        )
        assert issued.status_code == 201, issued.text
        self.key = issued.json()["key"]
        answer = self.http.post("/api/v1/activate", content=self.agent.activation(self.key).to_json())
        assert answer.status_code == 200, answer.text

    def checkin(self) -> httpx.Response:
        request = self.agent.checkin(self.key)
        answer = self.http.post("/api/v1/checkin", content=request.to_json())
        if answer.status_code == 200:
            ServerResponse.from_json(answer.content, self.keyring, request.nonce)
        return answer


def _assert_unavailable(setup: Setup, *, reads_too: bool = True) -> None:
    """Connect and admin requests get 503 with a one-line reason; health still answers."""
    requests = [
        setup.checkin,
        lambda: setup.http.post("/api/v1/activate", content=agent(2).activation(setup.key).to_json()),
        lambda: setup.admin.post("/api/v1/products", json={"code": "outage", "name": "During Outage"}),
    ]
    if reads_too:
        requests.append(lambda: setup.admin.get("/api/v1/licenses"))
    for request in requests:
        answer = request()
        assert answer.status_code == 503, (answer.request.url, answer.status_code, answer.text)
        detail = answer.json()["detail"]
        assert isinstance(detail, str)
        assert "database" in detail
        assert answer.headers["Retry-After"].isdigit()
    assert setup.http.get("/api/v1/health").status_code == 200


def _assert_recovers(setup: Setup) -> None:
    """Without a restart: within a few attempts everything answers as before."""
    for _ in range(RECOVERY_ATTEMPTS):
        answer = setup.checkin()
        if answer.status_code == 200:
            break
        assert answer.status_code == 503, answer.text
        time.sleep(0.1)
    else:
        pytest.fail("the server did not recover once the database was back")
    assert setup.admin.get("/api/v1/licenses").status_code == 200
    assert setup.checkin().status_code == 200
    # The refused writes changed nothing: the product made during the outage is absent.
    assert "outage" not in [p["code"] for p in setup.admin.get("/api/v1/products").json()]
    assert setup.admin.get("/api/v1/audit/verify").json()["ok"] is True


@pytest.fixture
def postgres_proxy() -> Iterator[tuple[str, TcpProxy]]:
    if _pg_admin_url() is None:
        pytest.skip(f"{PG_ENV} not set")
    pg = create_pg_database()
    url = make_url(pg.url)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432))
    try:
        yield url.set(port=proxy.port).render_as_string(hide_password=False), proxy
    finally:
        proxy.close()
        drop_pg_database(pg)


def test_postgresql_unreachable_gives_503_and_recovers(
    postgres_proxy: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    db_url, proxy = postgres_proxy
    info = init_data_dir(tmp_path / "data", db_url)
    setup = Setup(tmp_path / "data", info["admin_token"])
    proc = start_server(setup.data_dir, setup.port)
    try:
        setup.issue_and_activate()
        assert setup.checkin().status_code == 200
        for _outage in range(OUTAGES):  # the pool survives more than one outage
            proxy.cut()
            _assert_unavailable(setup)
            proxy.restore()
            _assert_recovers(setup)
    finally:
        stop_server(proc)
    assert proc.returncode is not None


def test_postgresql_dropping_packets_gives_503_not_a_hang(
    postgres_proxy: tuple[str, TcpProxy], tmp_path: Path
) -> None:
    """A database host that accepts but never answers: the connect timeout turns it into 503."""
    db_url, proxy = postgres_proxy
    # The shortest connect timeout libpq honours, to keep the test quick; the server's
    # default (5 s) behaves the same.
    info = init_data_dir(tmp_path / "data", f"{db_url}?connect_timeout=2")
    setup = Setup(tmp_path / "data", info["admin_token"])
    proc = start_server(setup.data_dir, setup.port)
    try:
        setup.issue_and_activate()
        assert setup.checkin().status_code == 200
        proxy.stall()
        answer = setup.checkin()  # bounded by CLIENT_TIMEOUT: a hang fails here
        assert answer.status_code == 503, answer.text
        assert "database" in answer.json()["detail"]
        proxy.restore()
        _assert_recovers(setup)
    finally:
        stop_server(proc)


def test_sqlite_locked_gives_503_and_recovers(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    # A short lock wait keeps the test quick; the default (5 s) is tested the same way.
    info = init_data_dir(data_dir, f"sqlite:///{data_dir / 'tessera.db'}?timeout=1")
    setup = Setup(data_dir, info["admin_token"])
    proc = start_server(setup.data_dir, setup.port)
    try:
        setup.issue_and_activate()
        assert setup.checkin().status_code == 200
        # Another process takes the write lock and sits on it. In WAL mode readers go on,
        # so reads still answer while every write gets a 503 after the bounded wait.
        holder = sqlite3.connect(setup.data_dir / "tessera.db", isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            _assert_unavailable(setup, reads_too=False)
            assert setup.admin.get("/api/v1/licenses").status_code == 200
            # Queued writers are not served one lock wait after another: all are refused.
            with ThreadPoolExecutor(max_workers=8) as pool:
                codes = list(pool.map(lambda _: setup.checkin().status_code, range(8)))
            assert codes == [503] * 8
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        _assert_recovers(setup)
    finally:
        stop_server(proc)


def test_each_kind_of_database_trouble_has_its_own_reason() -> None:
    """The reason tells an operator where to look, and never carries the database's address."""
    refused = psycopg.OperationalError("connection to server at 10.0.0.7, port 5432 failed")
    cases = {
        OperationalError("SELECT 1", None, refused): "cannot reach its database",
        OperationalError("BEGIN", None, sqlite3.OperationalError("database is locked")): "busy",
        PoolTimeout("QueuePool limit of size 10 overflow 10 reached"): "overloaded",
        DBAPIError("SELECT 1", None, psycopg.DataError("bad")): "refused the request",
    }
    for exc, expected in cases.items():
        reason = outage_reason(exc)
        assert expected in reason
        assert "10.0.0.7" not in reason and "5432" not in reason


def test_a_full_disk_is_named_and_logs_stay_short() -> None:
    """SQLite's "database or disk is full" was answered "cannot reach its database"; the log
    line carried the whole statement with every parameter set (25 KB for 6 failures)."""
    full = OperationalError(
        "INSERT INTO x VALUES (?)", None, sqlite3.OperationalError("database or disk is full")
    )
    assert outage_reason(full) == "the server's database is out of disk space (its disk is full)"
    pg_full = OperationalError(
        "INSERT", None, psycopg.errors.DiskFull("could not extend file: No space left on device")
    )
    assert "disk is full" in outage_reason(pg_full)
    statement = "INSERT INTO checkins (a, b) VALUES (?, ?)" + " " * 10 + ", (?, ?)" * 2000
    params = [(f"secret-{i}", i) for i in range(2000)]
    line = describe_failure(
        OperationalError(statement, params, sqlite3.OperationalError("database or disk is full"))
    )
    assert line.startswith("OperationalError: database or disk is full [INSERT INTO checkins (a, b) VALUES")
    assert len(line) < 300 and "secret-" not in line
