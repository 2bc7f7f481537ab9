"""WSGI entry point for running the API under an external gunicorn (``infra/gunicorn.conf.py``).

Reads the config from ``WORKERLEASE_CONFIG``. The background jobs do not run here:
run ``workerlease scheduler`` once per deployment next to it (``workerlease serve``
does both for you).
"""

from __future__ import annotations

from service import startup
from service.app import create_app
from service.security import make_files_private

make_files_private()
app = create_app(startup.load(None, serving=True))
