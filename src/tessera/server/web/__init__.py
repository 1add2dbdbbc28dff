"""The web portal: pages for people (customers, partners, the vendor's staff) at ``/portal``.

Server-rendered HTML (Jinja2, autoescaped) that works without JavaScript; htmx, served
from here, only refreshes the license list as one types. A user signs in with a name and a
password (:mod:`tessera.server.users`) and then acts with the rights of an API token of the
same role and scope: the pages call the same services as the REST API, so a customer sees
and activates only their own licenses, readonly changes nothing.

What protects it:

* the session cookie is ``HttpOnly``, ``SameSite=Strict``, ``Secure`` over TLS and scoped
  to ``/portal``; the server keeps only its SHA-256;
* every form that changes something carries the session's CSRF token, and a POST whose
  ``Origin`` is another site is refused;
* every page has a Content-Security-Policy that allows only this server's own script and
  style (no inline code), is not cached and may not be framed.

The portal is off unless ``[interfaces] web_portal = true`` (SPEC section 5: defaults are
minimal); off, ``/portal`` is not routed at all.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from http import HTTPStatus
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, TypeVar
from urllib.parse import quote, unquote, urlsplit

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tessera.core.errors import FormatError, SignatureError, TesseraError
from tessera.core.protocol import MAX_MESSAGE_SIZE, ActivationRequest
from tessera.server import activation, catalog, licenses, orders, users
from tessera.server.errors import Conflict, Forbidden, RecordedRefusal, ServiceError
from tessera.server.hsm import HsmError
from tessera.server.limits import BodyTooLarge
from tessera.server.outage import RETRY_AFTER_SECONDS, describe_failure, outage_reason
from tessera.server.portal import PortalVerdict
from tessera.server.schemas import LicenseUpdate
from tessera.server.textcheck import BODY_CONTROL, control_character_error, reject_parameter_control
from tessera.server.tokens import Role
from tessera.server.web.issue import (
    ISSUERS,
    MAX_FIELDS,
    IssueForm,
    customer_choices,
    license_in,
    license_update,
    terms_values,
)

if TYPE_CHECKING:
    from tessera.server.app import ServerState

__all__ = ["COOKIE", "FailedSignIns", "PortalErrorPages", "portal_router"]

log = logging.getLogger("tessera.server")
T = TypeVar("T")

COOKIE = "tessera_portal"
PAGE_SIZE = 50
MAX_CONCURRENT_SIGN_INS = 4
#: Roles that may upload an offline request (readonly may not: it changes a license).
_ACTIVATORS = frozenset({Role.ADMIN, Role.SUPPORT, Role.SALES, Role.PARTNER, Role.CUSTOMER})
#: What the pages offer each role (the services check again: these only hide buttons).
_CHANGERS = frozenset({Role.ADMIN, Role.SUPPORT, Role.SALES, Role.PARTNER})
_CANCELLERS = frozenset({Role.ADMIN, Role.SALES})
_ORDER_READERS = frozenset({Role.ADMIN, Role.SUPPORT, Role.SALES, Role.READONLY, Role.CUSTOMER})
_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # same-origin, not no-referrer: under no-referrer a browser sends "Origin: null" with
    # its own forms, and the Origin check below could not tell them from a foreign site.
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_STATIC_TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}

_templates = Environment(
    loader=PackageLoader("tessera.server.web", "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    trim_blocks=True,
    lstrip_blocks=True,
)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("tessera.server.web") / "static"
    files = {}
    for item in folder.iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1]
        if item.is_file() and suffix in _STATIC_TYPES:
            files[item.name] = (item.read_bytes(), _STATIC_TYPES[suffix])
    return files


@dataclass(frozen=True, slots=True)
class _Page:
    """What a page handler hands back: a template and its values, or a redirect."""

    template: str | None = None
    values: dict[str, Any] | None = None
    status: int = 200
    redirect: str | None = None
    #: The redirect leaves the page the user is on: htmx navigates rather than swapping it in.
    whole_page: bool = False
    #: The work ended this session (the account locked): the page is shown signed out and
    #: the cookie cleared.
    signed_out: bool = False


#: Where a user who must set up two-step sign-in is sent (``[web_portal] two_step_roles``).
SET_UP_TWO_STEP: Final = "/portal/account#two-factor"


_HOME: Final = "/portal/licenses"


def _safe_next(target: str | None) -> str:
    """Only a path of this portal may be the target after sign-in (no open redirect).

    Dot segments are resolved first, as a browser resolves them in the Location it is
    sent (``%2e%2e`` included): ``/portal/../api/v1/tokens`` is not a portal path. A
    segment that decodes to a slash or backslash, a control character or anything with a
    scheme or host sends the user to the license list instead."""
    if not target or any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in target):
        return _HOME
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not parts.path.startswith("/"):
        return _HOME
    segments: list[str] = []
    for segment in parts.path.split("/")[1:]:
        decoded = unquote(segment)
        if "/" in decoded or "\\" in decoded:
            return _HOME
        if decoded == ".":
            continue
        if decoded == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    path = "/" + "/".join(segments)
    if not path.startswith("/portal/"):
        return _HOME
    return path + (f"?{parts.query}" if parts.query else "")


def portal_router(state: ServerState) -> APIRouter:
    # No control character in a page's path or query (a NUL would reach PostgreSQL).
    router = APIRouter(
        prefix="/portal", include_in_schema=False, dependencies=[Depends(reject_parameter_control)]
    )
    static = _static_files()
    # Each sign-in hashes with argon2id (64 MiB, tens of ms): a flood of them waits here
    # instead of taking every thread and gigabytes of memory from the rest of the server.
    sign_ins = asyncio.Semaphore(MAX_CONCURRENT_SIGN_INS)
    failures = FailedSignIns()

    def render(
        request: Request,
        template: str,
        values: dict[str, Any],
        *,
        status: int = 200,
        signed_in: users.SignedIn | None = None,
    ) -> HTMLResponse:
        role = signed_in.principal.role if signed_in is not None else None
        context = {
            "user": signed_in,
            "two_step_role": signed_in is not None and needs_two_step(signed_in),
            "can_activate": role in _ACTIVATORS,
            "can_change": role in _CHANGERS,
            "can_cancel": role in _CANCELLERS,
            "can_issue": role in ISSUERS,
            "sees_orders": role in _ORDER_READERS,
            "csrf": signed_in.csrf_token if signed_in is not None else "",
            "path": request.url.path,
            **values,
        }
        body = _templates.get_template(template).render(context)
        return HTMLResponse(body, status_code=status, headers=_HEADERS)

    def failure(
        request: Request, status: int, message: str, signed_in: users.SignedIn | None
    ) -> HTMLResponse:
        response = render(
            request, "error.html", {"status": status, "message": message}, status=status, signed_in=signed_in
        )
        if status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
        return response

    def navigate(request: Request, location: str) -> Response:
        """Send the browser to another whole page: htmx would swap it into the table the
        request came from (the license list's live filter), so it is told to navigate."""
        if request.headers.get("HX-Request"):
            return Response(status_code=204, headers={"HX-Redirect": location, **_HEADERS})
        return RedirectResponse(location, status_code=303, headers=_HEADERS)

    def to_login(request: Request) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return navigate(request, "/portal/login?next=" + quote(_safe_next(target), safe="/"))

    def clear_cookie(request: Request, response: Response) -> None:
        """Clear the session cookie with the flags it was set with (a browser matches them)."""
        response.delete_cookie(
            COOKIE, path="/portal", secure=request.url.scheme == "https", httponly=True, samesite="strict"
        )

    def cross_site(request: Request) -> bool:
        origin = request.headers.get("Origin")
        if origin is None or origin == "null":
            return origin == "null"
        own = f"{request.url.scheme}://{request.url.netloc}"
        return origin.rstrip("/") != own

    def needs_two_step(signed_in: users.SignedIn) -> bool:
        """Whether this user's role must sign in with two steps (``[web_portal]``)."""
        return signed_in.principal.role in state.two_step_roles

    def must_set_up(signed_in: users.SignedIn) -> bool:
        """Whether this user must set up two-step sign-in before anything else."""
        return needs_two_step(signed_in) and not signed_in.two_factor

    async def page(
        request: Request,
        work: Callable[[Session, users.SignedIn], _Page],
        *,
        form: dict[str, Any] | None = None,
        account: bool = False,
    ) -> Response:
        """Resolve the session and run ``work`` in one transaction (one hop to the thread
        pool): a read for a GET, a write for a POST, which must come from this site and
        carry the session's CSRF token. A GET writes only to record a session's activity,
        at most once a minute. A user who must set up two-step sign-in first
        (``[web_portal] two_step_roles``) gets only the ``account`` pages (and signing out):
        every other page sends them there."""
        secret = request.cookies.get(COOKIE)
        now = state.now()
        write = form is not None

        def run() -> tuple[users.SignedIn | None, _Page | None]:
            signed_in: users.SignedIn | None = None
            try:
                with state.db.write() if write else state.db.read() as session:
                    signed_in = users.resolve_session(session, secret, now)
                    if signed_in is None:
                        return None, None
                    if form is not None and form.get("csrf") != signed_in.csrf_token:
                        message = "this form has expired; reload the page and try again"
                        return signed_in, _Page("error.html", {"status": 403, "message": message}, 403)
                    if not account and must_set_up(signed_in):
                        return signed_in, _Page(redirect=SET_UP_TWO_STEP, whole_page=True)
                    if write:
                        users.touch_session(session, signed_in, now)
                    result = work(session, signed_in)
            except RecordedRefusal:
                raise
            except ServiceError as exc:  # rolled back: the page says why
                return signed_in, _Page("error.html", {"status": exc.status, "message": str(exc)}, exc.status)
            if not write and signed_in.stale:
                with state.db.write() as session:
                    users.touch_session(session, signed_in, now)
            return signed_in, result

        if request.method == "POST" and cross_site(request):
            return failure(request, 403, "refused: this form was sent from another site", None)
        try:
            signed_in, result = await run_in_threadpool(run)
        except RecordedRefusal as exc:
            await run_in_threadpool(state.keep_record, exc)
            return failure(request, exc.status, str(exc), None)
        except (DBAPIError, PoolTimeout) as exc:
            log.warning("database error: %s", describe_failure(exc))
            return failure(request, 503, outage_reason(exc), None)
        except HsmError as exc:
            log.error("the vendor key's HSM failed: %s", exc)
            return failure(request, 503, "the server cannot sign right now (its HSM is unavailable)", None)
        if signed_in is None or result is None:
            return to_login(request)
        if result.signed_out:
            template = result.template or "error.html"
            response = render(request, template, result.values or {}, status=result.status)
            clear_cookie(request, response)
            return response
        if result.redirect is not None:
            if result.whole_page:
                return navigate(request, result.redirect)
            return RedirectResponse(result.redirect, status_code=303, headers=_HEADERS)
        assert result.template is not None
        return render(
            request, result.template, result.values or {}, status=result.status, signed_in=signed_in
        )

    # ------------------------------------------------------------------ static

    @router.get("/static/{name}")
    async def static_file(name: str) -> Response:
        found = static.get(name)
        if found is None:
            return _error_page(f"/portal/static/{name}", 404, "no such file")
        body, media_type = found
        return Response(
            body,
            media_type=media_type,
            headers={"Cache-Control": "public, max-age=3600", "X-Content-Type-Options": "nosniff"},
        )

    # ------------------------------------------------------------------ sign in and out

    @router.get("")
    @router.get("/")
    async def home() -> Response:
        return RedirectResponse("/portal/licenses", status_code=303, headers=_HEADERS)

    @router.get("/login")
    async def login_form(request: Request) -> Response:
        target = _safe_next(request.query_params.get("next"))
        return render(request, "login.html", {"next": target, "error": None, "username": ""})

    @router.post("/login")
    async def login(request: Request) -> Response:
        if cross_site(request):
            return failure(request, 403, "refused: this form was sent from another site", None)
        form = await _form(request)
        if isinstance(form, Response):
            return form
        username = _text(form.get("username"))[:200]
        password = _text(form.get("password"))[:2000]
        code = _text(form.get("code"))[:20]
        target = _safe_next(_text(form.get("next")))
        now = state.now()
        address = request.client.host if request.client is not None else "unknown"
        if not failures.allowed(address, now):
            message = "too many failed sign-ins from your address: try again in a minute"
            page_ = render(
                request, "login.html", {"next": target, "error": message, "username": username}, status=429
            )
            page_.headers["Retry-After"] = str(int(FailedSignIns.SECONDS_PER_TRY))
            return page_

        def run() -> tuple[str, users.SignedIn] | users.SignInRefused:
            with state.db.write() as session:
                return users.sign_in(session, username, password, now, code=code, pepper=state.pepper)

        try:
            async with sign_ins:
                outcome = await run_in_threadpool(run)
        except (DBAPIError, PoolTimeout) as exc:
            log.warning("database error: %s", describe_failure(exc))
            return failure(request, 503, outage_reason(exc), None)
        if isinstance(outcome, users.SignInRefused):
            failures.failed(address, now)
            return render(
                request,
                "login.html",
                {"next": target, "error": outcome.reason, "username": username},
                status=401,
            )
        secret, signed_in = outcome
        if must_set_up(signed_in):
            target = SET_UP_TWO_STEP
        response = RedirectResponse(target, status_code=303, headers=_HEADERS)
        response.set_cookie(
            COOKIE,
            secret,
            max_age=int(users.SESSION_LIFETIME.total_seconds()),
            path="/portal",
            secure=request.url.scheme == "https",
            httponly=True,
            samesite="strict",
        )
        return response

    @router.post("/logout")
    async def logout(request: Request) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form

        def work(session: Session, _signed_in: users.SignedIn) -> _Page:
            users.sign_out(session, request.cookies.get(COOKIE))
            return _Page(redirect="/portal/login")

        response = await page(request, work, form=form, account=True)
        if response.status_code == 303:
            clear_cookie(request, response)
        return response

    # ------------------------------------------------------------------ licenses

    @router.get("/licenses")
    async def license_list(request: Request) -> Response:
        query = _text(request.query_params.get("q")).strip()[:100]
        status = request.query_params.get("status") or None
        if status not in (None, "active", "revoked"):
            status = None
        try:
            number = max(1, min(int(request.query_params.get("page", "1")), 100_000))
        except ValueError:
            number = 1

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            rows = licenses.list_licenses(
                session,
                signed_in.principal,
                customer_id=None,
                status=status,
                limit=PAGE_SIZE + 1,
                offset=(number - 1) * PAGE_SIZE,
                search=query or None,
            )
            values = {
                "licenses": rows[:PAGE_SIZE],
                "q": query,
                "status": status or "",
                "page": number,
                "more": len(rows) > PAGE_SIZE,
            }
            return _Page("licenses.html", values)

        return await page(request, work)

    def may_issue(signed_in: users.SignedIn) -> None:
        if signed_in.principal.role not in ISSUERS:
            raise Forbidden("issuing licenses needs the role admin, sales or partner")

    def issue_page(
        session: Session,
        signed_in: users.SignedIn,
        code: str,
        values: dict[str, str],
        *,
        error: str | None = None,
        status: int = 200,
    ) -> _Page:
        """The new-license form: a product to choose, then its features to fill in."""
        may_issue(signed_in)
        products = catalog.list_products(session)
        chosen = next((p for p in products if p.code == code), None)
        if code and chosen is None and error is None:
            error, status = f"product: there is no product {code}", 404
        form = None
        if chosen is not None:
            features = [(f.code, f.description) for f in chosen.features]
            form = IssueForm(chosen, features, values)
        page_values = {
            "products": products,
            "form": form,
            "customers": customer_choices(session, signed_in.principal) if form else [],
            "error": error,
        }
        return _Page("issue.html", page_values, status)

    @router.get("/licenses/new")
    async def license_new(request: Request) -> Response:
        code = _text(request.query_params.get("product")).strip()[:100]
        defaults = {"machines": "1", "failover_days": "30", "validation_hours": "24", "connect": "on"}
        return await page(request, lambda session, signed_in: issue_page(session, signed_in, code, defaults))

    @router.post("/licenses/new")
    async def license_issue(request: Request) -> Response:
        form = await _form(request, max_fields=MAX_FIELDS)
        if isinstance(form, Response):
            return form
        code = _text(form.get("product")).strip()[:100]
        values = {name: value for name, value in form.items() if isinstance(value, str) and name != "csrf"}
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            may_issue(signed_in)
            try:
                # A savepoint: a refusal after the first write (an order of another
                # customer) leaves nothing behind, and the form comes back filled in.
                with session.begin_nested():
                    data = license_in(form, catalog.get_product(session, code))
                    row, key = licenses.issue_license(session, signed_in.principal, data, now, state.pepper)
            except ServiceError as exc:
                return issue_page(session, signed_in, code, values, error=str(exc), status=exc.status)
            customer = row.customer
            issued = {"serial": row.serial, "key": key, "customer": customer, "product": code}
            return _Page("issued.html", issued, 201)

        return await page(request, work, form=form)

    @router.get("/licenses/{serial}")
    async def license_detail(request: Request, serial: str) -> Response:
        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            row = licenses.get_license(session, serial[:64])
            licenses.check_access(session, signed_in.principal, row, write=False)
            return _Page("license.html", {"license": licenses.license_view(row)})

        return await page(request, work)

    def edit_page(
        session: Session,
        signed_in: users.SignedIn,
        serial: str,
        values: dict[str, str] | None,
        *,
        error: str | None = None,
        status: int = 200,
        unchanged: bool = False,
    ) -> _Page:
        """A license's change form, filled in with its terms (or with ``values`` typed)."""
        if signed_in.principal.role not in _CHANGERS:
            raise Forbidden("changing a license needs the role admin, support, sales or partner")
        row = licenses.get_license(session, serial)
        licenses.check_access(session, signed_in.principal, row, write=True)
        view = licenses.license_view(row, with_machines=False)
        if len(view["locations"]) > 1:
            raise Conflict(f"license {serial} has several locations: change it with `tessera license update`")
        features = [(f.code, f.description) for f in row.product.features]
        form = IssueForm(row.product, features, terms_values(view) if values is None else values)
        page_values = {"license": view, "form": form, "error": error, "unchanged": unchanged}
        return _Page("edit.html", page_values, status)

    @router.get("/licenses/{serial}/edit")
    async def license_edit(request: Request, serial: str) -> Response:
        return await page(
            request, lambda session, signed_in: edit_page(session, signed_in, serial[:64], None)
        )

    @router.post("/licenses/{serial}/edit")
    async def license_change(request: Request, serial: str) -> Response:
        """A central change of the license's terms: a new revision, as ``license update``."""
        form = await _form(request, max_fields=MAX_FIELDS)
        if isinstance(form, Response):
            return form
        serial = serial[:64]
        values = {name: value for name, value in form.items() if isinstance(value, str) and name != "csrf"}
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            shown = edit_page(session, signed_in, serial, values)
            assert shown.values is not None
            view = shown.values["license"]
            if _text(form.get("revision")) != str(view["revision"]):
                message = (
                    f"license {serial} was changed meanwhile (now revision {view['revision']}): "
                    "the form below shows it as it is now"
                )
                return edit_page(session, signed_in, serial, None, error=message, status=409)
            try:
                with session.begin_nested():
                    update = license_update(form, shown.values["form"].product, view)
                    if update is None:
                        return edit_page(session, signed_in, serial, None, unchanged=True)
                    licenses.update_license(session, signed_in.principal, serial, update, now)
            except ServiceError as exc:
                return edit_page(session, signed_in, serial, values, error=str(exc), status=exc.status)
            return _Page(redirect=f"/portal/licenses/{quote(serial, safe='')}")

        return await page(request, work, form=form)

    @router.post("/licenses/{serial}/status")
    async def license_status(request: Request, serial: str) -> Response:
        """Revoke or reactivate: a central change, as ``license update`` makes it."""
        form = await _form(request)
        if isinstance(form, Response):
            return form
        status = _text(form.get("status"))
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            if status not in ("active", "revoked"):
                return _Page("error.html", {"status": 422, "message": "status: active or revoked"}, 422)
            update = LicenseUpdate.model_validate({"status": status})
            licenses.update_license(session, signed_in.principal, serial[:64], update, now)
            return _Page(redirect=f"/portal/licenses/{quote(serial[:64], safe='')}")

        return await page(request, work, form=form)

    # ------------------------------------------------------------------ orders

    @router.get("/orders")
    async def order_list(request: Request) -> Response:
        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            rows = orders.list_orders(session, signed_in.principal, customer_id=None, limit=200, offset=0)
            return _Page("orders.html", {"orders": rows})

        return await page(request, work)

    @router.get("/orders/{number:path}")
    async def order_detail(request: Request, number: str) -> Response:
        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            order = orders.get_order(session, signed_in.principal, number[:100])
            return _Page("order.html", {"order": orders.order_view(session, order)})

        return await page(request, work)

    @router.post("/orders/{number:path}/cancel")
    async def order_cancel(request: Request, number: str) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            orders.cancel_order(session, signed_in.principal, number[:100], now)  # twice: no change
            return _Page(redirect=f"/portal/orders/{quote(number[:100], safe='')}")

        return await page(request, work, form=form)

    # ------------------------------------------------------------------ offline activation

    @router.get("/activate")
    async def activate_form(request: Request) -> Response:
        def work(_session: Session, signed_in: users.SignedIn) -> _Page:
            if signed_in.principal.role not in _ACTIVATORS:
                return _Page("error.html", {"status": 403, "message": "your role may not activate"}, 403)
            return _Page("activate.html", {"result": None})

        return await page(request, work)

    @router.post("/activate")
    async def activate_upload(request: Request) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form
        upload = form.get("request")
        data = b""
        if isinstance(upload, UploadFile):
            data = await upload.read(MAX_MESSAGE_SIZE + 1)
        problem: str | None = None
        parsed: ActivationRequest | None = None
        if not data:
            problem = "request file: choose the file `tessera agent request` wrote"
        elif len(data) > MAX_MESSAGE_SIZE:
            problem = f"request file: larger than {MAX_MESSAGE_SIZE} bytes, not a request file"
        else:
            try:
                parsed = ActivationRequest.from_json(data)
            except FormatError as exc:
                problem = f"request file: {exc}"
            except (SignatureError, TesseraError) as exc:
                problem = f"request file: bad signature ({exc})"
        now = state.now()

        async def once(verdict: PortalVerdict | None) -> Response:
            def work(session: Session, signed_in: users.SignedIn) -> _Page:
                if problem is not None or parsed is None:
                    return _Page("activate.html", {"result": None, "error": problem}, 422)
                result = activation.activate_offline(
                    session, signed_in.principal, parsed, now, state.signing_key, state.pepper,
                    portal=state.portal is not None, portal_verdict=verdict,
                )  # fmt: skip
                files = [(f"{result.serial}.lic", result.license_file)]
                if result.identity_file is not None:
                    # The identity part first: the agent imports it before its license.
                    files.insert(0, (f"{result.serial}.par", result.identity_file))
                downloads = [
                    {
                        "name": name,
                        "text": text,
                        "href": "data:application/octet-stream;base64,"
                        + base64.b64encode(text.encode("utf-8")).decode("ascii"),
                    }
                    for name, text in files
                ]
                return _Page("activate.html", {"result": {"serial": result.serial, "files": downloads}})

            return await page(request, work, form=form)

        return await state.asking_portal(once)

    # ------------------------------------------------------------------ account

    @router.get("/account")
    async def account(request: Request) -> Response:
        return await page(request, lambda _s, _u: _Page("account.html", {"done": False}), account=True)

    @router.post("/account")
    async def change_password(request: Request) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form
        current = _text(form.get("current"))[:2000]
        new = _text(form.get("new"))[:2000]
        repeated = _text(form.get("repeat"))[:2000]
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            if new != repeated:
                return _Page("account.html", {"error": "password: the two new passwords differ"}, 422)
            refused = users.change_own_password(session, signed_in, current, new, now)
            if refused is not None:
                return _refused_here(refused, "error")
            return _Page("account.html", {"done": True})

        return await page(request, work, form=form, account=True)

    @router.post("/account/two-factor/start")
    async def two_factor_start(request: Request) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form

        def work(_session: Session, signed_in: users.SignedIn) -> _Page:
            offer = users.offer_totp(signed_in, state.pepper)
            return _Page("account.html", {"offer": offer, "qr": _qr(offer.uri)})

        return await page(request, work, form=form, account=True)

    @router.post("/account/two-factor/enable")
    async def two_factor_enable(request: Request) -> Response:
        """Turn two-step sign-in on, or move it to a new app (with a current code of the old)."""
        form = await _form(request)
        if isinstance(form, Response):
            return form
        secret, proof = _text(form.get("secret"))[:64], _text(form.get("proof"))[:64]
        code = _text(form.get("code"))[:20]
        current = _text(form.get("current"))[:20]
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            def again(message: str, status: int) -> _Page:
                # Offer the same secret again only if this server made it for this user.
                genuine = users.genuine_offer(signed_in, secret, proof, state.pepper)
                offer = (
                    users.TotpOffer(secret, users.totp_uri(secret, signed_in.username), proof)
                    if genuine
                    else None
                )
                qr = _qr(offer.uri) if offer else None
                return _Page("account.html", {"offer": offer, "qr": qr, "two_factor_error": message}, status)

            try:
                refused = users.enable_totp(
                    session, signed_in, secret, proof, code, now, state.pepper, current_code=current
                )
            except ServiceError as exc:
                return again(str(exc), exc.status)
            if refused is not None:  # committed: a wrong current code counts
                return (
                    _refused_here(refused, "two_factor_error")
                    if refused.signed_out
                    else again(refused.reason, 403)
                )
            return _Page("account.html", {"two_factor_done": "replaced" if signed_in.two_factor else "on"})

        return await page(request, work, form=form, account=True)

    @router.post("/account/two-factor/disable")
    async def two_factor_disable(request: Request) -> Response:
        form = await _form(request)
        if isinstance(form, Response):
            return form
        code = _text(form.get("code"))[:20]
        now = state.now()

        def work(session: Session, signed_in: users.SignedIn) -> _Page:
            if needs_two_step(signed_in):
                role = signed_in.principal.role
                message = f"two-step sign-in is required for the role {role}: it cannot be turned off"
                return _Page("account.html", {"two_factor_error": message}, 403)
            refused = users.disable_totp(session, signed_in, code, now, state.pepper)
            if refused is not None:
                return _refused_here(refused, "two_factor_error")
            return _Page("account.html", {"two_factor_done": "off"})

        return await page(request, work, form=form, account=True)

    async def _form(request: Request, *, max_fields: int = 10) -> dict[str, Any] | Response:
        try:
            parsed = await request.form(
                max_files=1, max_fields=max_fields, max_part_size=MAX_MESSAGE_SIZE + 1
            )
        except BodyTooLarge:
            raise  # the body limit answers 413 (as a page: PortalErrorPages)
        except Exception as exc:  # multipart's own errors carry no common base worth naming
            return failure(
                request, 400, f"form: {str(exc).splitlines()[0] if str(exc) else 'malformed'}", None
            )
        for name, value in parsed.multi_items():  # see tessera.server.textcheck
            if isinstance(value, str) and (reason := control_character_error(value, BODY_CONTROL)):
                return failure(request, 422, f"{name[:100]!r}: {reason}", None)
        return dict(parsed)

    return router


def _under_portal(path: str) -> bool:
    return path == "/portal" or path.startswith("/portal/")


def _one_line(status: int, body: bytes) -> str:
    """The one line a JSON error body (``{"detail": ...}``) says, for a page."""
    try:
        detail = json.loads(body).get("detail")
    except (ValueError, AttributeError, RecursionError):
        detail = None
    text = ""
    if isinstance(detail, str):
        text = "no such page" if status == 404 and detail == "no such endpoint" else detail
    elif isinstance(detail, list) and detail and isinstance(detail[0], dict):
        first = detail[0]  # a validation error: name the parameter, as the API's loc does
        where = [str(part) for part in first.get("loc", ()) if part not in ("path", "query", "body")]
        text = f"{'.'.join(where)}: {first.get('msg', '')}" if where else str(first.get("msg", ""))
    lines = text.strip().splitlines()
    return lines[0][:300] if lines else HTTPStatus(status).phrase.lower()


def _error_page(path: str, status: int, message: str) -> HTMLResponse:
    """The portal's error page for someone not known to be signed in (no menu)."""
    values = {"user": None, "path": path, "status": status, "message": message}
    return HTMLResponse(
        _templates.get_template("error.html").render(values), status_code=status, headers=_HEADERS
    )


#: Headers of an error answer that still apply to its page.
_KEPT_HEADERS = ("retry-after", "allow")


class PortalErrorPages:
    """Every error answer under ``/portal`` as a portal page with the portal's headers.

    The pages render their own refusals, but some answers are made before a page handler
    runs or outside it: a control character in a query parameter (the router's check, a
    422), an unknown path (404), a wrong method (405), the body limit (413, in front of
    everything), an outage or a bug. Those are the API's JSON, without the CSP or
    ``X-Frame-Options`` that docs/portal.md promises on every page. Outermost (plain
    ASGI), this turns any JSON error under ``/portal`` into the page with its one line,
    and an unhandled exception into a 500 page (the exception still reaches the log)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not _under_portal(path):
            await self.app(scope, receive, send)
            return
        held: Message | None = None
        body = bytearray()
        started = False

        async def page(status: int, message: str, kept: list[tuple[bytes, bytes]]) -> None:
            response = _error_page(path, status, message)
            response.raw_headers.extend(kept)
            await response(scope, receive, send)

        async def intercept(message: Message) -> None:
            nonlocal held, started
            if message["type"] == "http.response.start":
                started = True
                kind = Headers(raw=message.get("headers", [])).get("content-type", "")
                if message["status"] >= 400 and kind.startswith("application/json"):
                    held = message
                    return
            elif message["type"] == "http.response.body" and held is not None:
                body.extend(message.get("body", b""))
                if not message.get("more_body", False):
                    kept = [(k, v) for k, v in held.get("headers", []) if k.lower().decode() in _KEPT_HEADERS]
                    await page(held["status"], _one_line(held["status"], bytes(body)), kept)
                return
            await send(message)

        try:
            await self.app(scope, receive, intercept)
        except Exception:
            if not started:  # the server's error layer logs it and sends nothing more
                await page(500, "the server failed to answer this request (the cause is in its log)", [])
            raise


class FailedSignIns:
    """Failed sign-ins per client address: :data:`BURST` at once, then one more every
    :data:`SECONDS_PER_TRY` seconds. The per-account lockout stops guessing one account's
    password; this stops one address trying a few passwords on many accounts (credential
    stuffing) and unknown names, which have no account to lock. Refused attempts cost no
    argon2 hash. Behind a proxy every user shares the proxy's address (the server serves
    TLS itself, so there is none by default). In memory, per server process."""

    BURST = 10
    SECONDS_PER_TRY = 30.0

    def __init__(self) -> None:
        self._buckets: dict[str, tuple[float, datetime]] = {}
        self._lock = threading.Lock()

    def _tokens(self, address: str, now: datetime) -> float:
        tokens, at = self._buckets.get(address, (float(self.BURST), now))
        elapsed = max(0.0, (now - at).total_seconds())
        return min(float(self.BURST), tokens + elapsed / self.SECONDS_PER_TRY)

    def allowed(self, address: str, now: datetime) -> bool:
        with self._lock:
            return self._tokens(address, now) >= 1

    def failed(self, address: str, now: datetime) -> None:
        with self._lock:
            if len(self._buckets) > 10_000:  # forget addresses whose allowance is whole again
                self._buckets = {a: b for a, b in self._buckets.items() if self._tokens(a, now) < self.BURST}
            self._buckets[address] = (self._tokens(address, now) - 1, now)


def _refused_here(refused: users.SignInRefused, field: str) -> _Page:
    """A wrong password or code on the Account page: the form again with why (the attempt is
    committed: it counts towards the lockout), or, once it locked the account, a page
    saying so to a browser that is no longer signed in."""
    if refused.signed_out:
        return _Page("error.html", {"status": 403, "message": refused.reason}, 403, signed_out=True)
    return _Page("account.html", {field: refused.reason}, 403)


def _qr(uri: str) -> Markup:
    """The otpauth link as a QR code for the phone's camera: inline SVG (presentation
    attributes only), which the CSP allows where an image from a data: URL it would not."""
    import segno

    return Markup(segno.make(uri, error="m").svg_inline(scale=4, dark="#1d2330", light="#ffffff"))


def _text(value: object) -> str:
    return value if isinstance(value, str) else ""
