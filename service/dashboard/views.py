"""Dashboard pages and actions: parse the form, call one domain function, render.

Reads use ``service.listing``; actions call the admin API's domain functions
(``tenants``, ``leasing.revoke_lease``, ``workers.destroy_by_operator``,
``pools.patch_pool``), each in one transaction, then redirect (post/redirect/get) with
a flashed outcome. The one exception is a created tenant: its token is rendered in the
answer to the POST, once, and is never put in a URL, a flash or the session.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from flask import (
    Blueprint,
    Response,
    abort,
    current_app,
    flash,
    redirect,
    render_template,
    request,
    url_for,
)
from flask.sansio.blueprints import BlueprintSetupState
from pydantic import ValidationError

from service import leasing, listing, tenants, workers
from service.api import svc
from service.api.present import waiting_reason_out
from service.dashboard import session as auth
from service.errors import DomainError
from service.models import LIVE_LEASE_STATES, Lease, LeaseState, Tenant, WorkerState
from service.pools import patch_pool
from service.schemas import PoolPatch

bp = Blueprint(
    "dashboard",
    __name__,
    url_prefix="/admin",
    template_folder="templates",
    static_folder="static",
    static_url_path="/static",
)

RECENT = timedelta(hours=1)
PAGE = 100
# No script but our own file, no framing, no referrer leaking ids to other sites.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


@bp.record_once
def _bind_session(state: BlueprintSetupState) -> None:
    auth.configure(state.app)  # type: ignore[arg-type]  # registered on a Flask app


@bp.before_request
def _guard() -> Any:
    if request.method == "POST" and not auth.csrf_ok(request.form):
        return render_template(
            "dashboard/error.html",
            message="This form expired or was "
            "not sent from the dashboard (CSRF check failed). Reload the "
            "page and try again.",
        ), 400
    if request.endpoint in ("dashboard.login", "dashboard.login_post", "dashboard.static"):
        return None
    if auth.signed_in():
        return None
    return redirect(url_for("dashboard.login"))


@bp.after_request
def _headers(response: Response) -> Response:
    response.headers.update(SECURITY_HEADERS)
    return response


@bp.context_processor
def _helpers() -> dict[str, Any]:
    now = svc().clock.now()
    return {
        "csrf_token": auth.csrf_token,
        "age": lambda at: _duration((now - at).total_seconds()) if at else "",
        "duration": lambda s: _duration(s) if s is not None else "\u2013",
        "when": lambda at: at.strftime("%Y-%m-%d %H:%M:%S") if at else "",
        "signed_in": auth.signed_in(),
        "live_lease_states": [str(s) for s in LIVE_LEASE_STATES],
    }


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m {secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h {minutes:02d}m"
    return f"{hours // 24}d {hours % 24}h"


def _now() -> datetime:
    return svc().clock.now()


def _back(default: str) -> Any:
    target = request.form.get("next", "")
    # Only our own pages: a path under /admin/, never another host.
    if not target.startswith("/admin/") or target.startswith("//"):
        target = default
    return redirect(target)


# ---- sign-in --------------------------------------------------------------------


@bp.get("/login")
def login() -> Any:
    if auth.signed_in():
        return redirect(url_for("dashboard.overview"))
    return render_template("dashboard/login.html")


@bp.post("/login")
def login_post() -> Any:
    if auth.sign_in(request.form.get("token", "").strip(), current_app.config["ADMIN_TOKEN"]):
        return redirect(url_for("dashboard.overview"))
    return render_template("dashboard/login.html", error="That is not the admin token."), 401


@bp.post("/logout")
def logout() -> Any:
    auth.sign_out()
    flash("Signed out.", "ok")
    return redirect(url_for("dashboard.login"))


# ---- pages ------------------------------------------------------------------------


@bp.get("/")
def overview() -> Any:
    pools = listing.pools_overview(svc().session(), _now() - RECENT, _now())
    return render_template("dashboard/overview.html", pools=pools, states=_worker_states())


@bp.get("/pools/<name>")
def pool(name: str) -> Any:
    session = svc().session()
    found = next(
        (
            p
            for p in listing.pools_overview(session, _now() - RECENT, _now())
            if p.pool.name == name
        ),
        None,
    )
    if found is None:
        abort(404)
    rows = listing.pool_workers(session, name)
    return render_template("dashboard/pool.html", p=found, rows=rows, states=_worker_states())


@bp.get("/leases")
def leases() -> Any:
    state = request.args.get("state", "live")
    if state not in ("live", "all", *[str(s) for s in LeaseState]):
        state = "live"
    tenant = request.args.get("tenant") or None
    pool_name = request.args.get("pool") or None
    session = svc().session()
    rows = listing.leases_page(
        session, tenant_id=tenant, pool=pool_name, state=state, limit=PAGE, offset=0
    )
    return render_template(
        "dashboard/leases.html",
        rows=rows,
        state=state,
        tenant=tenant or "",
        pool=pool_name or "",
        states=["live", "all", *[str(s) for s in LeaseState]],
        pools=[p.name for p, _ in listing.pools_with_counts(session)],
        tenant_names=_tenant_names(session),
    )


@bp.get("/leases/<lease_id>")
def lease(lease_id: str) -> Any:
    session = svc().session()
    row = session.get(Lease, lease_id)
    if row is None:
        abort(404)
    waiting = listing.waiting_reasons(session, [row]).get(row.id)
    return render_template(
        "dashboard/lease.html",
        lease=row,
        waiting=waiting_reason_out(waiting) if waiting else None,
        events=listing.lease_timeline(session, row),
        tasks=listing.lease_tasks(session, row.id),
        tenant=session.get(Tenant, row.tenant_id),
    )


@bp.get("/tenants")
def tenants_page() -> Any:
    return _render_tenants()


def _render_tenants(created: tuple[Tenant, str] | None = None) -> Any:
    session = svc().session()
    return render_template(
        "dashboard/tenants.html",
        rows=listing.tenants_all(session),
        live=listing.live_leases_by_tenant(session),
        created=created,
    )


@bp.get("/events")
def events() -> Any:
    args = request.args
    before = args.get("before", type=int)
    filters = {k: (args.get(k) or "").strip() for k in ("kind", "subject", "pool", "tenant")}
    rows = listing.events_filtered(
        svc().session(),
        kind=filters["kind"] or None,
        subject=filters["subject"] or None,
        pool=filters["pool"] or None,
        tenant_id=filters["tenant"] or None,
        before=before,
        limit=PAGE,
    )
    next_before = rows[-1].id if len(rows) == PAGE else None
    return render_template(
        "dashboard/events.html",
        rows=rows,
        filters=filters,
        next_before=next_before,
        older_filters={key: value for key, value in filters.items() if value},
    )


# ---- actions ----------------------------------------------------------------------


@bp.post("/pools/<name>")
def pool_update(name: str) -> Any:
    form = request.form
    try:
        patch = PoolPatch.model_validate(
            {
                "min_ready": _whole_number(form, "min_ready"),
                "max_workers": _whole_number(form, "max_workers"),
                "enabled": {"true": True, "false": False}.get(form.get("enabled", "")),
            }
        )
    except ValueError as exc:  # pydantic's ValidationError is one
        detail = _first_error(exc) if isinstance(exc, ValidationError) else str(exc)
        flash(f"Not changed: {detail}", "error")
        return redirect(url_for("dashboard.pool", name=name))
    _act(lambda s: patch_pool(s, name, patch, _now()), f"Pool {name} updated.")
    return redirect(url_for("dashboard.pool", name=name))


@bp.post("/workers/<worker_id>/destroy")
def worker_destroy(worker_id: str) -> Any:
    _act(
        lambda s: workers.destroy_by_operator(s, worker_id, _now()),
        f"Worker {worker_id} is being destroyed.",
    )
    return _back(url_for("dashboard.overview"))


@bp.post("/leases/<lease_id>/revoke")
def lease_revoke(lease_id: str) -> Any:
    _act(
        lambda s: leasing.revoke_lease(s, lease_id, _now(), "revoked by operator (dashboard)"),
        f"Lease {lease_id} revoked; its worker is being destroyed.",
    )
    return _back(url_for("dashboard.lease", lease_id=lease_id))


@bp.post("/tasks/<task_id>/cancel")
def task_cancel(task_id: str) -> Any:
    services = svc()
    try:
        task, live = services.tasks.cancel_by_operator(services.session(), task_id)
    except DomainError as exc:
        flash(exc.detail, "error")
        return _back(url_for("dashboard.leases"))
    flash(f"Task {task_id}: cancel {'requested' if live else 'not needed, it had ended'}.", "ok")
    return _back(url_for("dashboard.lease", lease_id=task.lease_id))


@bp.post("/tenants")
def tenant_create() -> Any:
    name = request.form.get("name", "").strip()
    if not 1 <= len(name) <= 200:
        flash("A tenant needs a name (1 to 200 characters).", "error")
        return redirect(url_for("dashboard.tenants_page"))
    with svc().transaction() as session:
        tenant, token = tenants.create(session, name, _now())
    return _render_tenants(created=(tenant, token))


@bp.post("/tenants/<tenant_id>/disable")
def tenant_disable(tenant_id: str) -> Any:
    _act(
        lambda s: tenants.disable(s, tenant_id, _now()),
        f"Tenant {tenant_id} disabled: its token no longer works and its leases ended.",
    )
    return redirect(url_for("dashboard.tenants_page"))


def _act(action: Any, done: str) -> None:
    try:
        with svc().transaction() as session:
            action(session)
    except DomainError as exc:
        flash(exc.detail, "error")
    else:
        flash(done, "ok")


def _whole_number(form: Any, key: str) -> int | None:
    value = form.get(key, "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise ValueError(f"{key}: must be a whole number, not {value[:20]!r}")
    return int(value)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors()[0]
    return f"{'.'.join(str(p) for p in error['loc'])}: {error['msg']}"


def _worker_states() -> list[str]:
    return [str(s) for s in WorkerState if s != WorkerState.DESTROYED]


def _tenant_names(session: Any) -> dict[str, str]:
    return {t.id: t.name for t in listing.tenants_all(session, limit=10_000)}
