"""The dashboard's web application (Starlette, Jinja2 templates, htmx).

Pages read the ledger through :mod:`fillgate.web.data` only. Safety, in one place:

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
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from fillgate.web import data
from fillgate.web.metrics import render_metrics
from fillgate.web.planindex import KINDS, PAGE

HERE = Path(__file__).parent
log = logging.getLogger("fillgate.web")

SESSION_COOKIE = "fillgate_session"
TOKEN_COOKIE = "fillgate_token"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]", "::1")
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
       "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'")
MESSAGES = {
    "pause": "Pause requested: the run pauses after its current batch.",
    "cancel": "Cancel requested: the run stops after its current batch.",
    "paused": "The run is paused.",
    "cancelled": "The run is cancelled.",
    "resumed": "The run continues in the dashboard's server.",
    "reverting": "The revert started in the dashboard's server.",
}


@dataclass
class Settings:
    config_path: str | Path | None
    targets: list[str] | None
    cache_dir: Path
    read_only: bool = False
    token: str | None = None
    loopback: bool = True


def _fmt_num(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _fmt_when(value: Any) -> str:
    return "" if value is None else str(value)


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
    env.filters.update(num=_fmt_num, when=_fmt_when, seconds=_fmt_seconds)
    env.globals.update(KINDS=KINDS, KIND_LABELS=data.KIND_LABELS, RUN_KINDS=data.RUN_KINDS,
                       RUN_STATUSES=data.RUN_STATUSES, key_text=data.key_text, key_query=data.key_query,
                       display=data.display, urlencode=urlencode)
    return env


def create_app(settings: Settings, dashboard: data.Dashboard | None = None) -> Starlette:
    """The dashboard as an ASGI app (``dashboard``: for tests that make their own)."""
    board = dashboard or data.Dashboard(settings.config_path, settings.targets, settings.cache_dir)
    env = _environment()
    secret = secrets.token_bytes(32)

    def csrf_for(session: str) -> str:
        return hmac.new(secret, session.encode(), hashlib.sha256).hexdigest()

    def render(request: Request, name: str, status: int = 200, **context: Any) -> HTMLResponse:
        session = request.scope.get("fillgate_session", "")
        html = env.get_template(name).render(
            request=request, csrf=csrf_for(session), read_only=settings.read_only, served=board.names,
            target_name=request.path_params.get("target"), **context,
        )
        return HTMLResponse(html, status_code=status)

    def error_page(request: Request, message: str, status: int) -> HTMLResponse:
        return render(request, "error.html", status=status, message=message, status_code=status)

    def status_of(exc: BaseException) -> int:
        name = type(exc).__name__
        if isinstance(exc, data.WebError):
            return exc.status
        if name == "RunNotFoundError":
            return 404
        if getattr(exc, "exit_code", 2) == 3:
            return 409
        return 400

    def guarded(endpoint: Callable[[Request], Response]) -> Callable[[Request], Awaitable[Response]]:
        """A page: its (blocking) work in the thread pool; a library or database error is a page
        saying what was wrong."""
        async def wrapper(request: Request) -> Response:
            try:
                return await run_in_threadpool(endpoint, request)
            except data.FillgateError as exc:
                return error_page(request, str(exc), status_of(exc))
            except data.SQLAlchemyError as exc:
                return error_page(request, data.describe_error(exc), 503)
        return wrapper

    def action(endpoint: Callable[[Request, FormData], Response]) -> Callable[[Request], Awaitable[Response]]:
        """A state-changing POST: refused when read-only or without its session's CSRF token."""
        async def wrapper(request: Request) -> Response:
            if settings.read_only:
                return error_page(request, "refused: this dashboard is read-only (fillgate serve --read-only); "
                                  "nothing was done.", 403)
            form = await request.form()
            sent = str(form.get("csrf") or request.headers.get("x-csrf-token") or "")
            expected = csrf_for(request.scope.get("fillgate_session", ""))
            if not hmac.compare_digest(sent, expected):
                return error_page(request, "refused: this form was not sent from a page of this dashboard "
                                  "(its CSRF token is missing or wrong); nothing was done. Reload the page "
                                  "and try again.", 403)
            try:
                return await run_in_threadpool(endpoint, request, form)
            except data.FillgateError as exc:
                return error_page(request, str(exc), status_of(exc))
            except data.SQLAlchemyError as exc:
                return error_page(request, data.describe_error(exc), 503)
        return wrapper

    def operator(request: Request) -> str:
        client = request.client.host if request.client else None
        return data.web_operator(request.scope.get("fillgate_session", ""), client)

    def param(request: Request, name: str) -> str | None:
        value = request.query_params.get(name, "").strip()
        return value or None

    def page_number(request: Request) -> int:
        try:
            return max(int(request.query_params.get("page", "1")), 1)
        except ValueError:
            raise data.WebError("the page number must be a whole number.") from None

    # --- pages ------------------------------------------------------------------------------

    def targets(request: Request) -> Response:
        return render(request, "targets.html", targets=board.targets(), active_here=board.runner.active())

    def runs(request: Request) -> Response:
        name = request.path_params["target"]
        page = page_number(request)
        kind, status, job = param(request, "kind"), param(request, "status"), param(request, "job")
        found, total, jobs = board.runs_page(name, page, kind, status, job)
        pages = max((total + data.RUNS_PER_PAGE - 1) // data.RUNS_PER_PAGE, 1)
        filters = {k: v for k, v in (("kind", kind), ("status", status), ("job", job)) if v}
        return render(request, "runs.html", runs=found, total=total, page=page, pages=pages, jobs=jobs,
                      filters=filters, per_page=data.RUNS_PER_PAGE, target=board.target(name),
                      interrupted=data.interrupted)

    def run_row(request: Request) -> Response:
        name = request.path_params["target"]
        run = board.run(name, request.path_params["run_id"])
        return render(request, "_run_row.html", run=run, interrupted=data.interrupted)

    def run_page(request: Request) -> Response:
        name = request.path_params["target"]
        info = board.run_page(name, request.path_params["run_id"])
        notice = MESSAGES.get(request.query_params.get("done", ""))
        return render(request, "run.html", notice=notice, **info)

    def run_progress(request: Request) -> Response:
        name = request.path_params["target"]
        info = board.progress(name, request.path_params["run_id"])
        response = render(request, "_progress.html", **info)
        was = request.query_params.get("was")
        if was and was != info["run"].status:
            response.headers["HX-Refresh"] = "true"  # the run changed state: show the whole page anew
        return response

    def run_chart(request: Request) -> Response:
        name = request.path_params["target"]
        return JSONResponse(board.chart(name, request.path_params["run_id"]))

    def control(request: Request, form: FormData) -> Response:
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        act = request.path_params["action"]
        if act in ("pause", "cancel"):
            board.control(name, run_id, act, operator(request))
            run = board.run(name, run_id)
            done = act if run.control else run.status
        elif act == "resume":
            board.resume(name, run_id, operator(request), str(form.get("confirm") or "") or None)
            done = "resumed"
        else:
            raise HTTPException(404)
        return RedirectResponse(f"/t/{name}/runs/{run_id}?done={done}", status_code=303)

    def revert_page(request: Request) -> Response:
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        run = board.run(name, run_id)
        preview = board.revert_preview(name, run_id)
        return render(request, "revert.html", run=run, preview=preview, target=board.target(name), refusal=None)

    def revert(request: Request, form: FormData) -> Response:
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        confirm = str(form.get("confirm") or "") or None
        try:
            started = board.revert(name, run_id, operator(request), confirm)
        except data.FillgateError as exc:
            if getattr(exc, "exit_code", 0) != 3:
                raise
            run = board.run(name, run_id)
            preview = board.revert_preview(name, run_id)
            return render(request, "revert.html", status=409, run=run, preview=preview,
                          target=board.target(name), refusal=str(exc))
        return RedirectResponse(f"/t/{name}/runs/{started}?done=reverting", status_code=303)

    def plan_view(request: Request, status: data.PlanStatus, run: data.Run | None) -> Response:
        if status.state == "refused":
            return render(request, "plan_refused.html", status=409, plan=status, run=run)
        if not status.reviewable:
            return render(request, "plan_wait.html", plan=status, run=run)
        page = page_number(request)
        kind, column, key = param(request, "kind"), param(request, "column"), param(request, "key")
        view = board.plan_page(status, page, kind, column, key)
        filters = {k: v for k, v in (("kind", kind), ("column", column), ("key", key)) if v}
        if "path" in request.query_params:
            filters = {"path": request.query_params["path"], **filters}
        return render(request, "plan.html", plan=status, run=run, view=view, filters=filters, page_size=PAGE,
                      command=board.apply_command(status), applies=board.plan_runs(status.header))

    def plan_of_run(request: Request) -> Response:
        name, run_id = request.path_params["target"], request.path_params["run_id"]
        run, status = board.plan_of_run(name, run_id)
        return plan_view(request, status, run)

    def plan_file(request: Request) -> Response:
        return plan_view(request, board.plan_file(request.query_params.get("path", "")), None)

    def history(request: Request) -> Response:
        name = request.path_params["target"]
        table, key, column = param(request, "table"), param(request, "key"), param(request, "column")
        entries = board.history(name, table, key, column) if table and key else None
        return render(request, "history.html", table=table or "", key=key or "", column=column or "",
                      entries=entries, limit=data.HISTORY_LIMIT)

    def metrics(request: Request) -> Response:
        return Response(render_metrics(board.metrics()), media_type=CONTENT_TYPE_LATEST)

    async def login(request: Request) -> Response:
        if request.method == "POST":
            form = await request.form()
            sent = str(form.get("token") or "")
            if settings.token and hmac.compare_digest(sent.encode(), settings.token.encode()):
                response = RedirectResponse("/", status_code=303)
                response.set_cookie(TOKEN_COOKIE, sent, httponly=True, samesite="strict")
                return response
            return render(request, "login.html", status=401, wrong=True)
        return render(request, "login.html", status=401 if settings.token else 200, wrong=False)

    async def not_found(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 404)
        message = "There is no such page here." if status == 404 else str(getattr(exc, "detail", "")) or "error"
        return error_page(request, message, status)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("error while serving %s", request.url.path, exc_info=exc)
        return error_page(request, f"The dashboard failed to show this page ({type(exc).__name__}); the "
                          "server's log has the details. Nothing was changed by this request.", 500)

    class Guard(BaseHTTPMiddleware):
        """Host check, token, session cookie and security headers, for every request."""

        async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
            host = (request.headers.get("host") or "").rsplit(":", 1)[0] if not (
                request.headers.get("host") or "").startswith("[") else request.headers["host"].split("]")[0] + "]"
            if settings.loopback and not settings.token and host not in LOOPBACK_HOSTS:
                return Response("refused: this dashboard serves only requests addressed to 127.0.0.1/localhost.",
                                status_code=400, media_type="text/plain")
            session = request.cookies.get(SESSION_COOKIE) or ""
            new_session = not session or len(session) != 32
            if new_session:
                session = secrets.token_hex(16)
            request.scope["fillgate_session"] = session
            set_token = None
            if settings.token and request.url.path not in ("/login",) and not request.url.path.startswith("/static/"):
                sent_cookie = request.cookies.get(TOKEN_COOKIE, "")
                auth = request.headers.get("authorization", "")
                bearer = auth[7:] if auth.lower().startswith("bearer ") else ""
                query = request.query_params.get("token", "")
                ok = any(hmac.compare_digest(t.encode(), settings.token.encode())
                         for t in (sent_cookie, bearer, query) if t)
                if not ok:
                    if "text/html" in request.headers.get("accept", ""):
                        response: Response = render(request, "login.html", status=401, wrong=False)
                    else:
                        response = Response("401: this dashboard needs its token (Authorization: Bearer TOKEN).",
                                            status_code=401, media_type="text/plain")
                    response.headers["WWW-Authenticate"] = 'Bearer realm="fillgate"'
                    self._headers(response, session if new_session else None)
                    return response
                if query:  # take the token out of the address bar (and out of history)
                    set_token = query
            if set_token is not None:
                rest = {k: v for k, v in request.query_params.items() if k != "token"}
                response = RedirectResponse(request.url.path + (f"?{urlencode(rest)}" if rest else ""), 303)
                response.set_cookie(TOKEN_COOKIE, set_token, httponly=True, samesite="strict")
            else:
                response = await call_next(request)
            self._headers(response, session if new_session else None)
            return response

        @staticmethod
        def _headers(response: Response, new_session: str | None) -> None:
            if new_session:
                response.set_cookie(SESSION_COOKIE, new_session, httponly=True, samesite="strict")
            response.headers.setdefault("Content-Security-Policy", CSP)
            response.headers["X-Frame-Options"] = "DENY"
            response.headers["X-Content-Type-Options"] = "nosniff"
            response.headers["Referrer-Policy"] = "no-referrer"
            response.headers.setdefault("Cache-Control", "no-store")

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(board.runner.stop_all)

    t = "/t/{target}"
    routes = [
        Route("/", guarded(targets)),
        Route(f"{t}/runs", guarded(runs)),
        Route(f"{t}/runs/{{run_id}}", guarded(run_page)),
        Route(f"{t}/runs/{{run_id}}/row", guarded(run_row)),
        Route(f"{t}/runs/{{run_id}}/progress", guarded(run_progress)),
        Route(f"{t}/runs/{{run_id}}/chart.json", guarded(run_chart)),
        Route(f"{t}/runs/{{run_id}}/revert", guarded(revert_page), methods=["GET"]),
        Route(f"{t}/runs/{{run_id}}/revert", action(revert), methods=["POST"]),
        Route(f"{t}/runs/{{run_id}}/{{action}}", action(control), methods=["POST"]),
        Route(f"{t}/plans/{{run_id}}", guarded(plan_of_run)),
        Route(f"{t}/history", guarded(history)),
        Route("/plan", guarded(plan_file)),
        Route("/metrics", guarded(metrics)),
        Route("/login", login, methods=["GET", "POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]
    app = Starlette(routes=routes, middleware=[Middleware(Guard)], lifespan=lifespan,
                    exception_handlers={HTTPException: not_found, Exception: server_error})
    app.state.dashboard = board
    return app
