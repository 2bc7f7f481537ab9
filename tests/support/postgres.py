"""A throwaway PostgreSQL server for the tests: initdb into a temp dir, pg_ctl start on 127.0.0.1.

Runs as the ``postgres`` system user (initdb refuses root). One server per test
session; each test gets a fresh database.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path


class PostgresUnavailable(RuntimeError):
    pass


def _bin_dir() -> Path:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL server binaries (run .ci/ensure-postgres)")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _as_postgres(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    prefix = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    return subprocess.run(
        prefix + args, check=True, capture_output=True, text=True, timeout=120, **kwargs
    )  # type: ignore[call-overload]


@dataclass
class PostgresServer:
    data_dir: Path
    port: int
    bin_dir: Path

    @classmethod
    def start(cls) -> PostgresServer:
        bin_dir = _bin_dir()
        base = Path(tempfile.mkdtemp(prefix="workerlease-pg-"))
        data_dir = base / "data"
        if os.geteuid() == 0:
            shutil.chown(base, "postgres", "postgres")
        server = cls(data_dir, _free_port(), bin_dir)
        try:
            _as_postgres(
                [
                    str(bin_dir / "initdb"),
                    "-D",
                    str(data_dir),
                    "-A",
                    "trust",
                    "-U",
                    "postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                ]
            )
            server.resume()
        except subprocess.CalledProcessError as exc:
            raise PostgresUnavailable(f"could not start PostgreSQL: {exc.stderr or exc}") from exc
        return server

    def resume(self) -> None:
        """Start (again) on the same port and data directory."""
        base = self.data_dir.parent
        options = (
            f"-c listen_addresses=127.0.0.1 -p {self.port} -k {base} -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=300"
        )
        _as_postgres(
            [
                str(self.bin_dir / "pg_ctl"),
                "-D",
                str(self.data_dir),
                "-o",
                options,
                "-l",
                str(base / "server.log"),
                "-w",
                "-t",
                "60",
                "start",
            ]
        )

    def pause(self) -> None:
        """Stop the server (fast: clients are disconnected), keeping its data."""
        _as_postgres(
            [str(self.bin_dir / "pg_ctl"), "-D", str(self.data_dir), "-m", "fast", "-w", "stop"]
        )

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            _as_postgres(
                [
                    str(self.bin_dir / "pg_ctl"),
                    "-D",
                    str(self.data_dir),
                    "-m",
                    "immediate",
                    "-w",
                    "stop",
                ]
            )
        shutil.rmtree(self.data_dir.parent, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as connection:
            # FILE_COPY (PostgreSQL 15+): the default WAL_LOG strategy writes each copy
            # of the template through the WAL, and a run's few hundred databases then
            # made stopping the server take two minutes (FILE_COPY: about one second).
            strategy = " STRATEGY FILE_COPY" if connection.info.server_version >= 150000 else ""
            connection.execute(f'CREATE DATABASE "{name}"{strategy}')
        return self.url(name)
