"""The ``workerlease`` command line."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import tempfile
import threading
from typing import Any

import click

from service import __version__
from service.config import Config, ConfigError
from service.security import make_files_private

log = logging.getLogger("workerlease.cli")

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="WORKERLEASE_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML config file (or WORKERLEASE_CONFIG).",
)
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON, not a table.")


def _load(config_path: str | None, *, serving: bool = False) -> Config:
    from service import startup  # here, not at the top: see URL_OPTION

    try:
        return startup.load(config_path, serving=serving)
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None


def _setup_logging(config: Config) -> None:
    from service.logs import configure

    configure(config.log_level, config.log_format)


# The commands with --url make one HTTP call: they import the service's stack
# (SQLAlchemy, the domain) only on the database branch, after the --url one. With it
# imported at the top such a call took 2.5 s of CPU, and over 60 s beside two test suites.
URL_OPTION = click.option(
    "--url",
    envvar="WORKERLEASE_ADMIN_URL",
    default=None,
    help="Act through this running service's admin API (the admin token from "
    "WORKERLEASE_ADMIN_TOKEN) instead of on the database.",
)


def _admin_api(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
    """One admin API call; a problem answer becomes a one-line error (exit 1)."""
    import urllib.error
    import urllib.request

    token = os.environ.get("WORKERLEASE_ADMIN_TOKEN")
    if not token:
        raise click.ClickException("--url needs the admin token in WORKERLEASE_ADMIN_TOKEN")
    request = urllib.request.Request(
        url.rstrip("/") + path,
        data=None if body is None else json.dumps(body).encode(),
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read() or b"{}")
    except urllib.error.HTTPError as exc:
        try:
            problem = json.loads(exc.read() or b"{}")
        except ValueError:
            problem = {}
        title, detail = problem.get("title", f"HTTP {exc.code}"), problem.get("detail", "")
        raise click.ClickException(f"{title}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise click.ClickException(f"cannot reach {url}: {reason}") from None


@click.group()
@click.version_option(__version__, prog_name="workerlease")
def main() -> None:
    """workerlease: lease warm-pool worker machines to tenants."""
    make_files_private()


@main.command()
@CONFIG_OPTION
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8080, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="gunicorn worker processes",
)
@click.option(
    "--connections",
    default=10_000,
    show_default=True,
    type=click.IntRange(16, 100_000),
    help="concurrent connections per worker process (each waiting request holds one)",
)
@click.option("--no-scheduler", is_flag=True, help="serve the API only; run jobs elsewhere")
def serve(
    config_path: str | None,
    host: str,
    port: int,
    workers: int,
    connections: int,
    no_scheduler: bool,
) -> None:
    """Serve the API (gunicorn) and run the background jobs in this process group."""
    config = _load(config_path, serving=True)
    try:
        config.require_admin_token()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    _in_multiprocess_metrics_mode()
    _setup_logging(config)
    from service.server import run_server

    run_server(
        config,
        config_path,
        host=host,
        port=port,
        workers=workers,
        connections=connections,
        with_scheduler=not no_scheduler and config.scheduler.enabled,
    )


def _in_multiprocess_metrics_mode() -> None:
    """Make sure ``serve``'s process group counts in one shared metrics directory.

    prometheus_client picks its value store when it is imported, and this process
    imported it already (the CLI's own imports). So when the directory is not set
    yet, make one and start this command again in the same process (``exec``, same
    pid) with it set: then the gunicorn master, every web worker and the scheduler
    child count into it, and any web worker's ``/metrics`` shows all of them.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return
    directory = tempfile.mkdtemp(prefix="workerlease-prom-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
    os.environ[OWN_METRICS_DIR_ENV] = directory  # serve removes it when it stops
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "service.cli", *sys.argv[1:]])


OWN_METRICS_DIR_ENV = "WORKERLEASE_OWN_METRICS_DIR"


