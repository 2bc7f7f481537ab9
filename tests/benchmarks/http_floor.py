"""The HTTP floor: empty Flask routes under gunicorn with ``workerlease serve``'s settings.

``python -m tests.benchmarks.http_floor --port N [--connections 10000] [--workers 1]``.
The gunicorn options mirror ``service/server.py`` (gevent, keep-alive 5 s, the
access log on stderr in the same format), so the difference to the service is
the service's own work: auth, validation, the transaction, serialisation.
"""

from __future__ import annotations

import argparse
from typing import Any

from flask import Flask, request
from gunicorn.app.base import BaseApplication

app = Flask(__name__)


@app.get("/v1/pools")
def pools() -> Any:
    return {"pools": []}


@app.post("/v1/leases")
def create_lease() -> Any:
    request.get_data()
    return {"id": "l_floor", "state": "active"}, 201


@app.delete("/v1/leases/<lease_id>")
def release_lease(lease_id: str) -> Any:
    return {"id": lease_id, "state": "released"}, 200


class _Floor(BaseApplication):
    def __init__(self, options: dict[str, Any]) -> None:
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Flask:
        return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--connections", type=int, default=10_000)
    args = parser.parse_args()
    _Floor(
        {
            "bind": f"127.0.0.1:{args.port}",
            "workers": args.workers,
            "worker_class": "gevent",  # as service/server.py
            "worker_connections": args.connections,
            "timeout": 120,
            "keepalive": 5,
            "accesslog": "-",
            "access_log_format": '%(h)s "%(r)s" %(s)s %(b)s %(M)sms',
            "errorlog": "-",
            "loglevel": "info",
            "control_socket_disable": True,
        }
    ).run()


if __name__ == "__main__":
    main()
