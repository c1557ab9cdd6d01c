"""A real PostgreSQL server on a free loopback port, for tests.

``PostgresServer`` runs the distribution's ``initdb`` and ``pg_ctl`` (Debian
keeps them in /usr/lib/postgresql/VERSION/bin, off PATH) with trust auth on
127.0.0.1 only. PostgreSQL refuses to run as root, so as root the server runs
as the ``postgres`` system user (the Debian package makes it) or ``nobody``,
through ``runuser``; its data directory then lives in a private directory
under the system temp dir, since pytest's tmp_path sits inside a root-only
directory that user cannot enter.

Fixtures: ``postgres`` (one server per test module) and ``pg_url`` (a fresh,
empty database on it for each test). Both skip with the reason when the
binaries or psycopg are missing. Import them with
``from tests.pg import pg_url, postgres  # noqa: F401``.
"""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Self

import pytest

from tests.broker import free_port


def postgres_bindir() -> Path | None:
    """The newest installed PostgreSQL's bin directory holding initdb and pg_ctl."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parts[-3]) if Path(p).parts[-3].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    return None


def _server_user() -> str | None:
    """The unprivileged user to run the server as when we are root (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError("running as root with neither a 'postgres' nor a 'nobody' user to run PostgreSQL as")


class PostgresServer:
    """One throwaway cluster. ``start()`` runs initdb and the server; ``stop()`` ends it."""

    host = "127.0.0.1"

    def __init__(self, workdir: Path | str, *, port: int | None = None) -> None:
        bindir = postgres_bindir()
        if bindir is None:
            raise FileNotFoundError("PostgreSQL is not installed; install it with `apt-get install postgresql`")
        self.bindir = bindir
        self.port = port or free_port()
        self.user = _server_user()
        self._private: str | None = None
        if self.user is None:
            base = Path(workdir)
        else:
            # The server user cannot enter pytest's root-only tmp tree: use a dir of its own.
            self._private = tempfile.mkdtemp(prefix="gate-agent-pg-")
            base = Path(self._private)
            pw = pwd.getpwnam(self.user)
            os.chown(base, pw.pw_uid, pw.pw_gid)
        base.mkdir(parents=True, exist_ok=True)
        self.datadir = base / "data"
        self.log_path = base / "postgres.log"
        self.started = False

    @property
    def superuser_url(self) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/postgres"

    def url(self, dbname: str) -> str:
        return f"postgresql://postgres@{self.host}:{self.port}/{dbname}"

    def _run(self, *args: str, timeout: float = 60) -> None:
        cmd = list(args)
        if self.user is not None:
            cmd = ["runuser", "-u", self.user, "--", *cmd]
        done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=timeout,
                              cwd=self.datadir.parent)
        if done.returncode != 0:
            raise RuntimeError(
                f"{' '.join(args[:2])} failed ({done.returncode}): {done.stderr.strip()} "
                f"{done.stdout.strip()[-500:]} {self._log_tail()}"
            )

    def start(self) -> Self:
        self._run(str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "-A", "trust", "--no-sync", "--no-locale", "-E", "UTF8")
        # Loopback TCP only; the unix socket goes into the data dir, not /var/run.
        # fsync off: these clusters are thrown away, and it keeps the tests fast.
        opts = (f"-c listen_addresses={self.host} -p {self.port} "
                f"-c unix_socket_directories={self.datadir} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off")
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-l", str(self.log_path),
                  "-o", opts, "-w", "-t", "30", "start")
        self.started = True
        return self

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.superuser_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        try:
            if self.started:
                self._run(str(self.bindir / "pg_ctl"), "-D", str(self.datadir), "-m", "immediate",
                          "-w", "-t", "30", "stop")
                self.started = False
        finally:
            if self._private is not None:
                shutil.rmtree(self._private, ignore_errors=True)

    def _log_tail(self) -> str:
        try:
            return "log: " + " | ".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        except OSError:
            return "(no postgres log)"

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def skip_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'psycopg[binary]'); PostgreSQL tests skipped"
    if postgres_bindir() is None:
        return "PostgreSQL is not installed (apt-get install postgresql); PostgreSQL tests skipped"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser to start PostgreSQL unprivileged; tests skipped"
    return None


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One started PostgreSQL server for the test module."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.stop()


_count = iter(range(1, 1_000_000))


@pytest.fixture
def pg_url(postgres: PostgresServer) -> str:
    """A fresh empty database for this test: its postgresql:// URL."""
    return postgres.create_database(f"ingest_{os.getpid()}_{next(_count)}_{int(time.time() * 1000) % 10**6}")
