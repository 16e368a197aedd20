"""What the fastnn commands share: their two kinds of error, and run folders claimed safely."""
import contextlib
import datetime
import os
import shutil
import time

from fastnn.files import FolderInUse, lock_folder

START_TIME = time.perf_counter()  # budgets count from the command's start
TUNE_BEST_FORMAT = "fastnn-tune-best"  # fastnn.tune's best.json (kept here: no import of tune)


class UsageError(Exception):
    """A flag or its value is wrong: one line, exit status 2."""


class CommandError(Exception):
    """A predictable failure (a folder, the data, a file): one line, exit status 1."""


def one_line(exc):
    """An exception's message on one line (OSError: 'reason: file')."""
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, FolderInUse):
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    return " ".join(text.split())


@contextlib.contextmanager
def failing_as(error, kinds, prefix="", hint=""):
    """Turn the exceptions `kinds` raised in the block into `error` (one line)."""
    try:
        yield
    except kinds as exc:
        raise error(prefix + one_line(exc) + hint) from exc


def new_run_dir():
    """Create and return a new folder runs/YYYYmmdd-HHMMSS[-N] (never one another run took)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for suffix in range(1, 10**6):
        path = os.path.join("runs", stamp if suffix == 1 else f"{stamp}-{suffix}")
        try:
            os.makedirs(path)
            return path
        except FileExistsError:
            continue
    raise CommandError("no free run folder name under runs/")


def check_new_folder(out_dir, holds_run, resume="fastnn train --resume {}"):
    """Raise CommandError when `out_dir` cannot become a new run folder; nothing is created.

    holds_run(folder) says whether an existing folder already holds a run;
    `resume` is the command that continues one.
    """
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise CommandError(f"--out {out_dir} is a file, not a folder; choose another --out")
    if os.path.isdir(out_dir):
        if holds_run(out_dir):
            raise CommandError(f"{out_dir} already holds a run; continue it with "
                               f"`{resume.format(out_dir)}`, or choose another --out "
                               "(nothing was overwritten)")
        existing = out_dir
    else:
        existing = os.path.dirname(os.path.abspath(out_dir))
        while not os.path.exists(existing):
            existing = os.path.dirname(existing)
        if not os.path.isdir(existing):
            raise CommandError(f"cannot create --out {out_dir}: {existing} is a file, not a "
                               "folder; choose another --out")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CommandError(f"cannot write in {existing} ({unwritable_reason(existing)}); "
                           "choose another --out")


def unwritable_reason(folder):
    """Why os.access says `folder` is not writable: a read-only mount, or its permissions."""
    try:
        if os.statvfs(folder).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except (OSError, AttributeError):  # AttributeError: no statvfs (Windows)
        pass
    return "permission denied"


@contextlib.contextmanager
def claimed_folder(out_dir, holds_run, resume="fastnn train --resume {}", has_results=None):
    """Create (if needed) and lock a new run folder for the block; yields its path.

    Refused when another process holds it or when it holds a run by now (a
    process that started at the same instant won). A folder made here is
    removed again when the block fails before it holds a run (before
    `has_results(folder)`, when given: holds_run's test at the start may differ).
    """
    has_results = has_results or holds_run
    created = False
    try:
        if out_dir is None:
            out_dir, created = new_run_dir(), True
        elif not os.path.isdir(out_dir):
            os.makedirs(out_dir)
            created = True
    except FileExistsError:
        pass  # another process made it first: the lock decides
    except OSError as exc:
        raise CommandError(f"cannot create the run folder {out_dir or 'under runs/'}: "
                           f"{one_line(exc)}") from exc
    with failing_as(CommandError, FolderInUse), lock_folder(out_dir):
        try:
            if holds_run(out_dir):
                raise CommandError(f"{out_dir} already holds a run (another process started "
                                   f"it); continue it with `{resume.format(out_dir)}`, "
                                   "or choose another --out")
            yield out_dir
        except BaseException:
            if created and not has_results(out_dir):  # only while holding the lock
                shutil.rmtree(out_dir, ignore_errors=True)
            raise
