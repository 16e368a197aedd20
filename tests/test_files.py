"""fastnn.files: atomic writes (unique temporary, umask, nothing left on failure) and versioned JSON."""
import json
import os
import threading

import pytest

from fastnn.files import atomic_write, read_json, write_json


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with atomic_write(path) as fh:
        fh.write(b"new")
        assert path.read_bytes() == b"old"  # readers see the old file until the rename
    assert path.read_bytes() == b"new"
    assert os.listdir(tmp_path) == ["a.bin"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk"):
        with atomic_write(path, text=True) as fh:
            fh.write("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_the_umask_decides_the_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        with atomic_write(tmp_path / "f") as fh:
            fh.write(b"x")
    finally:
        os.umask(old)
    assert (tmp_path / "f").stat().st_mode & 0o777 == 0o666 & ~umask


def test_concurrent_writers_of_one_file_never_collide(tmp_path):
    path = tmp_path / "shared.json"
    errors = []

    def writer(i):
        try:
            for _ in range(20):
                write_json(path, {"writer": i, "pad": "x" * 10000}, "test", 1)
        except Exception as exc:  # noqa: BLE001 - the test reports any
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert read_json(path, "test", 1)["writer"] in range(4)  # one whole file, not a mix
    assert os.listdir(tmp_path) == ["shared.json"]


def test_json_carries_its_format_and_version(tmp_path):
    path = tmp_path / "c.json"
    write_json(path, {"epochs": 3}, "fastnn-run-config", 1)
    assert json.loads(path.read_text()) == {"format": "fastnn-run-config", "format_version": 1,
                                            "epochs": 3}
    assert read_json(path, "fastnn-run-config", 1) == {"epochs": 3}


def test_files_without_a_version_still_load(tmp_path):
    path = tmp_path / "old.json"
    path.write_text('{"epochs": 3}')
    assert read_json(path, "fastnn-run-config", 1) == {"epochs": 3}


def test_newer_other_and_broken_files_are_refused_in_one_line(tmp_path):
    path = tmp_path / "x.json"
    path.write_text('{"format": "fastnn-run-config", "format_version": 2}')
    with pytest.raises(ValueError, match=r"format version 2, newer than this fastnn reads \(1\)"):
        read_json(path, "fastnn-run-config", 1)
    path.write_text('{"format": "fastnn-tune-best", "format_version": 1}')
    with pytest.raises(ValueError, match="'fastnn-tune-best' file, not 'fastnn-run-config'"):
        read_json(path, "fastnn-run-config", 1)
    path.write_text('{"epochs": ')
    with pytest.raises(ValueError, match="not valid JSON") as info:
        read_json(path, "fastnn-run-config", 1)
    assert "\n" not in str(info.value)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="JSON list"):
        read_json(path, "fastnn-run-config", 1)


def test_a_folder_lock_is_held_once_and_freed_when_its_process_dies(tmp_path):
    import signal
    import subprocess
    import sys

    from fastnn.files import FolderInUse, lock_folder

    with lock_folder(tmp_path):
        with pytest.raises(FolderInUse, match="in use by another fastnn process"):
            with lock_folder(tmp_path):
                pass
    with lock_folder(tmp_path):  # released when the block ended
        pass
    # a process that dies holding the lock (kill -9: no cleanup runs) leaves it free
    code = ("import os, signal, sys; from fastnn.files import lock_folder\n"
            "with lock_folder(sys.argv[1]):\n"
            "    print('held', flush=True); os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL and proc.stdout == "held\n"
    with lock_folder(tmp_path):
        pass
    assert os.listdir(tmp_path) == [".lock"]


def test_locking_a_folder_removes_the_temporaries_of_a_killed_writer(tmp_path):
    """A process killed mid-write (kill -9) leaves atomic_write's temporary; the next process
    to lock the folder removes it, and nothing else."""
    import signal
    import subprocess
    import sys

    from fastnn.files import lock_folder

    code = ("import os, signal, sys; from fastnn.files import atomic_write, lock_folder\n"
            "with lock_folder(sys.argv[1]):\n"
            "    for name in ('checkpoint.npz', 'loss.png'):\n"
            "        with atomic_write(os.path.join(sys.argv[1], name)) as fh:\n"
            "            fh.write(b'x' * 4096)\n"
            "            if name == 'loss.png': os.kill(os.getpid(), signal.SIGKILL)\n")
    (tmp_path / "checkpoint.npz").write_bytes(b"old")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = [name for name in os.listdir(tmp_path) if name.endswith(".tmp")]
    assert len(left) == 1 and left[0].startswith(".loss.png."), left
    mine = ["notes.tmp", ".notes.tmp", "data.abcdefgh.tmp"]  # not atomic_write's names
    for name in mine:
        (tmp_path / name).write_text("keep")
    (tmp_path / ".dir.abcdefgh.tmp").mkdir()
    with lock_folder(tmp_path):
        assert sorted(os.listdir(tmp_path)) == sorted([".lock", "checkpoint.npz",
                                                       ".dir.abcdefgh.tmp", *mine])
    assert (tmp_path / "checkpoint.npz").read_bytes() == b"x" * 4096
