"""``workerlease serve``: gunicorn for the API, the scheduler in a process of its own.

SQLite's file-lock bookkeeping does not survive ``fork()`` (a forked child
that opens the database after its parent did can wait forever on locks nobody
holds), so the gunicorn master never keeps a connection: it upgrades the
schema, closes the engine, and starts the scheduler as a separate, supervised
``workerlease scheduler`` process once the socket listens. That also makes the
scheduler run exactly once however many web workers are forked. SIGTERM drains
the web workers, then stops the scheduler; leases and workers stay in the
database and agents keep running, found again on restart.
"""

from __future__ import annotations

import logging
import os
import resource
import shutil
import subprocess
import sys
import threading
from typing import Any

from gunicorn.app.base import BaseApplication

from service import metrics, startup
from service.config import Config, ConfigError
from service.startup import prepare_database, service_url

log = logging.getLogger("workerlease.server")

RESTART_DELAY_S = 2.0
HEADER_TIMEOUT_S = 5


def _allow_open_files(connections: int) -> None:
    """Raise the open-file limit to what ``connections`` need, as far as the hard limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = connections + 256  # database, log and agent sockets besides the clients
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < wanted:
            log.warning("open_file_limit_low limit=%d connections=%d", target, connections)


class _Gunicorn(BaseApplication):
    def __init__(self, config: Config, options: dict[str, Any]) -> None:
        self._config = config
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        from service.app import create_app

        return create_app(self._config)


class SchedulerProcess:
    """``workerlease scheduler`` as a child, restarted if it dies, stopped on exit."""

    def __init__(self, command: list[str]) -> None:
        self._command = command
        self._stopping = threading.Event()
        self._process: subprocess.Popen[bytes] | None = None
        self._thread = threading.Thread(
            target=self._supervise, name="scheduler-supervisor", daemon=True
        )

    def start(self) -> None:
        # Spawned here, synchronously, before gunicorn forks its web workers: a fork while
        # Popen waits for exec would hand the workers Popen's status pipe.
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        # Its own session: signals meant for the server's process group (Ctrl-C) reach
        # the scheduler only through stop(), after the web workers drained.
        self._process = subprocess.Popen(self._command, start_new_session=True)
        log.info("scheduler_process_started pid=%d", self._process.pid)

    def _supervise(self) -> None:
        while self._process is not None:
            code = self._process.wait()
            if self._stopping.is_set():
                return
            metrics.process_exited(self._process.pid)
            log.error("scheduler_process_exited code=%s; restarting", code)
            if self._stopping.wait(RESTART_DELAY_S):
                return
            self._spawn()

    def stop(self, timeout_s: float = 60) -> None:
        self._stopping.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self._thread.join(5)


def run_server(
    config: Config,
    config_path: str | None,
    *,
    host: str,
    port: int,
    workers: int,
    connections: int,
    with_scheduler: bool,
) -> None:
    prepare_database(config).dispose()  # no connection may cross the fork
    _allow_open_files(connections)
    url = service_url(config, host, port)
    command = [
        sys.executable,
        "-m",
        "service.cli",
        "scheduler",
        "--public-url",
        url,
        "--exit-with-parent",
    ]
    if config_path:
        command += ["--config", config_path]
    scheduler = SchedulerProcess(command) if with_scheduler else None

    def when_ready(_server: Any) -> None:
        log.info("listening url=http://%s:%s workers_call_back=%s", host, port, url)
        if scheduler is not None:
            scheduler.start()

    def on_exit(_server: Any) -> None:
        if scheduler is not None:
            scheduler.stop()
        own_metrics_dir = os.environ.get("WORKERLEASE_OWN_METRICS_DIR")
        if own_metrics_dir:
            shutil.rmtree(own_metrics_dir, ignore_errors=True)
        log.info("stopped")

    def on_reload(_server: Any) -> None:
        reload_pools(config_path)

    def child_exit(_server: Any, worker: Any) -> None:
        metrics.process_exited(worker.pid)

    options = {
        "bind": f"{host}:{port}",
        "workers": workers,
        # One greenlet per connection: a request that waits (wait_seconds) or a client
        # that is slow to send costs a greenlet, not one of a few threads.
        # (gunicorn's gevent worker, which also ends long polls at once on SIGTERM)
        "worker_class": "service.gunicorn_worker.DrainingGeventWorker",
        "worker_connections": connections,
        "timeout": 120,
        "graceful_timeout": 70,  # a lease request may wait up to 60 s
        # Also the header timeout: the gevent worker reads each request's headers,
        # the first included, under a timeout of this many seconds, then closes.
        "keepalive": HEADER_TIMEOUT_S,
        "accesslog": "-",
        "errorlog": "-",
        "logger_class": "service.logs.GunicornLogger",  # the service's logfmt lines
        "loglevel": config.log_level.lower(),
        "when_ready": when_ready,
        "on_exit": on_exit,
        "on_reload": on_reload,
        "child_exit": child_exit,
        "proc_name": f"workerlease[{config.deployment_id}]",
        "control_socket_disable": True,
    }
    _Gunicorn(config, options).run()


def reload_pools(config_path: str | None) -> bool:
    """SIGHUP: apply the config file's pools again (added, changed, removed ones), as at
    start. gunicorn then replaces its web workers gracefully (their long polls are
    answered at once, nothing is dropped); the scheduler reads pools from the database
    at its next pass. A file that does not validate is refused with the key named, and
    the settings in force stay. Other keys (database, tokens, ports) need a restart."""
    if not config_path:
        log.warning("reload_skipped reason=no_config_file")
        return False
    try:
        fresh = startup.load(config_path, serving=True)
    except ConfigError as exc:
        log.error("reload_refused config=%s error=%s", config_path, str(exc).replace("\n", " "))
        return False
    prepare_database(fresh).dispose()  # no connection may stay in the master
    log.info("reloaded config=%s pools=%d", config_path, len(fresh.pools))
    return True
