"""The operators' web dashboard at ``/admin/``: server-rendered pages, no build step.

Sign-in exchanges the admin token (a POST form, never a URL) for a session cookie;
every form carries a CSRF token; reads go through ``service.listing``, actions through
the same domain functions as the admin API, so they land in the audit log alike.
"""

from __future__ import annotations

from service.dashboard.views import bp

__all__ = ["bp"]
