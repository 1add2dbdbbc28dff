"""The FastAPI application: Connect endpoints for agents, the admin API for people and tools.

Endpoints are ``async``; the blocking part of a request (the database transaction, with the
token check and the signing inside it) runs as *one* hop to the thread pool, so the event
loop never waits on the database and no request pays for several hops. Every refusal is a
JSON body ``{"detail": "<one line>"}``; nothing a client sends produces a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from fastapi import APIRouter, Depends, FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp

from tessera.core.clock import Clock
from tessera.core.credential import LeaseRequest
from tessera.core.errors import FormatError, SignatureError, TesseraError
from tessera.core.protocol import MAX_MESSAGE_SIZE, MAX_REVISION, ActivationRequest, CheckinRequest
from tessera.core.signing import SigningKey
from tessera.server import (
    activation,
    activations,
    audit,
    bulk,
    catalog,
    leases,
    licenses,
    orders,
    recovery,
    users,
    webhooks,
)
from tessera.server.checkins import CheckinWriter
from tessera.server.checkpoints import CheckpointWatch
from tessera.server.config import DEFAULT_TWO_STEP_ROLES
from tessera.server.errors import Conflict, Invalid, RecordedRefusal, ServiceError
from tessera.server.hsm import HsmError
from tessera.server.lane import ConnectLane, Handler
from tessera.server.limits import BodySizeLimit
from tessera.server.models import AuditEntry, LicenseRevision
from tessera.server.outage import RETRY_AFTER_SECONDS, install_outage_handlers
from tessera.server.portal import PortalVerdict, RecoveryPortal
from tessera.server.refusals import RefusalLimit
from tessera.server.schemas import (
    AuditEntryOut,
    AuditReport,
    AuthorizeRecoveryIn,
    BlacklistAddIn,
    BulkIssued,
    BulkLicenseIn,
    CredentialIn,
    CredentialIssued,
    CustomerIn,
    CustomerOut,
    ErrorBody,
    FeatureIn,
    LicenseIn,
    LicenseIssued,
    LicenseSummary,
    LicenseUpdate,
    OfflineActivation,
    OrderCancelled,
    OrderOut,
    OrderSummary,
    PartnerIn,
    PartnerOut,
    ProductIn,
    ProductOut,
    RehostIn,
    RevokedToken,
    TokenIn,
    TokenOut,
    TokenView,
    UserIn,
    UserOut,
    UserUpdate,
    ValidationErrorBody,
    WebhookIn,
    WebhookOut,
)
from tessera.server.storage import Database
from tessera.server.textcheck import reject_control_characters
from tessera.server.tokens import (
    Principal,
    Role,
    create_token,
    list_tokens,
    require,
    resolve_token,
    revoke_token,
)
from tessera.server.webhooks import WebhookSettings, WebhookWorker

__all__ = ["Interfaces", "ServerState", "create_app"]

log = logging.getLogger("tessera.server")
#: No request body may be larger (Connect messages are capped lower, at MAX_MESSAGE_SIZE).
MAX_REQUEST_BODY = 4 * 1024 * 1024
T = TypeVar("T")
#: How many times one request asks the recovery portal before giving up (see
#: :meth:`ServerState.asking_portal`).
PORTAL_ASKS = 3

_ERRORS: dict[int | str, dict[str, Any]] = {
    **{code: {"model": ErrorBody} for code in (400, 401, 403, 404, 409, 413)},
    422: {"model": ValidationErrorBody},
}
_CONNECT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 403, 404, 413, 422, 503)
}


@dataclass
class ServerState:
    """What a running server holds: the store, the vendor key, the pepper, a clock."""

    db: Database
    signing_key: SigningKey
    pepper: bytes
    clock: Clock
    #: The vendor's recovery portal, asked when a recovery rule says no (optional).
    portal: RecoveryPortal | None = None
    lease_seconds: int = leases.DEFAULT_LEASE_SECONDS
    webhook_settings: WebhookSettings = field(default_factory=WebhookSettings)
    #: How many refused lease requests this process writes down (audit log, webhook).
    lease_refusals: RefusalLimit = field(default_factory=lambda: RefusalLimit(what="lease refusals"))
    #: Refused activations and recoveries (a blacklisted container, a denied recovery).
    recorded_refusals: RefusalLimit = field(
        default_factory=lambda: RefusalLimit(what="recorded activation and recovery refusals")
    )
    #: Web portal users of these roles need two-step sign-in (``[web_portal]``).
    two_step_roles: frozenset[str] = frozenset(DEFAULT_TWO_STEP_ROLES)

    def now(self) -> datetime:
        return self.clock.now().replace(microsecond=0)

    async def asking_portal(self, once: Callable[[PortalVerdict | None], Awaitable[T]]) -> T:
        """Run ``once``; if a recovery needs the portal, ask it (no transaction is open
        while it answers) and run ``once`` again with its verdict.

        The license may move while the portal answers (another recovery of it got in);
        then the verdict is for another move and the re-run asks again, about the move it
        would make now. After :data:`PORTAL_ASKS` questions the request is refused (409)
        rather than keeping a client waiting on a license that keeps moving."""
        verdict: PortalVerdict | None = None
        for _ in range(PORTAL_ASKS):
            try:
                return await once(verdict)
            except recovery.NeedsPortal as exc:
                assert self.portal is not None  # only raised when a portal is configured
                verdict = await run_in_threadpool(self.portal.ask, exc.question)
        try:
            return await once(verdict)
        except recovery.NeedsPortal as exc:
            raise Conflict(
                f"license {exc.question.get('serial')} was moved by another recovery while the "
                "recovery portal was asked: nothing changed, retry the recovery"
            ) from None

    def keep_record(self, refusal: RecordedRefusal) -> None:
        """The refused transaction was rolled back; its record goes in on its own, within
        the process's limit of recorded refusals (a refused request costs its sender
        little: :class:`~tessera.server.refusals.RefusalLimit`)."""
        suppressed = self.recorded_refusals.admit(refusal.serial, self.now())
        if suppressed is None:
            return
        with self.db.write() as session:
            refusal.record(session, suppressed)


_KEY = Field(pattern=r"^[0-9A-Za-z]{5}(-[0-9A-Za-z]{5}){4}$", examples=["K7QXM-2VDRT-9HFNA-PC4WE-8BZJY"])
_LOCKING_ID = Field(pattern=r"^TL1-[A-Z2-7]{8,400}$")
_SYSTEM_ID = Field(pattern=r"^[A-Za-z0-9_-]{8,64}$")
_NONCE = Field(pattern=r"^[A-Za-z0-9_-]{22}$")
_B64 = Field(pattern=r"^[A-Za-z0-9+/]+={0,2}$")


class _ActivationBody(BaseModel):
    """The activation request of ``docs/protocol.md`` (also the offline request file)."""

    model_config = ConfigDict(extra="forbid")
    protocol: Literal["tessera-connect/1"]
    type: Literal["activate"]
    license_key: str = _KEY
    locking_id: str = _LOCKING_ID
    system_id: str = _SYSTEM_ID
    nonce: str = _NONCE
    agent_key: str = _B64
    signature: str = _B64


class _LeaseBody(BaseModel):
    """The lease request of ``docs/leases.md``."""

    model_config = ConfigDict(extra="forbid")
    protocol: Literal["tessera-connect/1"]
    type: Literal["lease"]
    action: Literal["lease", "renew", "release"]
    serial: str
    user_id: str
    generation: int
    feature: str
    lease_id: str
    nonce: str = _NONCE
    sent: str
    signature: str = _B64


class _CheckinBody(BaseModel):
    """The check-in request of ``docs/protocol.md``."""

    model_config = ConfigDict(extra="forbid")
    protocol: Literal["tessera-connect/1"]
    type: Literal["checkin"]
    license_key: str = _KEY
    locking_id: str = _LOCKING_ID
    system_id: str = _SYSTEM_ID
    nonce: str = _NONCE
    accept: Literal["batch"] | None = None
    revision: int | None = Field(None, ge=1, le=MAX_REVISION)
    signature: str = _B64


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _unparsable_body(exc: BaseException | None) -> str | None:
    """Why FastAPI could not parse a JSON body, for the bodies its 400 "There was an error
    parsing the body" names no field and no reason for; None for any other 400."""
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {exc.start})"
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return None


