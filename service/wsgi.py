"""WSGI entry point for running the API under an external gunicorn (``infra/gunicorn.conf.py``).

Reads the config from ``WORKERLEASE_CONFIG``. The background jobs do not run here:
run ``workerlease scheduler`` once per deployment next to it (``workerlease serve``
does both for you).
"""

from __future__ import annotations

from service.app import create_app
from service.config import load_config

app = create_app(load_config(None))
