"""Where a study lives: storage URLs, their checks, and a database that rides out outages.

`open_storage` opens the --storage of a search: a database URL (SQLite,
PostgreSQL, ...) or journal:PATH. A URL that cannot work (no driver, no
server, refused credentials, no folder for the file) ends the command with one
line naming host and port, never the password; a database server that stops
answering during the search is waited for (`patient_storage_class`), and one
that stays away raises StorageUnavailable.
"""
import functools
import os
import re
import signal
import threading
import time
import warnings

from fastnn.interrupt import TrainingInterrupted
from fastnn.tune.optuna_api import DATABASE_CALLS

DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
STORAGE_ENV = "FASTNN_STORAGE"  # the storage URL when --storage is not given
MAX_RETRIES = 2  # a trial that takes its worker down every time (out of memory) is given up


def hide_password(url):
    """`url` with its password (if any) shown as ***, for messages and resume commands."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):  # not a URL SQLAlchemy reads (ValueError: a bad port):
        # hide what sits between USER: and @
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "", url
        return scheme + sep + re.sub(r"^([^/:@]*):[^@]*@", r"\1:***@", rest)


def describe_storage(url):
    """`url` for messages: a database's host and port, never its password."""
    if url.startswith("journal:"):
        return f"journal file {url[len('journal:'):]}"
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database}"
    port = parsed.port or DEFAULT_PORTS.get(parsed.get_backend_name(), "?")
    return f"{parsed.get_backend_name()} server {parsed.host}:{port} database {parsed.database}"


def check_file_storage(path, what):
    """SystemExit unless the folder of the storage file `path` exists (and `path` is no folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"fastnn: the {what} {path} is a folder; give a file path in --storage")
    if not os.path.isdir(folder):
        raise SystemExit(f"fastnn: no folder {folder} for the {what} {path}; create it, or give "
                         "--storage a path in an existing folder")


def check_database(url):
    """Connect once to the database of `url`; returns the engine options for Optuna.

    An unknown URL, a missing driver, an unreachable server or refused
    credentials end the command with one line that names host and port.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:  # ValueError: a bad port
        raise SystemExit(f"fastnn: --storage {hide_password(url)!r} is not a storage URL "
                         f"({error}); use "
                         "postgresql+psycopg://USER@HOST:PORT/DATABASE, "
                         "sqlite:///PATH or journal:PATH") from None
    backend = parsed.get_backend_name()
    engine_kwargs = {}
    if backend == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            check_file_storage(parsed.database, "SQLite file")
    else:
        # A trial keeps the pool idle for minutes, and a server may restart: test a
        # connection before using it again (a dead one is replaced).
        engine_kwargs["pool_pre_ping"] = True
    if backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    where = describe_storage(url)
    try:
        engine = sqlalchemy.create_engine(parsed, **engine_kwargs)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as error:
        raise SystemExit(f"fastnn: no database driver for {parsed.drivername!r} ({error}); for "
                         "PostgreSQL: pip install 'fastnn[distributed]' and use a "
                         "postgresql+psycopg:// URL") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as error:
        reason = " ".join(str(error.orig if error.orig is not None else error).split())
        if backend == "sqlite":
            raise SystemExit(f"fastnn: cannot open the study storage, the {where} ({reason}); "
                             "check the path and its permissions") from None
        raise SystemExit(f"fastnn: cannot open the study storage on the {where} ({reason}); "
                         "check that the server runs there and the URL's user, password "
                         "and database") from None
    finally:
        engine.dispose()
    return engine_kwargs


def wait(seconds, stop):
    """Sleep `seconds`, or raise TrainingInterrupted as soon as `stop` (a StopRequest) is set."""
    end = time.monotonic() + seconds
    while True:
        if stop is not None and stop.requested:
            raise TrainingInterrupted("interrupted", None, signal.Signals(stop.signum))
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


class StorageUnavailable(Exception):
    """The study's database did not answer for the whole outage allowance (one line)."""


def storage_errors():
    """The exceptions a storage call raises when the storage, not the call, failed: the
    database (SQLAlchemy's errors, Optuna's wrapping of them, an outage) or a journal file
    (OSError)."""
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    return (StorageUnavailable, StorageInternalError, SQLAlchemyError, OSError)


def _connection_lost(error):
    """True when `error` (raised by an RDBStorage call) says the server went away, not
    that the call was wrong: worth trying again."""
    import sqlalchemy

    from optuna.exceptions import StorageInternalError

    if isinstance(error, StorageInternalError):
        error = error.__cause__
    return isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) \
        or getattr(error, "connection_invalidated", False)




