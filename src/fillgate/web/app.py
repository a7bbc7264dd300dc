"""The dashboard's web application (Starlette, Jinja2 templates, htmx).

:class:`Web` is one server: its settings, the adapter over the library
(:class:`fillgate.web.data.Dashboard`, the only way pages reach a ledger), the templates and
the CSRF secret, with one method per page or action and the table of routes
(:meth:`Web.routes`). :class:`Guard` checks every request first. Safety, in one place:

- a token, when the server has one (required off loopback): a cookie set by ``/login`` or
  ``?token=``, or ``Authorization: Bearer``; anything else gets 401;
- on loopback without a token, only loopback ``Host`` headers are served (no DNS rebinding);
- every state-changing request is a POST carrying the CSRF token of its browser session;
- ``read_only`` hides every action and refuses its POST;
- Jinja2 escapes everything it prints; the Content-Security-Policy allows only this server's
  own scripts; errors are pages that say what was wrong, never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import math
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from fillgate.counts import LABELS, PLAN_COUNTS
from fillgate.errors import EXIT_REFUSED, FillgateError, RunNotFoundError
from fillgate.ledger import Run
from fillgate.redact import mask_secrets
from fillgate.runs import WRITING_KINDS, RunKind, RunStatus, interrupted, shown_status
from fillgate.values import format_policy
from fillgate.web import data
from fillgate.web.metrics import render_metrics
from fillgate.web.planindex import KINDS, PAGE, PlanStatus

HERE = Path(__file__).parent
log = logging.getLogger("fillgate.web")

SESSION_COOKIE = "fillgate_session"
TOKEN_COOKIE = "fillgate_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
MAX_PAGE = 10**9  # past any list's end (and inside every database's integers)
REVERTING_STAGES = "reverting-stages"
MESSAGES: dict[str, str] = {
    "pause": "Pause requested: the run pauses after its current batch.",
    "cancel": "Cancel requested: the run stops after its current batch.",
    RunStatus.PAUSED: "The run is paused.",
    RunStatus.CANCELLED: "The run is cancelled.",
    "resumed": "The run continues in the dashboard's server.",
    "reverting": "The revert started in the dashboard's server.",
    "approved": "Your approval of this plan file is recorded.",
    REVERTING_STAGES: "The revert of the pipeline's last applied stage started in the dashboard's server; the "
                      "reverts of the stages before it follow, one after the other.",
}

Page = Callable[[Request], Response]
Action = Callable[[Request, FormData], Response]
Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass
class Settings:
    config_path: str | Path | None
    targets: list[str] | None
    cache_dir: Path
    read_only: bool = False
    token: str | None = None
    loopback: bool = True


def _fmt_num(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_when(value: object) -> str:
    return "" if value is None else str(value)


def _plan_counts(counts: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """A plan header's counts as ``fillgate plan`` lists them: its labels, in its order."""
    names = [n for n in PLAN_COUNTS if n in counts] + [n for n in counts if n not in PLAN_COUNTS]
    return [(n, LABELS.get(n, n), counts[n]) for n in names]


def _json_text(value: object, indent: int | None = None) -> str:
    """JSON as a person reads it (unicode as itself; the template escapes it for HTML)."""
    return json.dumps(value, ensure_ascii=False, default=str, indent=indent)


