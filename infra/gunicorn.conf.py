# gunicorn settings for the API when run by an external gunicorn:
#   export WORKERLEASE_CONFIG=/etc/workerlease/config.yaml
#   gunicorn -c infra/gunicorn.conf.py service.wsgi:app
# plus exactly one `workerlease scheduler` per deployment (see infra/systemd/).
# `workerlease serve` applies the same settings and starts the scheduler itself.
import os
import tempfile

bind = os.environ.get("WORKERLEASE_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("WORKERLEASE_WEB_WORKERS", "2"))
# One greenlet per connection: a request that waits (wait_seconds) or a slow client
# costs a greenlet, not a thread. keepalive is also the timeout for reading a request's
# headers (the first included): a client that does not finish them is dropped.
worker_class = "gevent"
worker_connections = 10_000
timeout = 120
graceful_timeout = 70
keepalive = 5
accesslog = "-"
# The service's logfmt lines for gunicorn's own logs too (no headers: tokens never logged).
logger_class = "service.logs.GunicornLogger"
errorlog = "-"
# Web workers must not share database connections made before the fork, so nothing is
# preloaded; metrics from several processes are aggregated through this directory.
preload_app = False
raw_env = [f"PROMETHEUS_MULTIPROC_DIR={tempfile.mkdtemp(prefix='workerlease-prom-')}"]


def child_exit(_server, worker):  # a dead web worker's live gauges leave the sums
    from service.metrics import process_exited

    process_exited(worker.pid)