@main.command()
@CONFIG_OPTION
@click.option("--public-url", help="how workers reach the API (default: config public_url)")
@click.option(
    "--metrics-port",
    type=click.IntRange(1, 65535),
    envvar="WORKERLEASE_SCHEDULER_METRICS_PORT",
    help="serve this scheduler's metrics (jobs, doorbell, provisioner errors) on "
    "http://HOST:PORT/metrics; needed when it runs apart from serve",
)
@click.option(
    "--metrics-host", default="127.0.0.1", show_default=True, help="address for --metrics-port"
)
@click.option(
    "--exit-with-parent",
    is_flag=True,
    hidden=True,
    help="stop when the parent process dies (used by serve)",
)
def scheduler(
    config_path: str | None,
    public_url: str | None,
    metrics_port: int | None,
    metrics_host: str,
    exit_with_parent: bool,
) -> None:
    """Run only the background jobs (for deployments that serve the API elsewhere)."""
    config = _load(config_path, serving=True)
    _setup_logging(config)
    from service.metrics import start_exporter

    if metrics_port:
        start_exporter(metrics_host, metrics_port, config.metrics_token)
        log.info("metrics_listening url=http://%s:%d/metrics", metrics_host, metrics_port)
    elif not exit_with_parent:
        log.warning(
            "metrics_not_exported: job and doorbell metrics of this scheduler are not "
            "scraped anywhere; pass --metrics-port"
        )
    from service.passes.runtime import build_runtime
    from service.scheduler import mark_stopped, run_scheduler
    from service.startup import prepare_database, service_url

    url = public_url or service_url(config, "127.0.0.1", 8080)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    if exit_with_parent:
        _stop_when_orphaned(stop)
    engine = prepare_database(config)
    rt = build_runtime(config, engine, url)
    sched = run_scheduler(rt)
    log.info("scheduler_running service_url=%s", url)
    stop.wait()
    sched.shutdown(wait=True)
    mark_stopped(rt)
    rt.close()
    log.info("scheduler_stopped")
    # Everything is closed: skip the interpreter's teardown of a large heap (0.6 s of
    # CPU on every stop and restart, measured with py-spy), which has nothing to flush.
    logging.shutdown()
    sys.stdout.flush()
    os._exit(0)


def _stop_when_orphaned(stop: threading.Event) -> None:
    """A scheduler whose ``serve`` was killed (SIGKILL) must not run on alone."""
    parent = os.getppid()

    def watch() -> None:
        while not stop.wait(1.0):
            if os.getppid() != parent:
                log.warning("scheduler_parent_gone parent=%d; stopping", parent)
                stop.set()

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


@main.command()
@CONFIG_OPTION
@click.option(
    "--force",
    is_flag=True,
    help="even when a scheduler beat recently (it may still be running)",
)
def cleanup(config_path: str | None, force: bool) -> None:
    """Drain and destroy every worker of this deployment (run after the service stopped).

    Live leases end, every worker is destroyed through its pool's provisioner and
    marked destroyed, and whatever the provisioners still list under this deployment
    and database is destroyed too. Exit 1 if some destroy failed (they stay listed).
    """
    from service import heartbeats
    from service.clock import SystemClock
    from service.db import session_scope
    from service.passes.cleanup import cleanup as run_cleanup
    from service.passes.runtime import build_runtime
    from service.startup import service_url

    factory = _existing_database(config_path)
    config = _load(config_path)
    _setup_logging(config)
    now = SystemClock().now()
    with session_scope(factory) as session:
        beat = heartbeats.last_beat(session, heartbeats.SCHEDULER)
    stale_after = max(3 * config.scheduler.interval, 15)
    if not force and heartbeats.running_elsewhere(beat, now, stale_after):
        assert beat is not None
        raise click.ClickException(
            f"a scheduler ({beat.detail}) beat at {beat.at.isoformat()}: stop the service "
            f"first, or wait {stale_after}s after it died, or pass --force"
        )
    rt = build_runtime(config, factory.kw["bind"], service_url(config, "127.0.0.1", 8080))
    try:
        report = run_cleanup(rt)
    finally:
        rt.close()
    click.echo(
        f"leases ended: {report.leases_ended}, workers destroyed: {report.workers_destroyed}, "
        f"orphans destroyed: {report.orphans_destroyed}"
    )
    if report.failed:
        for worker_id, error in sorted(report.failed.items()):
            click.echo(f"  not destroyed: {worker_id}: {error}", err=True)
        raise click.ClickException(
            f"{len(report.failed)} workers could not be destroyed; run cleanup again"
        )


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@CONFIG_OPTION
def db_upgrade(config_path: str | None) -> None:
    """Upgrade the schema to the latest migration and apply the config's pools."""
    from service.migrate import current_revision
    from service.startup import prepare_database

    config = _load(config_path, serving=True)
    engine = prepare_database(config)
    click.echo(f"database at revision {current_revision(engine)}")


