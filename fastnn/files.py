"""Writing files atomically, and the format version every fastnn file carries.

`atomic_write(path)` is the one writer behind every file fastnn writes
(models, checkpoints, JSON, CSV, PNG): the bytes go to a temporary file with
a unique name in the target folder, are flushed to disk, and the file is
renamed over `path`, so readers (and concurrent writers) see the old file or
the new one, never half of one. The file gets the permissions the umask
allows (0o666 & ~umask), as `open` would give it; the temporary file is
removed when writing fails.

JSON files carry {"format": ..., "format_version": ...}: `write_json` adds
them and `read_json` checks them (files written before versions existed,
without the keys, still load; a newer version is refused in one line).

`lock_folder(folder)` holds a run folder for one process at a time; once
it holds it, it removes the temporaries of writes that a killed process left
there (`remove_temporaries`).
"""
import contextlib
import json
import os
import re
import tempfile


def _umask():
    """The process's umask, read without changing it where Linux allows."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere os.umask can only be read by setting it
    os.umask(mask)
    return mask


_TMP_SUFFIX = ".tmp"
# atomic_write's temporaries: "." + the target's name + "." + mkstemp's 8 random characters
_TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}" + re.escape(_TMP_SUFFIX))


@contextlib.contextmanager
def atomic_write(path, text=False, newline=None):
    """Open a temporary file that replaces `path` when the block ends without error.

    Yields a binary file object (text=True: a UTF-8 text one, `newline` as in
    `open`). The folder must exist. On any error `path` is left as it was; a
    process killed mid-write leaves the temporary (remove_temporaries).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=_TMP_SUFFIX,
                               dir=folder)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes it private; fastnn's files are not
        mode = "w" if text else "wb"
        with os.fdopen(fd, mode, encoding="utf-8" if text else None, newline=newline) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _fsync_folder(folder):
    """Make the rename itself durable (best effort: not every filesystem allows it)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_json(path, obj, file_format, version):
    """Write dict `obj` as JSON to `path` atomically, headed by its format and version."""
    text = json.dumps({"format": file_format, "format_version": version, **obj}, indent=2) + "\n"
    with atomic_write(path, text=True) as fh:
        fh.write(text)


def read_json(path, file_format, version):
    """Read a JSON file written by `write_json` -> the dict without its format keys.

    A file without format keys (written before they existed) is read as
    version 0. Raises ValueError (one line, naming the file) when the file is
    not JSON, of another format, or newer than `version`.
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            obj = json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is not valid JSON ({exc}); restore it or remove the folder") \
            from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a JSON {type(obj).__name__}, not the object fastnn writes")
    found = obj.pop("format", file_format)
    found_version = obj.pop("format_version", 0)
    if found != file_format:
        raise ValueError(f"{path} is a {found!r} file, not {file_format!r}")
    if not isinstance(found_version, int) or found_version > version:
        raise ValueError(f"{path} has format version {found_version!r}, newer than this fastnn "
                         f"reads ({version}); upgrade fastnn")
    return obj


class FolderInUse(OSError):
    """Another process holds the folder's lock (see lock_folder)."""


LOCK_NAME = ".lock"


def remove_temporaries(folder):
    """Delete the temporaries that killed writers of atomic_write left in `folder`; returns
    their names.

    Only safe while no other process writes there: lock_folder calls it once
    it holds the folder.
    """
    removed = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if _TEMPORARY.fullmatch(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.path)
                    removed.append(entry.name)
    return sorted(removed)


@contextlib.contextmanager
def lock_folder(folder):
    """Hold `folder`'s lock for the block, or raise FolderInUse at once if another process has it.

    An advisory flock on folder/.lock: the kernel drops it when the process
    ends, so a crashed run never leaves its folder locked; the temporaries
    such a run left (up to a whole checkpoint) are removed once the lock is
    held. The lock file is created once and never rewritten. Without fcntl
    (Windows) nothing is locked, and nothing removed.
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    fd = os.open(os.path.join(folder, LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderInUse(f"{folder} is in use by another fastnn process; wait for it to "
                              "end (or stop it), then try again") from None
        remove_temporaries(folder)
        yield
    finally:
        os.close(fd)  # closing drops the lock
