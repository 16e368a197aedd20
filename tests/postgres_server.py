"""A PostgreSQL server of a test's own: initdb and pg_ctl in a temporary folder.

The server runs as an unprivileged user (PostgreSQL refuses root; tests run
as root in CI), listens on a free 127.0.0.1 port, keeps its files in a
temporary folder, and asks for a password (so that wrong credentials can be
tried). `find_binaries()` says why there is none when the binaries are missing.
"""
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile

USER, PASSWORD = "fastnn", "fastnn-test"


def find_binaries():
    """(folder holding initdb and pg_ctl, None), or (None, why not)."""
    folders = []
    if shutil.which("pg_config"):
        folders.append(subprocess.run(["pg_config", "--bindir"], capture_output=True,
                                      text=True).stdout.strip())
    folders += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for folder in folders:
        if all(os.access(os.path.join(folder, name), os.X_OK) for name in ("initdb", "pg_ctl")):
            return folder, None
    return None, ("no PostgreSQL server binaries (initdb, pg_ctl) found via pg_config or in "
                  "/usr/lib/postgresql/*/bin; apt-get install postgresql")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresServer:
    """`start()` / `stop()`; `url(database)` and `create_database(name)` while it runs;
    `halt()` and `restart()` stop it and start it again on its port and files (an outage)."""

    def __init__(self, bindir):
        self.bindir = bindir
        self.port = free_port()
        if os.geteuid() == 0:  # the server's own account when Debian made one, else nobody
            names = [p.pw_name for p in pwd.getpwall()]
            account = pwd.getpwnam("postgres" if "postgres" in names else "nobody")
            self.uid, self.gid = account.pw_uid, account.pw_gid
        else:
            self.uid, self.gid = os.getuid(), os.getgid()
        self.folder = tempfile.mkdtemp(prefix="fastnn-postgres-")  # not under pytest's 0700 root
        os.chown(self.folder, self.uid, self.gid)

    def _run(self, *args):
        def drop_privileges():
            if os.geteuid() != self.uid:
                os.setgid(self.gid)
                os.setuid(self.uid)

        return subprocess.run([os.path.join(self.bindir, args[0]), *args[1:]], cwd=self.folder,
                              preexec_fn=drop_privileges, capture_output=True, text=True,
                              env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                                   "LC_ALL": "C"}, timeout=120)

    def start(self):
        password_file = os.path.join(self.folder, "password")
        with open(password_file, "w") as fh:
            fh.write(PASSWORD + "\n")
        os.chown(password_file, self.uid, self.gid)
        data = os.path.join(self.folder, "data")
        done = self._run("initdb", "-D", data, "-U", USER, f"--pwfile={password_file}",
                         "-A", "scram-sha-256", "-E", "UTF8", "--locale=C", "--no-sync")
        if done.returncode:
            raise RuntimeError(f"initdb failed: {done.stderr}")
        return self.restart()

    def restart(self):
        """Start the server on the files start() made (after halt())."""
        options = (f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off")
        done = self._run("pg_ctl", "-D", os.path.join(self.folder, "data"), "-l",
                         os.path.join(self.folder, "log"), "-w", "-o", options, "start")
        if done.returncode:
            log = os.path.join(self.folder, "log")
            raise RuntimeError(f"pg_ctl start failed: {done.stderr}\n"
                               f"{open(log).read() if os.path.exists(log) else ''}")
        return self

    def halt(self):
        """Stop the server as an administrator's restart does (its clients are cut off)."""
        done = self._run("pg_ctl", "-D", os.path.join(self.folder, "data"), "-m", "fast", "-w",
                         "stop")
        if done.returncode:
            raise RuntimeError(f"pg_ctl stop failed: {done.stderr}")

    def stop(self):
        self._run("pg_ctl", "-D", os.path.join(self.folder, "data"), "-m", "immediate", "stop")
        shutil.rmtree(self.folder, ignore_errors=True)

    def url(self, database, password=PASSWORD):
        """The URL of `database`; password=None leaves the password out (libpq finds it)."""
        secret = "" if password is None else f":{password}"
        return f"postgresql+psycopg://{USER}{secret}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name):
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, password=PASSWORD,
                             dbname="postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