@main.group()
def tenants() -> None:
    """Tenants (customer instances)."""


@tenants.command("create")
@CONFIG_OPTION
@URL_OPTION
@click.argument("name")
def tenants_create(config_path: str | None, url: str | None, name: str) -> None:
    """Create a tenant and print its token (shown once)."""
    if url:
        created = _admin_api(url, "POST", "/v1/admin/tenants", {"name": name})
        tenant_id, token = created["id"], created["token"]
    else:
        from service import tenants as tenant_domain
        from service.clock import utcnow
        from service.db import session_scope

        with session_scope(_existing_database(config_path)) as session:
            tenant, token = tenant_domain.create(session, name, utcnow())
            tenant_id = tenant.id
    click.echo(f"tenant id: {tenant_id}")
    click.echo(f"token:     {token}")
    click.echo("The token is shown only now; store it safely.", err=True)


@tenants.command("list")
@CONFIG_OPTION
@JSON_OPTION
def tenants_list(config_path: str | None, as_json: bool) -> None:
    """Every tenant, newest first."""
    from service import tenants as tenant_domain
    from service.db import session_scope
    from service.schemas import TenantOut

    factory = _existing_database(config_path)
    with session_scope(factory) as session:
        rows = [
            TenantOut.model_validate(t, from_attributes=True).model_dump(mode="json")
            for t in tenant_domain.page(session, 10_000, 0)
        ]
    _print(rows, ["id", "enabled", "created_at", "name"], as_json)


@tenants.command("disable")
@CONFIG_OPTION
@URL_OPTION
@click.argument("tenant_id")
def tenants_disable(config_path: str | None, url: str | None, tenant_id: str) -> None:
    """Disable a tenant: its token stops working and its leases end (audit-logged)."""
    if url:
        _admin_api(url, "DELETE", f"/v1/admin/tenants/{_path_part(tenant_id)}")
        click.echo(f"tenant {tenant_id} disabled")
        return
    from service import tenants as tenant_domain
    from service.clock import utcnow
    from service.db import session_scope
    from service.errors import DomainError

    factory = _existing_database(config_path)
    try:
        with session_scope(factory) as session:
            tenant_domain.disable(session, tenant_id, utcnow())
    except DomainError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"tenant {tenant_id} disabled")


@main.group()
def workers() -> None:
    """Workers (the machines of the pools)."""


@workers.command("list")
@CONFIG_OPTION
@JSON_OPTION
@click.option("--pool", default=None, help="Only this pool's workers.")
@click.option("--state", default="live", show_default=True, help="A worker state, live or all.")
@click.option("--limit", default=500, show_default=True, type=click.IntRange(1, 10_000))
def workers_list(
    config_path: str | None, as_json: bool, pool: str | None, state: str, limit: int
) -> None:
    """Workers newest first, with the lease each one serves."""
    from service import listing
    from service.db import session_scope

    factory = _existing_database(config_path)
    with session_scope(factory) as session:
        rows = [
            {
                "id": w.id,
                "pool": w.pool,
                "state": w.state,
                "created_at": w.created_at.isoformat(),
                "address": w.address,
                "lease": lease_id,
                "last_error": w.last_error,
            }
            for w, lease_id in listing.workers_page(session, pool, state, limit, 0)
        ]
    _print(rows, ["id", "pool", "state", "created_at", "lease"], as_json)