def _fmt_seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return ""
    seconds = round(value)
    if seconds < 60:
        return f"{value:.1f}s" if value < 10 else f"{seconds}s"
    minutes, sec = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m {sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m"


def _environment() -> Environment:
    env = Environment(loader=FileSystemLoader(HERE / "templates"), autoescape=select_autoescape(default=True),
                      trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=_fmt_num, when=_fmt_when, seconds=_fmt_seconds, json_text=_json_text,
                       mask=mask_secrets)
    env.globals.update(KINDS=KINDS, KIND_LABELS=data.KIND_LABELS, RUN_KINDS=data.RUN_KINDS,
                       RUN_STATUSES=data.RUN_STATUSES, Status=RunStatus, Kind=RunKind, WRITING=WRITING_KINDS,
                       key_text=data.key_text, key_query=data.key_query, display=data.display,
                       policy_text=format_policy, plan_counts=_plan_counts,
                       why_interrupted=interrupted, shown_status=shown_status, urlencode=urlencode)
    return env


def _status_of(exc: FillgateError) -> int:
    """The HTTP status of a library error: 404 for a run that is not there, 409 for a guard's
    refusal, 400 for any other usage error."""
    if isinstance(exc, data.WebError):
        return exc.status
    if isinstance(exc, RunNotFoundError):
        return 404
    return 409 if exc.exit_code == EXIT_REFUSED else 400


def _param(request: Request, name: str) -> str | None:
    value = request.query_params.get(name, "").strip()
    return value or None


def _page_number(request: Request) -> int:
    try:
        page = max(int(request.query_params.get("page", "1")), 1)
    except ValueError:
        raise data.WebError("the page number must be a whole number.") from None
    if page > MAX_PAGE:
        raise data.WebError(f"there is no page {page:,}: the page number goes up to {MAX_PAGE:,}.")
    return page


def _form_text(form: FormData, name: str) -> str | None:
    """A text field of a form, as sent (None when absent, empty or a file)."""
    value = form.get(name)
    return value or None if isinstance(value, str) else None


def _session(request: Request) -> str:
    return str(request.scope.get("fillgate_session", ""))


class Web:
    """One dashboard server: one method per page (``GET``, run in the thread pool, as every
    one reads a database) or action (``POST``), and the routes that lead to them."""

    def __init__(self, settings: Settings, board: data.Dashboard) -> None:
        self.settings = settings
        self.board = board
        self.env = _environment()
        self._secret = secrets.token_bytes(32)

    # --- rendering ----------------------------------------------------------------------------

    def csrf_for(self, session: str) -> str:
        return hmac.new(self._secret, session.encode(), hashlib.sha256).hexdigest()

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        html = self.env.get_template(name).render(
            request=request, csrf=self.csrf_for(_session(request)), read_only=self.settings.read_only,
            served=self.board.names, target_name=request.path_params.get("target"), **context,
        )
        return HTMLResponse(html, status_code=status)

    def error_page(self, request: Request, message: str, status: int) -> HTMLResponse:
        return self.render(request, "error.html", status=status, message=message, status_code=status)

    def operator(self, request: Request) -> str:
        client = request.client.host if request.client else None
        return data.web_operator(_session(request), client)

    # --- how pages and actions run ----------------------------------------------------------

    async def _guarded(self, request: Request, work: Callable[[], Response]) -> Response:
        """``work`` in the thread pool; a library or database error is a page saying what was wrong."""
        try:
            return await run_in_threadpool(work)
        except FillgateError as exc:
            return self.error_page(request, data.describe_error(exc), _status_of(exc))
        except SQLAlchemyError as exc:
            return self.error_page(request, data.describe_error(exc), 503)

    def page(self, endpoint: Page) -> Endpoint:
        async def run(request: Request) -> Response:
            return await self._guarded(request, lambda: endpoint(request))
        return run

    def action(self, endpoint: Action) -> Endpoint:
        """A state-changing POST: refused when read-only or without its session's CSRF token."""
        async def run(request: Request) -> Response:
            if self.settings.read_only:
                return self.error_page(request, "refused: this dashboard is read-only (fillgate serve --read-only); "
                                       "nothing was done.", 403)
            form = await request.form()
            sent = _form_text(form, "csrf") or request.headers.get("x-csrf-token") or ""
            if not hmac.compare_digest(sent.encode(), self.csrf_for(_session(request)).encode()):
                return self.error_page(request, "refused: this form was not sent from a page of this dashboard "
                                       "(its CSRF token is missing or wrong); nothing was done. Reload the page "
                                       "and try again.", 403)
            return await self._guarded(request, lambda: endpoint(request, form))
        return run

    # --- pages --------------------------------------------------------------------------------

    def targets(self, request: Request) -> Response:
        return self.render(request, "targets.html", targets=self.board.targets(),
                           active_here=self.board.runner.active())

    def runs(self, request: Request) -> Response:
        name = request.path_params["target"]
        page = _page_number(request)
        kind, status, job = _param(request, "kind"), _param(request, "status"), _param(request, "job")
        found, total, jobs = self.board.runs_page(name, page, kind, status, job)
        pages = max((total + data.RUNS_PER_PAGE - 1) // data.RUNS_PER_PAGE, 1)
        filters = {k: v for k, v in (("kind", kind), ("status", status), ("job", job)) if v}
        return self.render(request, "runs.html", runs=found, total=total, page=page, pages=pages, jobs=jobs,
                           filters=filters, per_page=data.RUNS_PER_PAGE, target=self.board.target(name))

    def run_row(self, request: Request) -> Response:
        run = self.board.run(request.path_params["target"], request.path_params["run_id"])
        return self.render(request, "_run_row.html", run=run)

    def run_page(self, request: Request) -> Response:
        info = self.board.run_page(request.path_params["target"], request.path_params["run_id"])
        notice = MESSAGES.get(request.query_params.get("done", ""))
        return self.render(request, "run.html", notice=notice, **info)

    def run_progress(self, request: Request) -> Response:
        info = self.board.progress(request.path_params["target"], request.path_params["run_id"])
        response = self.render(request, "_progress.html", **info)
        was = request.query_params.get("was")
        if was and was != info["run"].status:
            response.headers["HX-Refresh"] = "true"  # the run changed state: show the whole page anew
        return response

    def run_chart(self, request: Request) -> Response:
        return JSONResponse(self.board.chart(request.path_params["target"], request.path_params["run_id"]))

    def revert_page(self, request: Request, refusal: str | None = None) -> Response:
        """What a revert would restore, and the form that starts it (again, with ``refusal``)."""
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        run = self.board.run(name, run_id)
        previews = self.board.revert_previews(name, run_id)
        return self.render(request, "revert.html", status=409 if refusal else 200, run=run, previews=previews,
                           target=self.board.target(name), refusal=refusal)

    def plan_of_run(self, request: Request) -> Response:
        run, status = self.board.plan_of_run(request.path_params["target"], request.path_params["run_id"])
        return self._plan_view(request, status, run)

    def approve(self, request: Request, form: FormData) -> Response:
        """Approve the plan (as ``fillgate approve``); a refusal is an error page."""
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        self.board.approve(name, run_id, self.operator(request), _form_text(form, "comment"))
        return RedirectResponse(f"/t/{name}/plans/{run_id}?done=approved", status_code=303)

    def plan_file(self, request: Request) -> Response:
        return self._plan_view(request, self.board.plan_file(request.query_params.get("path", "")), None)

    def _plan_view(self, request: Request, status: PlanStatus, run: Run | None) -> Response:
        if status.state == "refused":
            return self.render(request, "plan_refused.html", status=409, plan=status, run=run)
        if not status.reviewable:
            return self.render(request, "plan_wait.html", plan=status, run=run)
        page = _page_number(request)
        kind, column, key = _param(request, "kind"), _param(request, "column"), _param(request, "key")
        view = self.board.plan_page(status, page, kind, column, key)
        filters = {k: v for k, v in (("kind", kind), ("column", column), ("key", key)) if v}
        if "path" in request.query_params:
            filters = {"path": request.query_params["path"], **filters}
        approvals, needed = self.board.plan_approvals(status.header)
        return self.render(request, "plan.html", plan=status, run=run, view=view, filters=filters, page_size=PAGE,
                           command=self.board.apply_command(status), applies=self.board.plan_runs(status.header),
                           approvals=approvals, approvals_needed=needed,
                           notice=MESSAGES.get(request.query_params.get("done", "")))

    def history(self, request: Request) -> Response:
        """A row's history; a table, column or key that makes no sense is said above the form
        (the words of ``fillgate history``)."""
        table, key, column = _param(request, "table"), _param(request, "key"), _param(request, "column")
        if not (table and key):
            return self._history_page(request, table, key, column)
        try:
            entries, total = self.board.history(request.path_params["target"], table, key, column)
        except FillgateError as exc:
            if isinstance(exc, data.WebError) or exc.exit_code == EXIT_REFUSED:
                raise  # about the target itself: an error page
            return self._history_page(request, table, key, column, problem=data.describe_error(exc))
        return self._history_page(request, table, key, column, entries, total)

    def _history_page(self, request: Request, table: str | None, key: str | None, column: str | None,
                      entries: list[dict[str, Any]] | None = None, total: int = 0,
                      problem: str | None = None) -> Response:
        return self.render(request, "history.html", status=400 if problem else 200, table=table or "", key=key or "",
                           column=column or "", entries=entries, total=total, problem=problem)

    def metrics(self, request: Request) -> Response:
        return Response(render_metrics(self.board.metrics()), media_type=CONTENT_TYPE_LATEST)

    async def login(self, request: Request) -> Response:
        token = self.settings.token
        if request.method != "POST":
            return self.render(request, "login.html", status=401 if token else 200, wrong=False)
        sent = _form_text(await request.form(), "token") or ""
        if token and hmac.compare_digest(sent.encode(), token.encode()):
            response = RedirectResponse("/", status_code=303)
            response.set_cookie(TOKEN_COOKIE, sent, httponly=True, samesite="strict")
            return response
        return self.render(request, "login.html", status=401, wrong=True)

    # --- actions ------------------------------------------------------------------------------

    def control(self, request: Request, form: FormData) -> Response:
        """Pause, cancel or resume a run (as ``fillgate pause``, ``cancel``, ``resume``)."""
        name, run_id, act = request.path_params["target"], request.path_params["run_id"], request.path_params["action"]
        if act in ("pause", "cancel"):
            run = self.board.control(name, run_id, act, self.operator(request))
            done = act if run.control else run.status
        elif act == "resume":
            self.board.resume(name, run_id, self.operator(request), _form_text(form, "confirm"))
            done = "resumed"
        else:
            raise HTTPException(404)
        return RedirectResponse(f"/t/{name}/runs/{run_id}?done={done}", status_code=303)

    def revert(self, request: Request, form: FormData) -> Response:
        """Start the revert (as ``fillgate revert``) and show its run; a guard's refusal is shown
        on the revert page, with the preview, so the form can be sent again."""
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        try:
            started = self.board.revert(name, run_id, self.operator(request), _form_text(form, "confirm"))
        except FillgateError as exc:
            if exc.exit_code != EXIT_REFUSED or isinstance(exc, data.WebError):
                raise
            return self.revert_page(request, refusal=data.describe_error(exc))
        pipeline = self.board.run(name, run_id).kind == RunKind.PIPELINE
        done = REVERTING_STAGES if pipeline else "reverting"
        return RedirectResponse(f"/t/{name}/runs/{started}?done={done}", status_code=303)

    # --- errors -------------------------------------------------------------------------------

    async def not_found(self, request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        detail = exc.detail if isinstance(exc, HTTPException) else ""
        message = "There is no such page here." if status == 404 else str(detail) or "error"
        return self.error_page(request, message, status)

    async def server_error(self, request: Request, exc: Exception) -> Response:
        log.exception("error while serving %s", request.url.path, exc_info=exc)
        return self.error_page(request, f"The dashboard failed to show this page ({type(exc).__name__}); the "
                               "server's log has the details. Nothing was changed by this request.", 500)

    # --- the application ----------------------------------------------------------------------

    def routes(self) -> list[BaseRoute]:
        page, action = self.page, self.action
        run = "/t/{target}/runs/{run_id}"
        return [
            Route("/", page(self.targets)),
            Route("/t/{target}/runs", page(self.runs)),
            Route(run, page(self.run_page)),
            Route(f"{run}/row", page(self.run_row)),
            Route(f"{run}/progress", page(self.run_progress)),
            Route(f"{run}/chart.json", page(self.run_chart)),
            Route(f"{run}/revert", page(self.revert_page), methods=["GET"]),
            Route(f"{run}/revert", action(self.revert), methods=["POST"]),
            Route(f"{run}/{{action}}", action(self.control), methods=["POST"]),
            Route("/t/{target}/plans/{run_id}", page(self.plan_of_run)),
            Route("/t/{target}/plans/{run_id}/approve", action(self.approve), methods=["POST"]),
            Route("/t/{target}/history", page(self.history)),
            Route("/plan", page(self.plan_file)),
            Route("/metrics", page(self.metrics)),
            Route("/login", self.login, methods=["GET", "POST"]),
            Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
        ]

    @asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(self.board.runner.stop_all)

    def app(self) -> Starlette:
        app = Starlette(routes=self.routes(), middleware=[Middleware(Guard, web=self)], lifespan=self.lifespan,
                        exception_handlers={HTTPException: self.not_found, Exception: self.server_error})
        app.state.dashboard = self.board
        return app


def _host_name(header: str) -> str:
    """The host of a ``Host`` header, without its port (``[::1]:8642``: ``[::1]``)."""
    if header.startswith("["):
        return header.split("]")[0] + "]"
    return header.rsplit(":", 1)[0]


class Guard(BaseHTTPMiddleware):
    """Host check, token, session cookie and security headers, for every request."""

    def __init__(self, app: ASGIApp, web: Web) -> None:
        super().__init__(app)
        self.web = web
        self.settings = web.settings

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        if self.settings.loopback and not self.settings.token and \
                _host_name(request.headers.get("host") or "") not in LOOPBACK_HOSTS:
            return Response("refused: this dashboard serves only requests addressed to 127.0.0.1/localhost.",
                            status_code=400, media_type="text/plain")
        session = request.cookies.get(SESSION_COOKIE) or ""
        new_session = None if len(session) == 32 else secrets.token_hex(16)
        request.scope["fillgate_session"] = new_session or session
        response = self._token_gate(request) or await call_next(request)
        _secure(response, new_session)
        return response

    def _token_gate(self, request: Request) -> Response | None:
        """When the server has a token: a 401 for a request without it, a redirect that takes a
        ``?token=`` out of the address bar (into a cookie); None lets the request through."""
        token, path = self.settings.token, request.url.path
        if not token or path == "/login" or path.startswith("/static/"):
            return None
        auth = request.headers.get("authorization", "")
        query = request.query_params.get("token", "")
        sent = (request.cookies.get(TOKEN_COOKIE, ""), auth[7:] if auth.lower().startswith("bearer ") else "", query)
        if not any(hmac.compare_digest(t.encode(), token.encode()) for t in sent if t):
            if "text/html" in request.headers.get("accept", ""):
                response: Response = self.web.render(request, "login.html", status=401, wrong=False)
            else:
                response = Response("401: this dashboard needs its token (Authorization: Bearer TOKEN).",
                                    status_code=401, media_type="text/plain")
            response.headers["WWW-Authenticate"] = 'Bearer realm="fillgate"'
            return response
        if not query:
            return None
        rest = {k: v for k, v in request.query_params.items() if k != "token"}
        response = RedirectResponse(path + (f"?{urlencode(rest)}" if rest else ""), 303)
        response.set_cookie(TOKEN_COOKIE, query, httponly=True, samesite="strict")
        return response


def _secure(response: Response, new_session: str | None) -> None:
    """The session cookie (when new) and the security headers, on every response."""
    if new_session:
        response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="strict")
    response.headers.setdefault("Content-Security-Policy", CSP)
    response.headers["X-Frame-Options"] = "DENY"
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"
    response.headers.setdefault("Cache-Control", "no-store")


def create_app(settings: Settings, dashboard: data.Dashboard | None = None) -> Starlette:
    """The dashboard as an ASGI app (``dashboard``: for tests that make their own)."""
    board = dashboard or data.Dashboard(settings.config_path, settings.targets, settings.cache_dir)
    return Web(settings, board).app()
