"""What one PostgreSQL doorbell ring costs the web process: ``PostgresBell.notify`` (its
own autocommit connection, one round trip) against the same ``NOTIFY`` on a pooled
connection with its checkout ping and commit (how the bell sent it before).

    python -m tests.benchmarks.bell_cost [--rings 3000] [--pairs 3]

Prints process CPU and wall time per ring, alternating the two ways ``--pairs`` times.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from sqlalchemy import create_engine, text

from service.doorbell import CHANNEL, PostgresBell
from tests.support.postgres import PostgresServer


def _per_ring(ring: Callable[[], None], rings: int) -> tuple[float, float]:
    for _ in range(min(200, rings)):  # warm-up: the connection, statement caches
        ring()
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(rings):
        ring()
    return (
        1e6 * (time.process_time() - cpu) / rings,
        1e6 * (time.perf_counter() - wall) / rings,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rings", type=int, default=3000)
    parser.add_argument("--pairs", type=int, default=3)
    args = parser.parse_args(argv)
    server = PostgresServer.start()
    try:
        engine = create_engine(server.create_database(), pool_pre_ping=True)
        bell = PostgresBell(engine)

        def pooled() -> None:
            with engine.connect() as connection:
                connection.execute(text("SELECT pg_notify(:channel, '')"), {"channel": CHANNEL})
                connection.commit()

        for _ in range(args.pairs):
            for name, ring in (("pooled connection", pooled), ("bell's own", bell.notify)):
                cpu_us, wall_us = _per_ring(ring, args.rings)
                print(f"{name:18s} CPU {cpu_us:6.0f} us  wall {wall_us:6.0f} us per ring")
        engine.dispose()
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
