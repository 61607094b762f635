"""A throwaway PostgreSQL server for tests: ``initdb`` into a temporary folder, ``pg_ctl start`` on
127.0.0.1 and a free port (and a unix socket in that folder), torn down afterwards.

The server binaries come from the ``PATH`` or from Debian's ``/usr/lib/postgresql/VERSION/bin``
(package ``postgresql``); the Python driver is psycopg 3 (``pip install dropkit[postgres]``).
PostgreSQL refuses to run as root, so under root the cluster belongs to, and runs as, the
unprivileged user ``postgres`` (which the Debian package creates) or ``nobody``.

:func:`start_server` raises :class:`Unavailable` with the reason when no server can be started
here; the fixture in ``conftest.py`` turns that into a skip, or into a failure when the
environment variable ``DROPKIT_TEST_POSTGRES`` is ``required`` (as ``.ci/run`` sets it).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: the cluster's superuser; trust authentication, so the URL holds no password
SUPERUSER = "dropkit"
#: seconds pg_ctl waits for the server to accept connections (or to stop)
PG_CTL_WAIT = 60
#: users a root test process runs the server as, the first that exists
UNPRIVILEGED = ("postgres", "nobody")


class Unavailable(RuntimeError):
    """No PostgreSQL server can be started on this machine; the message says why."""


def _binaries() -> Path:
    """The folder holding initdb and pg_ctl: on the PATH, else the newest Debian cluster version."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl", path=str(Path(found).parent)):
        return Path(found).resolve().parent
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if debian:
        return Path(debian[-1]).parent
    raise Unavailable("PostgreSQL server binaries (initdb, pg_ctl) not found: apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class PostgresServer:
    """A running throwaway cluster. ``url(db)`` is the SQLAlchemy URL of one of its databases."""

    bin_dir: Path
    root: Path
    port: int
    user: str | None  # who the server runs as (None: this process's user)
    databases: list[str] = field(default_factory=list)

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def log_file(self) -> Path:
        return self.root / "server.log"

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str, timeout: float = PG_CTL_WAIT + 30) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user is not None:
            command = ["runuser", "-u", self.user, "--", *command]
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=self.root)

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        options = (f"-c listen_addresses=127.0.0.1 -c port={self.port} -c unix_socket_directories={self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        done = self._run("pg_ctl", "start", "-w", "-t", str(PG_CTL_WAIT), "-D", str(self.data_dir),
                         "-l", str(self.log_file), "-o", options)
        if done.returncode != 0:
            raise Unavailable(f"pg_ctl start failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` closes every connection and shuts down cleanly, ``immediate``
        aborts like a crash (recovery runs at the next start)."""
        done = self._run("pg_ctl", "stop", "-w", "-t", str(PG_CTL_WAIT), "-m", mode, "-D", str(self.data_dir))
        if done.returncode != 0:
            raise RuntimeError(f"pg_ctl stop failed ({done.returncode}): {done.stderr.strip()}\n{self.log_tail()}")

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", str(self.data_dir)).returncode == 0

    def create_database(self, name: str) -> str:
        """Create an empty database and return its URL."""
        done = self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", SUPERUSER, name, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"createdb {name} failed: {done.stderr.strip()}")
        self.databases.append(name)
        return self.url(name)

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return "(no server log)"

    def close(self) -> None:
        """Stop the server if it runs and delete the cluster's folder."""
        try:
            if self.running():
                self.stop("immediate")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


def start_server() -> PostgresServer:
    """Make a cluster in a fresh temporary folder and start it; raises :class:`Unavailable`."""
    try:
        import psycopg  # noqa: F401  (the driver SQLAlchemy 2.1 uses for postgresql:// URLs)
    except ImportError as err:
        raise Unavailable(f"the PostgreSQL driver is not installed ({err}): pip install 'dropkit[postgres]'") from None
    bin_dir = _binaries()
    user = None
    if os.geteuid() == 0:
        user = next((name for name in UNPRIVILEGED if _user_exists(name)), None)
        if user is None or shutil.which("runuser") is None:
            raise Unavailable(f"running as root, and neither runuser nor a user among {UNPRIVILEGED} to run the "
                              "server as is available (PostgreSQL refuses to run as root)")
    root = Path(tempfile.mkdtemp(prefix="dropkit-pg-"))
    if user is not None:
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
    server = PostgresServer(bin_dir, root, _free_port(), user)
    try:
        done = server._run("initdb", "-D", str(server.data_dir), "-U", SUPERUSER, "--auth=trust",
                           "--encoding=UTF8", "--locale=C", "--no-sync")
        if done.returncode != 0:
            raise Unavailable(f"initdb failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        for attempt in range(3):  # another process may take the free port before the server does
            try:
                server.start()
                break
            except Unavailable:
                if attempt == 2:
                    raise
                server.port = _free_port()
                time.sleep(0.5)
    except BaseException:
        server.close()
        raise
    return server


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True
