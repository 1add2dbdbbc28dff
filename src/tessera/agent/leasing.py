"""Leasing features of a user-bound license with a credential file (the cloud container).

::

    from tessera.agent import LeaseClient

    with LeaseClient.from_file("ann.credential", server, ca_pem, keyring) as client:
        lease = client.hold("uniplex")   # leased, then renewed in the background
        ...                              # use the feature while lease.valid
    # leaving the block releases every held lease at once

The credential file is verified against the vendor keyring before anything is sent, so a
forged file never reaches the server. Requests are signed by the credential key and carry a
nonce; responses must be vendor-signed and echo it. Nothing about the user is sent but the
credential's user id.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx

from tessera.agent.connect import ConnectClient
from tessera.agent.errors import AgentError, BadResponse
from tessera.core.clock import Clock, SystemClock, utc
from tessera.core.credential import (
    LeaseRequest,
    LeaseResponse,
    SignedCredential,
    parse_credential,
)
from tessera.core.errors import FormatError, VerificationError
from tessera.core.signing import Keyring

__all__ = ["LEASE_PATH", "Lease", "LeaseClient", "LeaseError", "Released"]

LEASE_PATH = "/api/v1/lease"
log = logging.getLogger("tessera.agent.leasing")


class LeaseError(AgentError):
    """A lease could not be taken, renewed or released (the reason says why)."""


@dataclass
class Lease:
    """A feature held until ``expires`` (pushed out by each heartbeat)."""

    feature: str
    lease_id: str
    expires: datetime
    in_use: int
    count: int
    #: Seconds a lease lasts without a heartbeat (as the server granted it).
    duration: float = 60.0
    released: bool = False
    lost: str | None = field(default=None)

    def valid(self, now: datetime) -> bool:
        return not self.released and self.lost is None and utc(now) < self.expires


@dataclass(frozen=True)
class Released:
    """The answer to a release: ``released`` is False when the server held no such lease in
    force for this credential (released or expired already, or another user's): nothing
    changed, which is no error, since releasing twice must be harmless."""

    released: bool
    in_use: int


class LeaseClient:
    """Leases features for the holder of one credential file; thread-safe."""

    def __init__(
        self,
        credential: SignedCredential,
        server_url: str,
        ca_pem: bytes | None,
        keyring: Keyring,
        *,
        clock: Clock | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        credential.verify(keyring)  # a forged or foreign file fails here, before any request
        self.credential = credential
        self._clock = clock or SystemClock()
        self._connect = ConnectClient(server_url, ca_pem, keyring, transport)
        self._keyring = keyring
        self._held: dict[str, Lease] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        server_url: str,
        ca_pem: bytes | None,
        keyring: Keyring,
        **kwargs: object,
    ) -> LeaseClient:
        return cls(parse_credential(Path(path).read_bytes()), server_url, ca_pem, keyring, **kwargs)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ one request each

    def _send(self, action: str, feature: str, lease_id: str = "") -> LeaseResponse:
        request = LeaseRequest.create(action, self.credential, feature, self._clock.now(), lease_id)
        raw = self._connect.post_raw(LEASE_PATH, request.to_json())
        try:
            return LeaseResponse.from_json(raw, self._keyring, request.nonce)
        except FormatError as exc:
            raise BadResponse(f"the license server's answer is not a valid response: {exc}") from None
        except VerificationError as exc:
            raise BadResponse(f"the license server's answer cannot be trusted: {exc}") from None

    def lease(self, feature: str) -> Lease:
        """Take one unit of ``feature``; raises ``ServerRefused`` (e.g. all in use) otherwise."""
        r = self._send("lease", feature)
        if r.expires is None:
            raise BadResponse("the license server granted a lease without an expiry")
        period = r.expires - r.server_time
        expires = utc(self._clock.now()) + period
        return Lease(feature, r.lease_id, expires, r.in_use, r.count, period.total_seconds())

    def renew(self, lease: Lease) -> Lease:
        """Heartbeat: push the expiry out (refused once the lease expired or was freed)."""
        r = self._send("renew", lease.feature, lease.lease_id)
        if r.expires is None:
            raise BadResponse("the license server renewed a lease without an expiry")
        # Keep the local notion of expiry on the local clock: the same duration from now.
        lease.duration = (r.expires - r.server_time).total_seconds()
        lease.expires = utc(self._clock.now()) + (r.expires - r.server_time)
        lease.in_use, lease.count = r.in_use, r.count
        return lease

    def release(self, lease: Lease | str, feature: str | None = None) -> int:
        """Free a lease now; returns how many of the feature remain in use."""
        return self.give_back(lease, feature).in_use

    def give_back(self, lease: Lease | str, feature: str | None = None) -> Released:
        """:meth:`release`, telling also whether this call freed the lease."""
        lease_id = lease if isinstance(lease, str) else lease.lease_id
        code = feature if isinstance(lease, str) else lease.feature
        if code is None:
            raise ValueError("releasing by id needs the feature")
        r = self._send("release", code, lease_id)
        # The server names the lease it freed, or none (protocol: lease_id is empty).
        if r.lease_id not in ("", lease_id) or r.feature != code:
            raise BadResponse("the license server's answer is about another lease")
        if isinstance(lease, Lease):
            lease.released = True
        with self._lock:
            self._held.pop(lease_id, None)
        return Released(r.lease_id == lease_id, r.in_use)

    # ------------------------------------------------------------------ held leases

    def hold(self, feature: str) -> Lease:
        """Lease ``feature`` and keep it alive with heartbeats until :meth:`close`."""
        lease = self.lease(feature)
        with self._lock:
            self._held[lease.lease_id] = lease
            if self._heartbeat is None:
                self._heartbeat = threading.Thread(
                    target=self._beat, name="tessera-lease-heartbeat", daemon=True
                )
                self._heartbeat.start()
        return lease

    def _beat(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                held = list(self._held.values())
            now = utc(self._clock.now())
            wait = 30.0
            for lease in held:
                # Renew at a third of the remaining time: two heartbeats may fail in a row.
                left = (lease.expires - now).total_seconds()
                if left <= 0 or left <= self._period(lease) * 2 / 3:
                    try:
                        self.renew(lease)
                    except AgentError as exc:
                        log.warning("lease %s of %s lost: %s", lease.lease_id, lease.feature, exc)
                        lease.lost = str(exc)
                        with self._lock:
                            self._held.pop(lease.lease_id, None)
                        continue
                    left = (lease.expires - utc(self._clock.now())).total_seconds()
                wait = min(wait, max(0.05, left - self._period(lease) * 2 / 3))
            self._stop.wait(wait)

    @staticmethod
    def _period(lease: Lease) -> float:
        return max(1.0, lease.duration)

    def close(self) -> None:
        """Stop heartbeats and release every held lease at once (shutdown)."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join(5)
        with self._lock:
            held = list(self._held.values())
        for lease in held:
            try:
                self.release(lease)
            except AgentError as exc:
                log.warning("could not release lease %s: %s", lease.lease_id, exc)
        self._connect.close()

    def __enter__(self) -> LeaseClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
