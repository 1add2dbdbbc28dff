"""The vendor's own recovery portal, asked when a license's recovery rule says no.

CodeMeter automates manual authorization over SOAP; here the server POSTs a JSON question
to an HTTPS URL configured in ``tessera.toml``::

    [recovery]
    portal_url = "https://portal.example.com/tessera/recovery"
    portal_secret_file = "secrets/portal-hmac"     # relative to the data directory
    portal_timeout_seconds = 5
    portal_ca = "portal-ca.pem"                    # optional: a CA to trust for the portal

The body is signed with HMAC-SHA256 under the shared secret: header
``X-Tessera-Signature: sha256=<hex>`` over the exact body bytes; the body carries the time
and a random nonce so the portal can refuse replays. The portal answers ``200`` with
``{"allow": true|false, "reason": "..."}``. Anything else - a timeout, a refused
connection, another status, a body that is not that JSON - is a denial, with the reason
recorded.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import httpx

from tessera.server.config import PortalConfig

__all__ = ["PortalConfig", "RecoveryPortal", "sign_body"]

SIGNATURE_HEADER = "X-Tessera-Signature"


def sign_body(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


@dataclass(frozen=True, slots=True)
class PortalVerdict:
    allow: bool
    reason: str
    #: The question this verdict answers. The request is run again with the verdict in a
    #: new transaction, and the license may have moved meanwhile (another recovery got in
    #: while the portal thought): the verdict only applies to the same move it approved.
    question: Mapping[str, Any] | None = field(default=None, compare=False)

    def answers(self, serial: str, old_locking_id: str, new_locking_id: str) -> bool:
        """Was this verdict given for moving ``serial`` from ``old_locking_id`` to
        ``new_locking_id``? A verdict without its question answers nothing."""
        q = self.question
        return q is not None and (q.get("serial"), q.get("from"), q.get("to")) == (
            serial,
            old_locking_id,
            new_locking_id,
        )


class RecoveryPortal:
    """Asks the portal; never raises, a failure is a denial that says why."""

    def __init__(self, config: PortalConfig) -> None:
        self.config = config
        self._secret = config.secret_file.read_bytes().strip()
        if len(self._secret) < 16:
            raise ValueError(f"{config.secret_file}: the portal secret is too short")
        self._verify: ssl.SSLContext | bool = True
        if config.ca_file is not None:
            self._verify = ssl.create_default_context(cafile=str(config.ca_file))

    def ask(self, question: dict[str, Any]) -> PortalVerdict:
        """The portal's verdict on ``question``, which it carries (see :attr:`PortalVerdict.question`)."""
        return replace(self._ask(question), question=dict(question))

    def _ask(self, question: dict[str, Any]) -> PortalVerdict:
        body = json.dumps({**question, "nonce": secrets.token_urlsafe(16)}, sort_keys=True).encode()
        headers = {
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign_body(self._secret, body),
        }
        try:
            with httpx.Client(verify=self._verify, timeout=self.config.timeout_seconds) as client:
                response = client.post(self.config.url, content=body, headers=headers)
        except httpx.TimeoutException:
            return PortalVerdict(False, "the recovery portal did not answer in time")
        except httpx.HTTPError as exc:
            return PortalVerdict(False, f"the recovery portal cannot be reached ({type(exc).__name__})")
        if response.status_code != 200:
            return PortalVerdict(False, f"the recovery portal answered {response.status_code}")
        try:
            answer = response.json()
        except ValueError:
            return PortalVerdict(False, "the recovery portal's answer is not JSON")
        if not isinstance(answer, dict) or not isinstance(answer.get("allow"), bool):
            return PortalVerdict(False, "the recovery portal's answer has no allow: true|false")
        reason = answer.get("reason")
        text = reason[:200] if isinstance(reason, str) and reason.isprintable() else ""
        if answer["allow"]:
            return PortalVerdict(True, f"allowed by the recovery portal{': ' + text if text else ''}")
        return PortalVerdict(False, f"the recovery portal refused{': ' + text if text else ''}")
