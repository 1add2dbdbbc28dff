"""A real Tessera license server for the benchmarks: ``server init`` + ``server run``.

It is driven from the outside, exactly as an operator and the agents would: the CLI for
init and run, the admin REST API for the catalog and the licenses, the Connect endpoints
for the load. The only shortcut is the request bodies: they are built and signed with
``tessera.core.protocol`` ahead of time, so the load generator spends nothing on crypto.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.processes import LOOPBACK, free_port, serving
from tessera.core.fingerprint import locking_id_for
from tessera.core.protocol import (
    ActivationRequest,
    CheckinRequest,
    ServerResponse,
    new_system_id,
    open_checkin_key,
)
from tessera.core.signing import Keyring, SigningKey
from tessera.server.activation import checkin_key_for

__all__ = [
    "Installation",
    "Server",
    "activation_bodies",
    "checkin_bodies",
    "installations",
    "postgres_database",
    "server_unavailable",
    "tessera_server",
]

TESSERA = str(Path(sys.executable).parent / "tessera")
PRODUCT = "cortex"
FEATURES = ("uniplex", "backup", "ctxjs")
#: Where to create (and drop) a scratch database; override for another cluster.
POSTGRES_ADMIN_URL = os.environ.get(
    "TESSERA_BENCH_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)


def server_unavailable() -> str | None:
    """Why the server benchmarks cannot run here, or None when they can."""
    if (
        importlib.util.find_spec("tessera.server") is None
        or importlib.util.find_spec("tessera.server.app") is None
    ):
        return "server not available"
    if not Path(TESSERA).exists():
        return "tessera command not installed"
    return None


@dataclass(frozen=True, slots=True)
class Server:
    url: str
    port: int
    token: str
    data_dir: Path
    database: str
    ca: Path | None = None  # set when serving TLS

    def admin(self) -> httpx.Client:
        return httpx.Client(
            base_url=self.url,
            verify=str(self.ca) if self.ca else True,
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=60,
            trust_env=False,
        )

    def checkin_keys(self, insts: Sequence[Installation]) -> list[bytes]:
        """The check-in keys the activations of ``insts`` handed out, one per installation.

        The load generator throws the activation responses away, so they are derived here as
        the server derives them (from its secret in the data directory); :meth:`activate`
        proves on a fresh installation that this is what the server really seals.
        """
        pepper = (self.data_dir / "secrets" / "pepper").read_bytes()
        return [checkin_key_for(pepper, i.agent.public.to_base64()) for i in insts]

    def activate(self, inst: Installation) -> bytes:
        """Activate one installation the way an agent does; the check-in key it receives."""
        request = ActivationRequest.create(inst.license_key, inst.locking_id, inst.system_id, inst.agent)
        with self.admin() as client:
            reply = client.post("/api/v1/activate", content=request.to_json())
        reply.raise_for_status()
        keyring = Keyring.loads((self.data_dir / "vendor.pub").read_bytes())
        sealed = ServerResponse.from_json(reply.content, keyring, request.nonce).checkin_key
        if sealed is None:
            raise RuntimeError("the server handed out no check-in key")
        return open_checkin_key(sealed, inst.agent)

    def seed(self, licenses: int, machines_per_license: int) -> list[str]:
        """A product, a customer, ``licenses`` licenses; their license keys."""
        with self.admin() as client:
            r = client.post(
                "/api/v1/products",
                json={"code": PRODUCT, "name": "Cortex", "features": [{"code": f} for f in FEATURES]},
            )
            r.raise_for_status()
            r = client.post("/api/v1/customers", json={"name": "Bench Corp", "city": "Loopback"})
            r.raise_for_status()
            customer = r.json()["id"]
            body = {
                "customer_id": customer,
                "product": PRODUCT,
                "machines": machines_per_license,
                "entitlements": [{"feature": f, "count": 10} for f in FEATURES],
                "emergency": ["ctxjs"],
            }

            def issue(_: int) -> str:
                resp = client.post("/api/v1/licenses", json=body)
                resp.raise_for_status()
                return str(resp.json()["key"])

            with ThreadPoolExecutor(4) as pool:
                return list(pool.map(issue, range(licenses)))


@contextmanager
def tessera_server(database: str | None = None, *, tls: bool = False) -> Iterator[Server]:
    """An initialized server in a scratch directory on a free port (plain HTTP unless ``tls``)."""
    with tempfile.TemporaryDirectory(prefix="tessera-bench-server-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {**os.environ, "TESSERA_KEY_PASSPHRASE": "bench passphrase"}
        cmd = [TESSERA, "server", "init", "--data-dir", str(data_dir), "--json"]
        if database:
            cmd += ["--db", database]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"server init failed: {out.stderr.strip()[-300:]}")
        token = json.loads(out.stdout)["admin_token"]
        port = free_port()
        url = f"{'https' if tls else 'http'}://{LOOPBACK}:{port}"
        ca = data_dir / "tls" / "ca.pem"
        run = [TESSERA, "server", "run", "--data-dir", str(data_dir), "--host", LOOPBACK, "--port", str(port)]
        if not tls:
            run.append("--no-tls")
        health = f"{url}/api/v1/health"
        env = {"TESSERA_KEY_PASSPHRASE": "bench passphrase"}
        with serving(run, port=port, health=health, env=env, verify=str(ca) if tls else True):
            yield Server(url, port, token, data_dir, database or "sqlite", ca if tls else None)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A fresh PostgreSQL database for one run, dropped afterwards (even on failure)."""
    import psycopg

    name = f"tessera_bench_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    from sqlalchemy.engine import make_url

    url = make_url(POSTGRES_ADMIN_URL).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass(frozen=True, slots=True)
class Installation:
    """One simulated agent: its license key, machine, installation id and own key pair."""

    license_key: str
    locking_id: str
    system_id: str
    agent: SigningKey


def installations(
    keys: Sequence[str], per_license: int, prefix: str = "m", shared: Sequence[tuple[str, str]] = ()
) -> list[Installation]:
    """``per_license`` machines for each license key, each with a machine id, a DMI UUID and
    a NIC of its own, and the ``shared`` facts (kind, value) too: a fleet's common CPU model."""
    out = []
    for i, key in enumerate(keys):
        for j in range(per_license):
            facts = [("m", f"{prefix}-{i}-{j}"), ("u", f"uuid-{prefix}-{i}-{j}"), ("n", f"nic-{i}-{j}")]
            facts += shared
            out.append(
                Installation(key, str(locking_id_for(facts, PRODUCT)), new_system_id(), SigningKey.generate())
            )
    return out


def activation_bodies(insts: Sequence[Installation]) -> list[bytes]:
    return [
        ActivationRequest.create(i.license_key, i.locking_id, i.system_id, i.agent).to_json() for i in insts
    ]


def checkin_bodies(
    insts: Sequence[Installation], count: int, checkin_keys: Sequence[bytes] | None = None
) -> list[bytes]:
    """``count`` check-ins, round robin over ``insts``; each with its own nonce and MAC (or
    signature, without ``checkin_keys``)."""
    return [
        CheckinRequest.create(
            i.license_key,
            i.locking_id,
            i.system_id,
            i.agent,
            checkin_keys[n % len(insts)] if checkin_keys else None,
        ).to_json()
        for n, i in ((n, insts[n % len(insts)]) for n in range(count))
    ]
