"""A throwaway PostgreSQL server for tests: a real cluster made by `initdb` in a temporary folder,
started by `pg_ctl` on a Unix socket in that folder (no TCP port, so it cannot collide with a
server already on the machine), stopped and removed at the end.

The binaries come from Debian's ``postgresql`` package (``/usr/lib/postgresql/<version>/bin``, not
on PATH) or PATH; `scripts/setup.sh` installs the package on CI. `initdb` refuses to run as root,
so as root the cluster belongs to the ``postgres`` system user the package creates.
"""

from __future__ import annotations

import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

# Durability off: a test cluster is thrown away, and fsync per commit would dominate its time.
_FAST = "-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
PORT = 5432  # names the socket file only (listen_addresses is empty)


class PostgresUnavailable(RuntimeError):
    """No usable PostgreSQL installation; the message says what is missing and how to get it."""


def find_bin_dir() -> Path:
    """The folder holding `initdb` and `pg_ctl`: Debian's newest, else the ones on PATH.

    Raises:
        PostgresUnavailable: neither is installed.
    """
    debian = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"),
                    key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0)
    if debian:
        return Path(debian[-1]).parent
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).resolve().parent
    raise PostgresUnavailable("PostgreSQL is not installed (no initdb in /usr/lib/postgresql/*/bin or on "
                              "PATH): `apt-get install postgresql` (scripts/setup.sh does it as root)")


class PostgresCluster:
    """A started throwaway cluster. `url(db)` gives a psycopg URL; `create_database` makes a fresh
    database; `stop` stops the server and deletes the folder.

    Raises:
        PostgresUnavailable: no binaries, or root without a ``postgres`` user to run them as.
        subprocess.CalledProcessError: initdb or the server failed (its log is in the message).
    """

    SUPERUSER = "shoplens"

    def __init__(self) -> None:
        self.bin = find_bin_dir()
        self._as: list[str] = []
        owner: pwd.struct_passwd | None = None
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError as e:
                raise PostgresUnavailable("running as root and there is no `postgres` user to run initdb as "
                                          "(Debian's postgresql package creates it)") from e
            self._as = ["runuser", "-u", "postgres", "--"]
        self.dir = Path(tempfile.mkdtemp(prefix="shoplens-pg-"))  # short: the socket path has a limit
        if owner is not None:
            os.chown(self.dir, owner.pw_uid, owner.pw_gid)
        self.data = self.dir / "data"
        self._counter = itertools.count(1)
        try:
            self._run("initdb", "-D", str(self.data), "-U", self.SUPERUSER, "--auth=trust",
                      "--encoding=UTF8", "--locale=C.UTF-8", "-N")
            self._run("pg_ctl", "-D", str(self.data), "-l", str(self.dir / "server.log"), "-w", "-t", "60",
                      "-o", f"-k {self.dir} -c listen_addresses='' -p {PORT} {_FAST}", "start")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, tool: str, *args: str) -> None:
        proc = subprocess.run([*self._as, str(self.bin / tool), *args], capture_output=True, text=True,
                              timeout=120)
        if proc.returncode:
            log = self.dir / "server.log"
            tail = log.read_text()[-2000:] if log.exists() else ""
            raise subprocess.CalledProcessError(proc.returncode, proc.args, proc.stdout,
                                                proc.stderr + "\n--- server.log ---\n" + tail)

    def url(self, database: str = "postgres") -> str:
        """A ``postgresql+psycopg`` URL to `database` over the cluster's socket."""
        return f"postgresql+psycopg://{self.SUPERUSER}@/{database}?host={self.dir}&port={PORT}"

    def create_database(self, icu_locale: str | None = None) -> str:
        """A new empty database; returns its URL. With `icu_locale` (e.g. ``en-US``) its default
        collation is that language's, as a production database's often is."""
        import psycopg

        name = f"t{next(self._counter)}"
        extra = f" LOCALE_PROVIDER icu ICU_LOCALE '{icu_locale}' TEMPLATE template0" if icu_locale else ""
        with psycopg.connect(host=str(self.dir), port=PORT, user=self.SUPERUSER, dbname="postgres",
                             autocommit=True) as c:
            c.execute(f"CREATE DATABASE {name}{extra}")  # type: ignore[arg-type]  # our own name
        return self.url(name)

    def drop_database(self, url: str) -> None:
        """Drop a database made by `create_database`, closing whatever still uses it."""
        import psycopg
        from sqlalchemy.engine import make_url

        name = make_url(url).database
        with psycopg.connect(host=str(self.dir), port=PORT, user=self.SUPERUSER, dbname="postgres",
                             autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")  # type: ignore[arg-type]

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
