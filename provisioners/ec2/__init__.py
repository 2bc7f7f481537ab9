"""EC2 provisioner: one EC2 instance per worker, found again by its tags.

Ownership lives in instance and volume tags (``workerlease:deployment``,
``workerlease:pool``, ``workerlease:worker``; EC2 tag keys conventionally use
``:`` where other platforms use ``.``). ``create`` looks for an instance tagged
with the worker id before launching, so a crash between launch and the service
recording the result never starts a second machine; the ``ClientToken`` gives
the same guarantee on real EC2 when the tag lookup has not caught up yet
(DescribeInstances is eventually consistent).

The instance's user data is the worker's boot script from
:func:`provisioners.userdata.render_user_data` (the agent, its installer and its
environment with the one-time bootstrap token, never an access token).

Every EC2 request (botocore's retries included) passes a client-side rate limiter
shared by all pools of the process that talk to the same region and endpoint
(:mod:`provisioners.ec2.throttling`).

The package: ``options`` (what a pool configures), ``throttling``, ``errors`` (the
translation of botocore's exceptions) and ``provisioner`` (``EC2Provisioner``).
"""

from __future__ import annotations

from provisioners.ec2.errors import CAPACITY_CODES, TRANSIENT_CODES, translate_error
from provisioners.ec2.options import (
    DEFAULT_AGENT_PORT,
    RESERVED_TAG_PREFIXES,
    TAG_DEPLOYMENT,
    TAG_INSTALLATION,
    TAG_POOL,
    TAG_WORKER,
    EC2Options,
    LaunchTemplateRef,
)
from provisioners.ec2.provisioner import (
    ID_BATCH,
    LAUNCH_VISIBILITY_GRACE_S,
    LIVE_STATES,
    NOT_TERMINATED_STATES,
    STATE_MAP,
    USER_DATA_LIMIT,
    EC2Provisioner,
    client_token,
)
from provisioners.ec2.throttling import BUDGETS, FAMILY_OF_OPERATION, RateLimiter, rate_limiter
from provisioners.userdata import agent_files, render_user_data

__all__ = [
    "BUDGETS",
    "CAPACITY_CODES",
    "DEFAULT_AGENT_PORT",
    "FAMILY_OF_OPERATION",
    "ID_BATCH",
    "LAUNCH_VISIBILITY_GRACE_S",
    "LIVE_STATES",
    "NOT_TERMINATED_STATES",
    "RESERVED_TAG_PREFIXES",
    "STATE_MAP",
    "TAG_DEPLOYMENT",
    "TAG_INSTALLATION",
    "TAG_POOL",
    "TAG_WORKER",
    "TRANSIENT_CODES",
    "USER_DATA_LIMIT",
    "EC2Options",
    "EC2Provisioner",
    "LaunchTemplateRef",
    "RateLimiter",
    "agent_files",
    "client_token",
    "rate_limiter",
    "render_user_data",
    "translate_error",
]