@functools.cache
def patient_storage_class():
    """An optuna RDBStorage whose database calls ride out a server restart.

    A call that fails because the connection is gone is made again (a failed
    transaction was rolled back, so it is made whole or not at all), after
    0.5, 1, 2, 4, 8, 8, ... s, for up to `outage_seconds` from the first
    failure (or until `stop`, a StopRequest, is set); then StorageUnavailable
    names the server. Only the outermost call retries (Optuna's calls nest),
    and one message per outage is logged.
    """
    import optuna
    from optuna.exceptions import StorageInternalError
    from sqlalchemy.exc import SQLAlchemyError

    class PatientRDBStorage(optuna.storages.RDBStorage):
        def __init__(self, url, *, outage_seconds, log, stop=None, **kwargs):
            self.outage_seconds, self.log, self.stop = outage_seconds, log, stop
            self.where = describe_storage(url)
            self._depth = threading.local()
            self._outage_lock = threading.Lock()
            self._outage_since = None  # time.monotonic() of the first failed call, or None
            super().__init__(url, **kwargs)

        def _patiently(self, call, *args, **kwargs):
            if getattr(self._depth, "value", 0):  # an inner call: the outer one retries
                return call(*args, **kwargs)
            delay = 0.5
            while True:
                self._depth.value = 1
                try:
                    result = call(*args, **kwargs)
                except (SQLAlchemyError, StorageInternalError) as error:  # what a database says
                    if not _connection_lost(error):
                        raise
                    self._wait(error, delay)
                    delay = min(2 * delay, 8)
                    continue
                finally:
                    self._depth.value = 0
                with self._outage_lock:
                    if self._outage_since is not None:
                        self.log(f"the {self.where} answers again after "
                                 f"{time.monotonic() - self._outage_since:.0f} s")
                        self._outage_since = None
                return result

        def _wait(self, error, delay):
            cause = error.__cause__ if error.__cause__ is not None else error
            reason = " ".join(str(getattr(cause, "orig", None) or cause).split())
            with self._outage_lock:
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    self.log(f"the {self.where} does not answer ({reason}); trying again "
                             f"for up to {self.outage_seconds} s")
                waited = now - self._outage_since
            if waited >= self.outage_seconds:
                raise StorageUnavailable(
                    f"the study storage, the {self.where}, did not answer for "
                    f"{waited:.0f} s ({reason})") from None
            end = time.monotonic() + min(delay, self.outage_seconds - waited)
            while time.monotonic() < end:  # in steps: Ctrl-C is not kept waiting
                if self.stop is not None and self.stop.requested:
                    raise StorageUnavailable(f"the {self.where} does not answer ({reason})")
                time.sleep(min(0.2, max(end - time.monotonic(), 0)))

    def patient(name):
        method = getattr(optuna.storages.RDBStorage, name)

        def call(self, *args, **kwargs):
            return self._patiently(method.__get__(self), *args, **kwargs)

        call.__name__ = name
        return call

    for name in DATABASE_CALLS:
        setattr(PatientRDBStorage, name, patient(name))
    return PatientRDBStorage


def open_storage(options, log=print, stop=None):
    """The Optuna storage of options["storage"]: a database URL or journal:PATH.

    A database storage keeps heartbeats: a trial whose worker sent none for
    `grace_seconds` is marked FAIL by the next worker that looks, and queued
    again with its parameters (Optuna's RetryHeartbeatStaleTrialCallback). A
    journal file keeps no heartbeats, so it cannot tell a dead worker's trial.
    A database server that goes away is waited for up to
    options["outage_seconds"] (patient_storage_class); `stop`, a
    fastnn.interrupt.StopRequest, cuts that wait short.
    """
    import optuna
    from sqlalchemy.exc import DBAPIError

    url = options["storage"]
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        check_file_storage(path, "journal file")
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    engine_kwargs = check_database(url)
    with warnings.catch_warnings():  # heartbeats and retries are experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        for attempt in range(5):
            try:
                return patient_storage_class()(
                    url, outage_seconds=options.get("outage_seconds", 60), log=log, stop=stop,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=options["heartbeat_seconds"],
                    grace_period=options["grace_seconds"], heartbeat_stale_trial_callback=retry)
            except DBAPIError:
                # Workers starting together race to create a new database's tables.
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