class _AdminRoute(APIRoute):
    """A route whose unparsable body is a 422 naming ``body`` with the reason, shaped as the
    other validation errors (FastAPI answers a bare 400 for these)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except HTTPException as exc:
                reason = _unparsable_body(exc.__cause__) if exc.status_code == 400 else None
                if reason is None:
                    raise
                error = {"loc": ("body",), "msg": reason, "type": "json_invalid", "input": None}
                raise RequestValidationError([error]) from None

        return handle


bearer = HTTPBearer(
    auto_error=False, description="An API token made by `server init` or POST /api/v1/tokens."
)


@dataclass(frozen=True, slots=True)
class Interfaces:
    """Which optional interfaces this server offers (Connect is always on)."""

    admin_api: bool = True
    offline_activation: bool = True
    web_portal: bool = False
    metrics: bool = False


def create_app(state: ServerState, interfaces: Interfaces | None = None) -> FastAPI:
    """The app; an interface switched off is not routed at all (404, absent from OpenAPI)."""
    interfaces = interfaces or Interfaces()
    # Every admin route refuses control characters in its parameters and body (a NUL
    # would otherwise reach PostgreSQL, which refuses it: a 503 at the client's will).
    admin = APIRouter(dependencies=[Depends(reject_control_characters)], route_class=_AdminRoute)
    offline = APIRouter()
    checkins = CheckinWriter(state.db, state.pepper, state.signing_key)
    activation_writer = activations.ActivationWriter(state.db, state.signing_key, state.pepper)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Webhook delivery runs beside the requests, never inside one.
        worker = WebhookWorker(state.db, state.pepper, state.clock, state.webhook_settings)
        task = asyncio.create_task(worker.run(), name="tessera-webhooks")
        watch = CheckpointWatch(state.db, state.clock)
        watch_task = asyncio.create_task(watch.run(), name="tessera-checkpoints")
        try:
            yield
        finally:
            worker.stop()
            watch.stop()
            await run_in_threadpool(checkins.stop)
            await run_in_threadpool(activation_writer.stop)
            with contextlib.suppress(asyncio.CancelledError, TimeoutError):
                await asyncio.wait_for(asyncio.gather(task, watch_task), 15)

    app = _LanedApp(
        title="Tessera license server",
        version="1",
        description="Connect protocol (tessera-connect/1) for agents and the admin API.",
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.tessera = state
    app.add_middleware(BodySizeLimit, max_bytes=MAX_REQUEST_BODY)

    @app.exception_handler(ServiceError)
    async def _service_error(_request: Request, exc: ServiceError) -> JSONResponse:
        return _error(exc.status, str(exc))

    @app.exception_handler(IntegrityError)
    async def _integrity(_request: Request, _exc: IntegrityError) -> JSONResponse:
        return _error(409, "conflicting change (the record exists already or was changed concurrently)")

    install_outage_handlers(app)  # database down, locked or out of connections: 503

    @app.exception_handler(HsmError)
    async def _hsm_failed(_request: Request, exc: HsmError) -> JSONResponse:
        # The token went away or stopped signing: like a database outage, not the client's
        # fault and not a bug. The reason stays in the log (agents are on the public side).
        log.error("the vendor key's HSM failed: %s", exc)
        return JSONResponse(
            {"detail": "the server cannot sign right now (its HSM is unavailable)"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # Keep FastAPI's documented list shape but make sure it is always JSON-safe.
        errors = [
            {
                "loc": list(e.get("loc", ())),
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    async def in_transaction(
        work: Callable[[Session, Principal], T],
        credentials: HTTPAuthorizationCredentials | None,
        *,
        write: bool,
    ) -> T:
        token = credentials.credentials if credentials is not None else None

        def run() -> T:
            try:
                with state.db.write() if write else state.db.read() as session:
                    return work(session, resolve_token(session, token))
            except RecordedRefusal as exc:
                state.keep_record(exc)
                raise

        return await run_in_threadpool(run)

    Auth = Depends(bearer)

    # ------------------------------------------------------------------ connect

    async def _read_json(request: Request) -> bytes:
        """The body, read only up to the protocol's size limit (a huge upload is cut off)."""
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_MESSAGE_SIZE:
                raise FormatError("request is too large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _activate(request: Request, *, recover: bool) -> Response:
        try:
            body = await _read_json(request)
        except FormatError as exc:
            return _error(422, str(exc))
        return await answer_activation(body, recover=recover)

    async def answer_activation(body: bytes, *, recover: bool = False) -> Response:
        """The activation routes' work; :class:`ConnectLane` runs it too for ``/activate``."""
        try:
            if len(body) > MAX_MESSAGE_SIZE:
                raise FormatError("request is too large")
            parsed = ActivationRequest.from_json(body)
        except FormatError as exc:
            return _error(422, str(exc))
        except (SignatureError, TesseraError) as exc:
            return _error(403, f"bad request signature ({exc})")
        now = state.now()
        if not recover:
            try:
                body = await activation_writer.activate(parsed, now)
            except RecordedRefusal as exc:
                await run_in_threadpool(state.keep_record, exc)
                raise
            return Response(body, media_type="application/json")

        def run(verdict: PortalVerdict | None) -> bytes:
            try:
                with state.db.write() as session:
                    return activation.activate(
                        session, parsed, now, state.signing_key, state.pepper,
                        recover=recover, portal=state.portal is not None, portal_verdict=verdict,
                    ).to_json()  # fmt: skip
            except RecordedRefusal as exc:
                state.keep_record(exc)
                raise

        async def once(verdict: PortalVerdict | None) -> bytes:
            return await run_in_threadpool(run, verdict)

        return Response(await state.asking_portal(once), media_type="application/json")

    @app.post(
        "/api/v1/activate",
        tags=["connect"],
        openapi_extra=_body_schema(_ActivationBody),
        responses={200: {"description": "A vendor-signed server response"}, **_CONNECT_ERRORS},
    )
    async def activate(request: Request) -> Response:
        """Online activation: bind this machine and return its signed license file."""
        return await _activate(request, recover=False)

    @app.post(
        "/api/v1/recover",
        tags=["connect"],
        openapi_extra=_body_schema(_ActivationBody),
        responses={200: {"description": "A vendor-signed server response"}, **_CONNECT_ERRORS},
    )
    async def recover(request: Request) -> Response:
        """Activation that may move the license here from a bound machine (recovery rule)."""
        return await _activate(request, recover=True)

    @app.post(
        "/api/v1/checkin",
        tags=["connect"],
        openapi_extra=_body_schema(_CheckinBody),
        responses={200: {"description": "A vendor-signed server response"}, **_CONNECT_ERRORS},
    )
    async def checkin(request: Request) -> Response:
        """Periodic validation (Connect): signed by the agent key registered at activation."""
        try:
            body = await _read_json(request)
        except FormatError as exc:
            return _error(422, str(exc))
        return await answer_checkin(body)

    async def answer_checkin(body: bytes) -> Response:
        """The check-in route's work; :class:`ConnectLane` runs it too, ahead of the framework."""
        try:
            if len(body) > MAX_MESSAGE_SIZE:
                raise FormatError("request is too large")
            parsed = CheckinRequest.from_json(body)
        except FormatError as exc:
            return _error(422, str(exc))
        now = state.now()
        answer = await checkins.checkin(parsed, now)
        if isinstance(answer, bytes):
            return Response(answer, media_type="application/json")

        def run() -> bytes:  # the rare cases: a revision to ship, a recovered machine, a hit
            with state.db.write() as session:
                response = activation.checkin(
                    session, parsed, now, state.signing_key, state.pepper, hits=state.recorded_refusals
                )
                return response.to_json()

        return Response(await run_in_threadpool(run), media_type="application/json")

    @app.post(
        "/api/v1/lease",
        tags=["connect"],
        openapi_extra=_body_schema(_LeaseBody),
        responses={200: {"description": "A vendor-signed lease response"}, **_CONNECT_ERRORS},
    )
    async def lease(request: Request) -> Response:
        """Lease, renew (heartbeat) or release a feature of a user-bound license; signed by
        the user's credential key (``docs/leases.md``)."""
        try:
            parsed = LeaseRequest.from_json(await _read_json(request))
        except FormatError as exc:
            return _error(422, str(exc))
        now = state.now()

        def run() -> tuple[int, bytes | str]:
            try:
                with state.db.write() as session:
                    response = leases.handle_lease(
                        session, parsed, now, state.signing_key, state.lease_seconds
                    )
                    return 200, response.to_json()
            except leases.LeaseRefused as refusal:
                # An unknown serial has nobody to record it for; the others up to a limit.
                if refusal.status != 404:
                    suppressed = state.lease_refusals.admit(refusal.request.serial, now)
                    if suppressed is not None:
                        with state.db.write() as session:
                            leases.record_refusal(session, refusal, now, suppressed=suppressed)
                return refusal.status, refusal.reason

        status, body = await run_in_threadpool(run)
        if status != 200:
            return _error(status, str(body))
        return Response(body, media_type="application/json")

    @app.get("/api/v1/health", tags=["connect"])
    async def health() -> dict[str, str]:
        return {"status": "ok", "key_id": state.signing_key.key_id}

    # ------------------------------------------------------------------ catalog

    @admin.post(
        "/api/v1/products",
        status_code=201,
        response_model=ProductOut,
        tags=["catalog"],
        responses=_ERRORS,
    )
    async def create_product(data: ProductIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        now = state.now()
        return await in_transaction(
            lambda s, p: catalog.product_view(catalog.create_product(s, p, data, now)),
            credentials,
            write=True,
        )

    @admin.get("/api/v1/products", response_model=list[ProductOut], tags=["catalog"], responses=_ERRORS)
    async def list_products(credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        return await in_transaction(
            lambda s, p: [catalog.product_view(x) for x in catalog.list_products(s)],
            credentials,
            write=False,
        )

    @admin.get("/api/v1/products/{code}", response_model=ProductOut, tags=["catalog"], responses=_ERRORS)
    async def get_product(
        code: str = Path(max_length=64), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Any:
        return await in_transaction(
            lambda s, p: catalog.product_view(catalog.get_product(s, code)),
            credentials,
            write=False,
        )

    @admin.post(
        "/api/v1/products/{code}/features",
        response_model=ProductOut,
        status_code=201,
        tags=["catalog"],
        responses=_ERRORS,
    )
    async def add_feature(
        data: FeatureIn,
        code: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        return await in_transaction(
            lambda s, p: catalog.product_view(catalog.add_feature(s, p, code, data)),
            credentials,
            write=True,
        )

    @admin.post(
        "/api/v1/partners",
        response_model=PartnerOut,
        status_code=201,
        tags=["catalog"],
        responses=_ERRORS,
    )
    async def create_partner(data: PartnerIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            partner = catalog.create_partner(s, p, data, now)
            return {
                "id": partner.id,
                "code": partner.code,
                "name": partner.name,
                "namespace": partner.namespace,
            }

        return await in_transaction(work, credentials, write=True)

    def _customer(c: Any) -> dict[str, Any]:
        return {"id": c.id, "name": c.name, "city": c.city, "licensee": c.licensee}

    @admin.post(
        "/api/v1/customers",
        response_model=CustomerOut,
        status_code=201,
        tags=["catalog"],
        responses=_ERRORS,
    )
    async def create_customer(
        data: CustomerIn, credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Any:
        now = state.now()
        return await in_transaction(
            lambda s, p: _customer(catalog.create_customer(s, p, data, now)),
            credentials,
            write=True,
        )

    @admin.get(
        "/api/v1/customers/{customer_id}",
        response_model=CustomerOut,
        tags=["catalog"],
        responses=_ERRORS,
    )
    async def get_customer(
        customer_id: int = Path(ge=1, le=2**31 - 1),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        return await in_transaction(
            lambda s, p: _customer(catalog.get_customer(s, p, customer_id)),
            credentials,
            write=False,
        )

    # ------------------------------------------------------------------ licenses

    @admin.post(
        "/api/v1/licenses",
        response_model=LicenseIssued,
        status_code=201,
        tags=["licenses"],
        responses=_ERRORS,
    )
    async def issue_license(data: LicenseIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            row, key = licenses.issue_license(s, p, data, now, state.pepper)
            return {"serial": row.serial, "key": key, "revision": row.revision}

        return await in_transaction(work, credentials, write=True)

    @admin.post(
        "/api/v1/licenses/bulk",
        status_code=201,
        tags=["licenses"],
        responses={201: {"model": BulkIssued}, **_ERRORS},
    )
    async def issue_licenses_bulk(
        data: BulkLicenseIn, credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Response:
        """Issue up to 10,000 licenses from one template in one transaction: ``count``
        unbound ones, or one per ``locking_ids`` entry, pre-bound with its signed license
        file. Keys (and files) are in this response only; one audit entry for the request."""
        now = state.now()

        def work(s: Session, p: Principal) -> bytes:
            return bulk.issue_bulk(s, p, data, now, state.pepper, state.signing_key).to_json()

        body = await in_transaction(work, credentials, write=True)
        return Response(body, status_code=201, media_type="application/json")

    @admin.get(
        "/api/v1/licenses",
        response_model=list[LicenseSummary],
        tags=["licenses"],
        responses=_ERRORS,
    )
    async def list_licenses(
        customer_id: int | None = Query(None, ge=1, le=2**31 - 1),
        status: Literal["active", "revoked"] | None = Query(None),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=2**31 - 1),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        return await in_transaction(
            lambda s, p: licenses.list_licenses(
                s, p, customer_id=customer_id, status=status, limit=limit, offset=offset
            ),
            credentials,
            write=False,
        )

    def _readable_license(s: Session, p: Principal, serial: str) -> Any:
        row = licenses.get_license(s, serial)
        licenses.check_access(s, p, row, write=False)
        return row

    @admin.get("/api/v1/licenses/{serial}", tags=["licenses"], responses=_ERRORS)
    async def show_license(
        serial: str = Path(max_length=64), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> dict[str, Any]:
        return await in_transaction(
            lambda s, p: licenses.license_view(_readable_license(s, p, serial)),
            credentials,
            write=False,
        )

    @admin.patch("/api/v1/licenses/{serial}", tags=["licenses"], responses=_ERRORS)
    async def update_license(
        data: LicenseUpdate,
        serial: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> dict[str, Any]:
        now = state.now()
        return await in_transaction(
            lambda s, p: licenses.license_view(licenses.update_license(s, p, serial, data, now)),
            credentials,
            write=True,
        )

    @admin.get("/api/v1/licenses/{serial}/revisions", tags=["licenses"], responses=_ERRORS)
    async def license_revisions(
        serial: str = Path(max_length=64), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> list[dict[str, Any]]:
        def work(s: Session, p: Principal) -> list[dict[str, Any]]:
            row = _readable_license(s, p, serial)
            revisions = s.execute(
                select(LicenseRevision)
                .where(LicenseRevision.license_id == row.id)
                .order_by(LicenseRevision.revision)
            ).scalars()
            return [
                {
                    "revision": r.revision,
                    "actor": r.actor,
                    "at": r.created_at.isoformat(),
                    "license": json.loads(r.snapshot),
                }
                for r in revisions
            ]

        return await in_transaction(work, credentials, write=False)

    # ------------------------------------------------------------------ orders

    @admin.get("/api/v1/orders", response_model=list[OrderSummary], tags=["orders"], responses=_ERRORS)
    async def list_orders(
        customer_id: int | None = Query(None, ge=1, le=2**31 - 1),
        limit: int = Query(100, ge=1, le=1000),
        offset: int = Query(0, ge=0, le=2**31 - 1),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        """Orders, newest first (an order is made by the first license issued for it)."""
        return await in_transaction(
            lambda s, p: orders.list_orders(s, p, customer_id=customer_id, limit=limit, offset=offset),
            credentials,
            write=False,
        )

    # ``:path``: numbers with "/" were accepted before they were refused at issue; their
    # orders stay readable (and cancellable) with the slash encoded or not.
    @admin.get("/api/v1/orders/{number:path}", response_model=OrderOut, tags=["orders"], responses=_ERRORS)
    async def show_order(
        number: str = Path(max_length=100), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Any:
        return await in_transaction(
            lambda s, p: orders.order_view(s, orders.get_order(s, p, number)), credentials, write=False
        )

    @admin.post(
        "/api/v1/orders/{number:path}/cancel",
        response_model=OrderCancelled,
        tags=["orders"],
        responses=_ERRORS,
    )
    async def cancel_order(
        number: str = Path(max_length=100), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Any:
        """Cancel the order: each of its active licenses is revoked (a central change that
        reaches the installations at their next check-in); no license can be issued for it
        any more. Cancelling it again changes nothing (``cancelled_now`` is false)."""
        now = state.now()

        def cancel(session: Session, principal: Principal) -> dict[str, Any]:
            order, cancelled_now = orders.cancel_order(session, principal, number, now)
            return {**orders.order_view(session, order), "cancelled_now": cancelled_now}

        return await in_transaction(cancel, credentials, write=True)

    @offline.post(
        "/api/v1/activate-offline",
        response_model=OfflineActivation,
        tags=["licenses"],
        openapi_extra=_body_schema(_ActivationBody),
        responses=_ERRORS,
    )
    async def activate_offline(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> Any:
        """Upload an offline request file (``tessera agent request``); get the license file."""
        try:
            parsed = ActivationRequest.from_json(await _read_json(request))
        except FormatError as exc:
            return _error(422, f"request file: {exc}")
        except (SignatureError, TesseraError) as exc:
            return _error(403, f"request file: bad signature ({exc})")
        now = state.now()

        async def once(verdict: PortalVerdict | None) -> dict[str, Any]:
            def work(s: Session, p: Principal) -> dict[str, Any]:
                result = activation.activate_offline(
                    s, p, parsed, now, state.signing_key, state.pepper,
                    portal=state.portal is not None, portal_verdict=verdict,
                )  # fmt: skip
                return {
                    "serial": result.serial,
                    "license": result.license_file,
                    "identity": result.identity_file,
                }

            return await in_transaction(work, credentials, write=True)

        return await state.asking_portal(once)

    # ------------------------------------------------------------------ recovery and blacklist

    @admin.post("/api/v1/licenses/{serial}/rehost", tags=["recovery"], responses=_ERRORS)
    async def rehost_license(
        data: RehostIn,
        serial: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> dict[str, Any]:
        """Move the license to a new container (Locking ID) under its recovery rule."""
        now = state.now()

        async def once(verdict: PortalVerdict | None) -> dict[str, Any]:
            return await in_transaction(
                lambda s, p: recovery.rehost(
                    s,
                    p,
                    serial,
                    locking_id=data.locking_id,
                    slot=data.slot,
                    old_container=data.old_container,
                    delay_days=data.delay_days,
                    now=now,
                    signing_key=state.signing_key,
                    portal=state.portal is not None,
                    portal_verdict=verdict,
                ),
                credentials,
                write=True,
            )

        return await state.asking_portal(once)

    @admin.post("/api/v1/licenses/{serial}/authorize-recovery", tags=["recovery"], responses=_ERRORS)
    async def authorize_recovery(
        data: AuthorizeRecoveryIn,
        serial: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> dict[str, Any]:
        """Support grants extra recoveries beyond the license's rule."""
        now = state.now()
        return await in_transaction(
            lambda s, p: recovery.authorize_recovery(s, p, serial, data.count, now),
            credentials,
            write=True,
        )

    @admin.get("/api/v1/licenses/{serial}/recoveries", tags=["recovery"], responses=_ERRORS)
    async def license_recoveries(
        serial: str = Path(max_length=64), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> list[dict[str, Any]]:
        """Every recovery decision on the license, granted or denied, with its reason."""
        return await in_transaction(
            lambda s, p: recovery.list_recoveries(s, p, serial), credentials, write=False
        )

    @admin.post("/api/v1/blacklist", status_code=201, tags=["recovery"], responses=_ERRORS)
    async def blacklist_add(
        data: BlacklistAddIn, credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> dict[str, Any]:
        now = state.now()
        return await in_transaction(
            lambda s, p: recovery.add_to_blacklist(
                s,
                p,
                data.locking_id,
                recovered_only=data.revoke_recovered_only,
                delay_days=data.delay_days,
                reason=data.reason,
                now=now,
            ),
            credentials,
            write=True,
        )

    @admin.get("/api/v1/blacklist", tags=["recovery"], responses=_ERRORS)
    async def blacklist_list(
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> list[dict[str, Any]]:
        return await in_transaction(lambda s, p: recovery.list_blacklist(s, p), credentials, write=False)

    @admin.post("/api/v1/blacklist/export", tags=["recovery"], responses=_ERRORS)
    async def blacklist_export(
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> dict[str, Any]:
        """A signed blacklist file with the next sequence number, to ship with the product."""
        now = state.now()
        return await in_transaction(
            lambda s, p: recovery.export_blacklist(s, p, now, state.signing_key),
            credentials,
            write=True,
        )

    @admin.get("/api/v1/reports/blacklist-hits", tags=["recovery"], responses=_ERRORS)
    async def blacklist_hits(
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> list[dict[str, Any]]:
        """Every time a blacklisted or recovered container was caught, for follow-up."""
        return await in_transaction(lambda s, p: recovery.blacklist_hits(s, p), credentials, write=False)

    # ------------------------------------------------------------------ tokens and audit

    @admin.post(
        "/api/v1/tokens",
        response_model=TokenOut,
        status_code=201,
        tags=["admin"],
        responses=_ERRORS,
    )
    async def make_token(data: TokenIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            require(p, Role.ADMIN)
            partner_id = customer_id = None
            if data.role is Role.PARTNER:
                if data.partner is None:
                    raise Invalid("partner: a partner token needs the partner's code")
                partner_id = catalog.get_partner_by_code(s, data.partner).id
            if data.role is Role.CUSTOMER:
                if data.customer_id is None:
                    raise Invalid("customer_id: a customer token needs the customer's id")
                customer_id = catalog.get_customer(s, p, data.customer_id).id
            elif data.customer_id is not None:
                raise Invalid("customer_id: only a customer token belongs to a customer")
            if data.partner is not None and data.role is not Role.PARTNER:
                raise Invalid("partner: only a partner token belongs to a partner")
            row, secret = create_token(
                s,
                name=data.name,
                role=data.role,
                now=now,
                partner_id=partner_id,
                customer_id=customer_id,
            )
            audit.append(
                s,
                at=now,
                actor=p.actor,
                action="token.create",
                target=f"token:{row.id}",
                details={
                    "name": data.name,
                    "role": data.role.value,
                    "partner": data.partner,
                    "customer_id": customer_id,
                },
            )
            return {"id": row.id, "name": row.name, "role": data.role, "token": secret}

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/tokens", response_model=list[TokenView], tags=["admin"], responses=_ERRORS)
    async def get_tokens(credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        """Every token with its id, revoked ones too; the secrets were shown once and are
        not kept, their hashes are not shown."""
        return await in_transaction(lambda s, p: list_tokens(s, p), credentials, write=False)

    @admin.delete("/api/v1/tokens/{token_id}", response_model=RevokedToken, tags=["admin"], responses=_ERRORS)
    async def delete_token(
        token_id: int = Path(ge=1, le=2**31 - 1),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        """Revoke a token (it stays listed, revoked). The caller's own token may be revoked,
        the last active admin token may not (409): nothing else could make a new one."""
        now = state.now()
        return await in_transaction(lambda s, p: revoke_token(s, p, token_id, now), credentials, write=True)

    @admin.post("/api/v1/users", response_model=UserOut, status_code=201, tags=["admin"], responses=_ERRORS)
    async def create_user(data: UserIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        """A person for the web portal (``[interfaces] web_portal``), with the rights of an
        API token of the same role and scope."""
        now = state.now()
        password = data.password or users.generate_password()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            user = users.create_user(
                s, p, username=data.username, password=password, role=data.role, now=now,
                partner_code=data.partner, customer_id=data.customer_id,
            )  # fmt: skip
            return {**users.user_view(user, now), "password": None if data.password else password}

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/users", response_model=list[UserOut], tags=["admin"], responses=_ERRORS)
    async def list_users(credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        now = state.now()
        return await in_transaction(
            lambda s, p: [users.user_view(u, now) for u in users.list_users(s, p)], credentials, write=False
        )

    @admin.patch("/api/v1/users/{username}", response_model=UserOut, tags=["admin"], responses=_ERRORS)
    async def update_user(
        data: UserUpdate,
        username: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        """A new password (given, or generated and shown once), disable or enable, unlock.
        A new password and disabling end the user's portal sessions."""
        if data.password is not None and data.generate_password:
            return _error(422, "password: give a password or generate_password, not both")
        now = state.now()
        password = users.generate_password() if data.generate_password else data.password

        def work(s: Session, p: Principal) -> dict[str, Any]:
            user = users.update_user(
                s, p, username, now=now, password=password, disabled=data.disabled, unlock=data.unlock,
                reset_two_factor=data.reset_two_factor,
            )  # fmt: skip
            return {**users.user_view(user, now), "password": password if data.generate_password else None}

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/audit", response_model=list[AuditEntryOut], tags=["admin"], responses=_ERRORS)
    async def audit_log(
        target: str | None = Query(None, max_length=200),
        limit: int = Query(100, ge=1, le=10_000),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        def work(s: Session, p: Principal) -> list[dict[str, Any]]:
            require(p, Role.SUPPORT, Role.READONLY)
            stmt = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
            if target is not None:
                stmt = stmt.where(AuditEntry.target == target)
            return [
                {
                    "id": e.id,
                    "at": e.at,
                    "actor": e.actor,
                    "action": e.action,
                    "target": e.target,
                    "details": json.loads(e.details),
                }
                for e in s.execute(stmt).scalars()
            ]

        return await in_transaction(work, credentials, write=False)

    @admin.get("/api/v1/audit/verify", response_model=AuditReport, tags=["admin"], responses=_ERRORS)
    async def audit_verify(credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        def work(s: Session, p: Principal) -> dict[str, Any]:
            require(p, Role.SUPPORT, Role.READONLY)
            report = audit.verify_chain(s)
            return {
                "ok": report.ok,
                "rows": report.rows,
                "head": report.head,
                "problems": report.problems,
            }

        return await in_transaction(work, credentials, write=False)

    # ------------------------------------------------------------------ credentials, leases

    @admin.post(
        "/api/v1/licenses/{serial}/credentials",
        response_model=CredentialIssued,
        status_code=201,
        tags=["licenses"],
        responses=_ERRORS,
    )
    async def issue_credential(
        data: CredentialIn,
        serial: str = Path(max_length=64),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> Any:
        """Issue (or re-issue, invalidating the old one) a user's credential file."""
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            text, generation, freed = leases.issue_credential(
                s, p, serial, data.user_id, now, state.signing_key
            )
            return {
                "serial": serial,
                "user_id": data.user_id,
                "generation": generation,
                "leases_freed": freed,
                "credential": text,
            }

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/licenses/{serial}/leases", tags=["licenses"], responses=_ERRORS)
    async def license_leases(
        serial: str = Path(max_length=64), credentials: HTTPAuthorizationCredentials | None = Auth
    ) -> dict[str, Any]:
        """Credentials (user id, generation) and the leases in force now."""
        now = state.now()
        return await in_transaction(
            lambda s, p: leases.list_leases(s, p, serial, now), credentials, write=False
        )

    # ------------------------------------------------------------------ webhooks

    @admin.post(
        "/api/v1/webhooks",
        response_model=WebhookOut,
        status_code=201,
        tags=["webhooks"],
        responses=_ERRORS,
    )
    async def add_webhook(data: WebhookIn, credentials: HTTPAuthorizationCredentials | None = Auth) -> Any:
        """Register an endpoint for license events; the secret is returned this once."""
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            require(p, Role.ADMIN)
            row, secret = webhooks.add_endpoint(
                s,
                url=data.url,
                secret=data.secret,
                events=data.events,
                ca_pem=data.ca,
                pepper=state.pepper,
                now=now,
            )
            audit.append(
                s,
                at=now,
                actor=p.actor,
                action="webhook.add",
                target=f"webhook:{row.id}",
                # The audit log is read by support and readonly too: no secret of the URL.
                details={"url": webhooks.redact_url(row.url), "events": data.events},
            )
            return {**webhooks.endpoint_view(row), "secret": secret}

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/webhooks", tags=["webhooks"], responses=_ERRORS)
    async def list_webhooks(
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> list[dict[str, Any]]:
        def work(s: Session, p: Principal) -> list[dict[str, Any]]:
            require(p, Role.ADMIN)
            return webhooks.list_endpoints(s)

        return await in_transaction(work, credentials, write=False)

    @admin.delete("/api/v1/webhooks/{endpoint_id}", tags=["webhooks"], responses=_ERRORS)
    async def remove_webhook(
        endpoint_id: int = Path(ge=1, le=2**31 - 1),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> dict[str, Any]:
        now = state.now()

        def work(s: Session, p: Principal) -> dict[str, Any]:
            require(p, Role.ADMIN)
            webhooks.remove_endpoint(s, endpoint_id)
            audit.append(
                s, at=now, actor=p.actor, action="webhook.remove",
                target=f"webhook:{endpoint_id}", details={},
            )  # fmt: skip
            return {"id": endpoint_id, "removed": True}

        return await in_transaction(work, credentials, write=True)

    @admin.get("/api/v1/webhooks/deliveries", tags=["webhooks"], responses=_ERRORS)
    async def webhook_deliveries(
        status: Literal["pending", "delivered", "failed", "cancelled"] | None = Query(None),
        limit: int = Query(100, ge=1, le=10_000),
        credentials: HTTPAuthorizationCredentials | None = Auth,
    ) -> list[dict[str, Any]]:
        def work(s: Session, p: Principal) -> list[dict[str, Any]]:
            require(p, Role.ADMIN, Role.SUPPORT)
            return webhooks.list_deliveries(s, status, limit)

        return await in_transaction(work, credentials, write=False)

    @app.exception_handler(404)
    async def _not_found(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(404, "no such endpoint")

    if interfaces.admin_api:
        app.include_router(admin)
    if interfaces.offline_activation:
        app.include_router(offline)
    if interfaces.web_portal:
        from tessera.server.web import PortalErrorPages, portal_router  # Jinja2 loads only here

        app.include_router(portal_router(state))
        # Outside the body limit, so that its 413 becomes a page too.
        app.add_middleware(PortalErrorPages)
    if interfaces.metrics:
        _add_metrics(app, state)
    # In front of the whole middleware stack, so check-ins and online activations skip it
    # (``lane.py``).
    app.lanes = {"/api/v1/checkin": answer_checkin, "/api/v1/activate": answer_activation}
    return app


def _add_metrics(app: _LanedApp, state: ServerState) -> None:
    """``GET /metrics`` (Prometheus text format) and the counting layer around everything."""
    from tessera.server.metrics import Metrics, StockCollector  # prometheus_client only if on

    metrics = Metrics(StockCollector(state.db, state.now))
    app.metrics = metrics

    @app.get("/metrics", include_in_schema=False)
    async def scrape(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Response:
        token = credentials.credentials if credentials is not None else None

        def run() -> bytes:
            with state.db.read() as session:
                require(resolve_token(session, token), Role.SUPPORT, Role.READONLY)
            return metrics.exposition()

        body = await run_in_threadpool(run)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")


class _LanedApp(FastAPI):
    """FastAPI with :class:`ConnectLane` s in front of all of its middleware, its own too
    (error, telemetry and body-limit layers cost a check-in about 10 µs more); with
    metrics on, their counting layer is in front of the lanes."""

    lanes: dict[str, Handler]
    metrics: Any

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.lanes = {}
        self.metrics = None

    def build_middleware_stack(self) -> ASGIApp:
        app = super().build_middleware_stack()
        for path, handler in self.lanes.items():
            app = ConnectLane(
                app,
                path=path,
                handler=handler,
                exception_handlers=self.exception_handlers,
                max_body=MAX_MESSAGE_SIZE,
            )
        if self.metrics is not None:
            from tessera.server.metrics import MetricsMiddleware

            app = MetricsMiddleware(app, self.metrics)
        return app