@workers.command("destroy")
@CONFIG_OPTION
@URL_OPTION
@click.argument("worker_id")
def workers_destroy(config_path: str | None, url: str | None, worker_id: str) -> None:
    """Destroy a worker now: its live lease is revoked (audit-logged); the scheduler
    destroys the machine at its next pass."""
    if url:
        answer = _admin_api(url, "DELETE", f"/v1/admin/workers/{_path_part(worker_id)}")
        click.echo(f"worker {worker_id}: {answer.get('state')}")
        return
    from service import workers as worker_domain
    from service.clock import utcnow
    from service.db import session_scope
    from service.errors import DomainError

    factory = _existing_database(config_path)
    try:
        with session_scope(factory) as session:
            worker, lease_id = worker_domain.destroy_by_operator(session, worker_id, utcnow())
            state = worker.state
    except DomainError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"worker {worker_id}: {state}" + (f" (lease {lease_id} ended)" if lease_id else ""))


@main.group()
def leases() -> None:
    """Leases (a tenant's hold on a worker)."""


@leases.command("list")
@CONFIG_OPTION
@JSON_OPTION
@click.option("--pool", default=None, help="Only this pool's leases.")
@click.option("--tenant", "tenant_id", default=None, help="Only this tenant's leases.")
@click.option("--state", default="live", show_default=True, help="A lease state, live or all.")
@click.option("--limit", default=500, show_default=True, type=click.IntRange(1, 10_000))
def leases_list(
    config_path: str | None,
    as_json: bool,
    pool: str | None,
    tenant_id: str | None,
    state: str,
    limit: int,
) -> None:
    """Leases newest first; a pending one says why it waits. Never a worker's token."""
    from service import listing
    from service.api.present import leases_out
    from service.db import session_scope

    factory = _existing_database(config_path)
    with session_scope(factory) as session:
        rows = listing.leases_page(
            session, tenant_id=tenant_id, pool=pool, state=state, limit=limit
        )
        out = [
            lease.model_dump(mode="json")
            for lease in leases_out(session, rows, viewer_tenant_id=None)
        ]
    if not as_json:  # the table shows the worker's id and why a lease waits, in short
        for lease in out:
            lease["worker"] = (lease["worker"] or {}).get("id")
            lease["waiting"] = (lease["waiting_reason"] or {}).get("detail")
    _print(out, ["id", "pool", "state", "tenant_id", "worker", "created_at", "waiting"], as_json)


@leases.command("revoke")
@CONFIG_OPTION
@URL_OPTION
@click.argument("lease_id")
def leases_revoke(config_path: str | None, url: str | None, lease_id: str) -> None:
    """Revoke a lease: it ends and its worker is destroyed (audit-logged)."""
    if url:
        answer = _admin_api(url, "DELETE", f"/v1/admin/leases/{_path_part(lease_id)}")
        click.echo(f"lease {lease_id}: {answer.get('state')}")
        return
    from service import leasing
    from service.clock import utcnow
    from service.db import session_scope
    from service.errors import DomainError

    factory = _existing_database(config_path)
    try:
        with session_scope(factory) as session:
            lease = leasing.revoke_lease(session, lease_id, utcnow(), "revoked by operator (cli)")
            state = lease.state
    except DomainError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"lease {lease_id}: {state}")


def _path_part(value: str) -> str:
    import urllib.parse

    return urllib.parse.quote(value, safe="")


def _print(rows: list[dict[str, Any]], columns: list[str], as_json: bool) -> None:
    """Rows as a JSON array, or a table whose columns fit their content."""
    if as_json:
        click.echo(json.dumps(rows, indent=2, default=str))
        return
    cells = [[("" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip())
    for r in cells:
        click.echo("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip())


@main.command()
@CONFIG_OPTION
@JSON_OPTION
def pools(config_path: str | None, as_json: bool) -> None:
    """Pools, their settings and worker counts (and why one is degraded)."""
    from sqlmodel import col, select

    from service.db import session_scope
    from service.models import Pool
    from service.pools import PoolCounts, counts_by_pool

    factory = _existing_database(config_path)
    with session_scope(factory) as session:
        counts = counts_by_pool(session)
        rows = []
        for pool in session.exec(select(Pool).order_by(col(Pool.name))).all():
            c = counts.get(pool.name, PoolCounts({}, 0))
            rows.append(
                {
                    "name": pool.name,
                    "os": pool.os,
                    "provisioner": pool.provisioner,
                    "enabled": pool.enabled,
                    "min_ready": pool.min_ready,
                    "max_workers": pool.max_workers,
                    **{state: c.by_state.get(state, 0) for state in _COUNTED},
                    "pending": c.pending_leases,
                    "degraded_reason": pool.degraded_reason,
                    "warning": pool.warning,
                }
            )
    columns = ["name", "os", "provisioner", "enabled", "min_ready", "max_workers"]
    _print(rows, [*columns, *_COUNTED, "pending", "degraded_reason"], as_json)


_COUNTED = ["provisioning", "ready", "leased", "destroying", "failed"]


@main.command("check-config")
@click.argument("path", type=click.Path(dir_okay=False))
def check_config(path: str) -> None:
    """Validate a config file (exit 1 with the offending key if invalid)."""
    config = _load(path)
    try:
        config.require_admin_token()
    except ConfigError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(
        f"{path}: ok ({len(config.pools)} pools: "
        f"{', '.join(p.name for p in config.pools) or 'none'})"
    )


@main.command("gen-key")
def gen_key() -> None:
    """Print a new encryption key for WORKERLEASE_ENCRYPTION_KEY."""
    from service.crypto import new_key

    click.echo(new_key())


@main.group()
def images() -> None:
    """Worker images."""


@images.command("build")
@click.argument("name", required=False, default="testing")
def images_build(name: str) -> None:
    """Build a worker image (testing | ubuntu | windows) with the local Docker engine."""
    from images.build import ImageBuildError, build_image

    try:
        click.echo(build_image(name, verbose=True))
    except ImageBuildError as exc:
        raise click.ClickException(str(exc)) from None


def _simulation_commands() -> None:
    from service.simulate_cli import simulate_command  # docs/capacity.md

    main.add_command(simulate_command, "simulate")


_simulation_commands()


def _existing_database(config_path: str | None) -> Any:
    """A session factory on the database as it is: no migration, no pools applied.

    Only ``serve``, ``scheduler`` and ``db upgrade`` change the schema or apply the
    config; every other command reads or acts on what they made. Without a configured
    database, or with a SQLite file that does not exist, it stops and says so (a
    default ``./workerlease.db`` would be made empty and read back as "no tenants").
    """
    from service import crypto
    from service.db import make_engine, session_factory
    from service.migrate import current_revision
    from service.startup import sqlite_path

    if not config_path and not os.environ.get("WORKERLEASE_DATABASE_URL"):
        raise click.ClickException(
            "no database configured: pass --config FILE (or set WORKERLEASE_CONFIG, "
            "or WORKERLEASE_DATABASE_URL)"
        )
    config = _load(config_path)
    path = sqlite_path(config.database_url)
    if path is not None and not path.exists():
        raise click.ClickException(
            f"database {path} does not exist: start `workerlease serve` (or run "
            "`workerlease db upgrade`) with this config first"
        )
    crypto.configure(config.encryption_key)
    engine = make_engine(config.database_url, config.database_pool_size)
    if current_revision(engine) is None:
        engine.dispose()
        raise click.ClickException(
            "the database has no workerlease schema: run `workerlease db upgrade` first"
        )
    return session_factory(engine)


if __name__ == "__main__":
    main()
