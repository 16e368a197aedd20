"""CIFAR-10 loading, with a download-once cache.

`load_cifar10` returns the raw dataset as uint8 NHWC images and int64 labels;
`get_cifar10_data` returns the classic train/validation/test split as float32
NCHW arrays, mean-subtracted, ready for the models.

The data are read from ``<root>/cifar-10-batches-py`` (the layout of the
official Python archive); ``root`` may also be that folder itself.
``root`` defaults to ``$FASTNN_DATA`` when it is set, else to
``$XDG_CACHE_HOME/fastnn`` (``~/.cache/fastnn``). When the folder is missing,
``<root>/cifar-10-python.tar.gz`` (the official archive, copied there by hand
on a machine without internet) or else the downloaded archive is MD5-checked
and unpacked into place atomically: a failed or interrupted download leaves
nothing behind.

Errors:
    RuntimeError       the download failed (no network, HTTP error, the
                       transfer was cut short).
    ValueError         the archive's MD5 is wrong, the archive is malformed
                       or unsafe, a batch file is truncated or corrupt, or a
                       split asks for more images than there are.
    FileNotFoundError  the data are missing and ``download=False``, or a
                       batch file is missing from an existing folder.
"""
import contextlib
import hashlib
import http.client
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.request

import numpy as np

from fastnn.checks import as_size

__all__ = ["CLASSES", "URL", "MD5", "load_cifar10", "get_cifar10_data",
           "load_CIFAR10", "get_CIFAR10_data", "default_root"]

URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
MD5 = "c58f30108f718f92721af3b95e74349a"
FOLDER = "cifar-10-batches-py"
ARCHIVE = "cifar-10-python.tar.gz"  # the official archive's name
CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
           "dog", "frog", "horse", "ship", "truck")

_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_TEST_FILE = "test_batch"
_CHUNK = 1 << 20
_TIMEOUT_S = 60


def default_root():
    """The data folder used when ``root`` is None.

    ``$FASTNN_DATA`` if set, else ``$XDG_CACHE_HOME/fastnn``, else
    ``~/.cache/fastnn``. Read at each call so that a change to the
    environment after import is honoured.
    """
    env = os.environ.get("FASTNN_DATA")
    if env:
        return os.path.expanduser(env)
    cache = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative paths in these variables are invalid.
    if not cache or not os.path.isabs(cache):
        cache = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fastnn")


def _resolve_root(root):
    return default_root() if root is None else os.path.expanduser(os.fspath(root))


class _DownloadError(Exception):
    """Internal: carries the cause so the caller can add the folder to it."""

    def __init__(self, url, cause):
        super().__init__(url, cause)
        self.url, self.cause = url, cause


def _fetch(url, dest):
    """Stream ``url`` into the open binary file ``dest``; return its MD5 hex.

    Raises _DownloadError when the transfer fails or is cut short; errors
    writing ``dest`` (e.g. disk full) propagate unchanged.
    """
    # URLError, HTTPError, timeouts and resets are all OSError; a malformed
    # or cut-off response can also surface as HTTPException.
    from tqdm.auto import tqdm  # only a download needs it

    net_errors = (OSError, http.client.HTTPException)
    try:
        resp = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
    except net_errors as exc:
        raise _DownloadError(url, exc) from exc
    digest = hashlib.md5()
    received = 0
    with resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        name = url.rstrip("/").rsplit("/", 1)[-1] or "download"
        with tqdm(total=expected, unit="B", unit_scale=True, unit_divisor=1024,
                  desc=name, leave=False) as bar:
            while True:
                try:
                    chunk = resp.read(_CHUNK)
                except net_errors as exc:
                    raise _DownloadError(url, exc) from exc
                if not chunk:
                    break
                dest.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    # http.client returns b"" rather than raising when the peer closes
    # before Content-Length bytes arrived, so a short read must be caught here.
    if expected is not None and received != expected:
        raise _DownloadError(
            url, f"transfer interrupted: received {received} of {expected} bytes")
    return digest.hexdigest()


def _safe_members(tar, archive_desc):
    """The tar's members, after refusing any that could escape the target."""
    members = tar.getmembers()
    for m in members:
        name = m.name
        parts = name.replace("\\", "/").split("/")
        if (os.path.isabs(name) or name.startswith(("/", "\\")) or ".." in parts
                or not (m.isfile() or m.isdir())):
            raise ValueError(
                f"refusing to unpack {archive_desc}: member {name!r} is an "
                "absolute path, climbs out with '..', or is a link/device. "
                "The archive is not the official CIFAR-10 one; check the URL.")
    return members


def _md5_of(path):
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _download(root, url, md5, archive=None):
    """Download (or take the local `archive`), check and unpack into ``root/FOLDER``, atomically."""
    made = []  # the folders made for the download, deepest first
    path = os.path.abspath(root)
    while not os.path.isdir(path):
        made.append(path)
        path = os.path.dirname(path)
    os.makedirs(root, exist_ok=True)
    target = os.path.join(root, FOLDER)
    part = None
    tmpdir = None
    try:
        if archive is None:
            fd, part = tempfile.mkstemp(dir=root, prefix=".cifar-10-python.",
                                        suffix=".tar.gz.part")
            with os.fdopen(fd, "wb") as f:
                actual = _fetch(url, f)
            source, desc = part, f"the archive downloaded from {url}"
        else:
            actual = _md5_of(archive)
            source, desc = archive, f"the archive {archive}"
        if md5 is not None and actual != md5.lower():
            raise ValueError(
                f"{desc} has MD5 {actual}, expected {md5}: it is corrupt or not "
                "the CIFAR-10 archive (cifar-10-python.tar.gz). Nothing was "
                "unpacked; fetch it again and put it in the data folder, or point "
                f"FASTNN_DATA at a folder holding {FOLDER}.")
        # Unpack beside the target (same filesystem) so the final rename is atomic.
        tmpdir = tempfile.mkdtemp(dir=root, prefix=".cifar-10-unpack.")
        try:
            with tarfile.open(source, "r:gz") as tar:
                members = _safe_members(tar, desc)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(tmpdir, members=members, filter="data")
                else:
                    tar.extractall(tmpdir, members=members)
        except (tarfile.TarError, EOFError) as exc:
            raise ValueError(f"cannot unpack {desc}: {exc}") from exc
        unpacked = os.path.join(tmpdir, FOLDER)
        if not os.path.isdir(unpacked):
            raise ValueError(f"{desc} has no {FOLDER}/ folder; it is not the official "
                             "CIFAR-10 Python archive.")
        try:
            os.replace(unpacked, target)
        except OSError:
            # Another process may have finished the same download first.
            if not os.path.isdir(target):
                raise
    finally:
        if part is not None and os.path.exists(part):
            os.remove(part)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
        if made and not os.path.isdir(target):
            # a failed first download leaves no empty data folder behind (rmdir: only if empty)
            for path in made:
                with contextlib.suppress(OSError):
                    os.rmdir(path)


_REPLACE_HINT = (f"Replace it with the file from the official archive ({URL}), or remove the "
                 f"{FOLDER} folder and run again: fastnn then unpacks cifar-10-python.tar.gz "
                 "from the data folder, or downloads it")


def _load_batch(path):
    """Read one pickled batch: images (n, 32, 32, 3) uint8, labels (n,) int64.

    The files come from the MD5-checked archive or a folder the user chose,
    so unpickling them is trusted.
    """
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        # the official files have bytes keys; a batch pickled by Python 3 code has str keys
        data = np.asarray(batch[b"data"] if b"data" in batch else batch["data"])
        labels = np.asarray(batch[b"labels"] if b"labels" in batch else batch["labels"],
                            dtype=np.int64)
    except FileNotFoundError:
        raise FileNotFoundError(
            f"CIFAR-10 batch file {path} is missing: the folder holds an incomplete copy. "
            f"{_REPLACE_HINT}") from None
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError,
            AttributeError, IndexError, ImportError) as exc:
        raise ValueError(
            f"CIFAR-10 batch file {path} is truncated or corrupt "
            f"({type(exc).__name__}: {exc}). {_REPLACE_HINT}") from exc
    if data.dtype.kind in "iu" and data.size and 0 <= data.min() and data.max() <= 255:
        data = data.astype(np.uint8)  # pixel values pickled as wider integers
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8:
        raise ValueError(
            f"CIFAR-10 batch file {path} is corrupt: data has shape "
            f"{data.shape} and dtype {data.dtype}, expected (n, 3072) uint8. {_REPLACE_HINT}")
    if labels.shape != (data.shape[0],):
        raise ValueError(
            f"CIFAR-10 batch file {path} is corrupt: {data.shape[0]} images but "
            f"labels of shape {labels.shape}. {_REPLACE_HINT}")
    # Rows are R, G, B planes of 32x32 each.
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return np.ascontiguousarray(images), labels


def load_cifar10(root=None, download=True, *, url=URL, md5=MD5):
    """Load CIFAR-10 from ``root/cifar-10-batches-py``, downloading it if needed.

    Args:
        root: folder holding (or to hold) ``cifar-10-batches-py``; None means
            ``$FASTNN_DATA``, else ``$XDG_CACHE_HOME/fastnn`` (``~/.cache/fastnn``).
        download: fetch the archive when the folder is missing.
        url, md5: the archive's address and expected MD5 (hex); md5=None
            skips the check.

    Returns:
        X_train (50000, 32, 32, 3) uint8, y_train (50000,) int64,
        X_test (10000, 32, 32, 3) uint8, y_test (10000,) int64.

    Raises:
        FileNotFoundError: the folder is missing and ``download`` is false.
        RuntimeError: the download failed (no network, HTTP error, cut short).
        ValueError: bad MD5, unsafe/malformed archive, corrupt batch file.
    """
    chosen = root is not None or bool(os.environ.get("FASTNN_DATA"))  # not the cache default
    root = _resolve_root(root)
    folder = os.path.join(root, FOLDER)
    if os.path.isfile(root):
        raise NotADirectoryError(f"the CIFAR-10 data folder {root} is a file; point FASTNN_DATA "
                                 f"(or root=, --data) at the folder that holds {FOLDER}")
    if not os.path.isdir(folder) and os.path.isfile(os.path.join(root, _TRAIN_FILES[0])):
        folder = root  # root is the batches folder itself
    archive = os.path.join(root, ARCHIVE)
    if not os.path.isdir(folder) and os.path.isfile(archive):
        _download(root, url, md5, archive=archive)  # the user's copy of the archive
    elif not os.path.isdir(folder):
        if not download:
            missing = "" if os.path.isdir(root) else f" (no such folder: {root} does not exist)"
            raise FileNotFoundError(
                f"CIFAR-10 not found: no folder {folder}{missing}. Pass download=True to "
                f"fetch it, or set FASTNN_DATA (or root=) to a folder that holds "
                f"{FOLDER} or {ARCHIVE}.")
        mistyped = chosen and not os.path.isdir(root)  # a path the user gave, perhaps mistyped
        try:
            _download(root, url, md5)
        except _DownloadError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            if mistyped:
                raise RuntimeError(
                    f"no such folder: the CIFAR-10 data folder {root} does not exist (looked "
                    f"for {folder}), and downloading CIFAR-10 into it failed ({exc.url}: "
                    f"{exc.cause}). Check the path given as --data, FASTNN_DATA or root=; "
                    f"offline, create the folder and copy the official archive {ARCHIVE} (or "
                    f"its unpacked {FOLDER} folder) into it.") from cause
            raise RuntimeError(
                f"could not download CIFAR-10 from {exc.url}: {exc.cause}. "
                f"Looked for the data in {folder}. Without internet, copy the official "
                f"archive {ARCHIVE} (or its unpacked {FOLDER} folder) into {root}, or "
                f"point FASTNN_DATA (--data, root=) at the folder that holds it.") from cause
    xs, ys = [], []
    for name in _TRAIN_FILES:
        x, y = _load_batch(os.path.join(folder, name))
        xs.append(x)
        ys.append(y)
    X_test, y_test = _load_batch(os.path.join(folder, _TEST_FILE))
    return np.concatenate(xs), np.concatenate(ys), X_test, y_test


def get_cifar10_data(num_training=49000, num_validation=1000, num_test=1000,
                     subtract_mean=True, root=None):
    """The classic CIFAR-10 split as float32 NCHW arrays.

    Validation images are the ``num_validation`` training images right after
    the first ``num_training``; test images are the first ``num_test`` of the
    test set. With ``subtract_mean`` the mean image of the selected training
    images is subtracted from all three splits. Downloads like `load_cifar10`.

    Returns:
        dict with X_train (num_training, 3, 32, 32), y_train (num_training,),
        X_val (num_validation, 3, 32, 32), y_val, X_test (num_test, 3, 32, 32),
        y_test; images float32, labels int64.
    """
    # Python ints before any arithmetic: numpy integers would wrap (np.int8(100) + 100 = -56)
    num_training = as_size(num_training, "num_training")
    num_validation = as_size(num_validation, "num_validation")
    num_test = as_size(num_test, "num_test")
    if subtract_mean and num_training == 0:
        raise ValueError("subtract_mean=True needs num_training >= 1 to compute "
                         "the mean image; pass subtract_mean=False or more images.")
    X_all, y_all, X_test_all, y_test_all = load_cifar10(root)
    if num_training + num_validation > len(X_all):
        raise ValueError(
            f"num_training + num_validation = {num_training} + {num_validation} = "
            f"{num_training + num_validation} exceeds the {len(X_all)} training "
            "images available; lower one of them.")
    if num_test > len(X_test_all):
        raise ValueError(f"num_test = {num_test} exceeds the {len(X_test_all)} "
                         "test images available; lower it.")

    def nchw(x):
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2), dtype=np.float32)

    stop = num_training + num_validation
    out = {
        "X_train": nchw(X_all[:num_training]), "y_train": y_all[:num_training].copy(),
        "X_val": nchw(X_all[num_training:stop]), "y_val": y_all[num_training:stop].copy(),
        "X_test": nchw(X_test_all[:num_test]), "y_test": y_test_all[:num_test].copy(),
    }
    if subtract_mean:
        # Accumulate in float64: a float32 sum over ~50k images loses digits.
        mean = out["X_train"].mean(axis=0, dtype=np.float64).astype(np.float32)
        for key in ("X_train", "X_val", "X_test"):
            out[key] -= mean
    return out


load_CIFAR10 = load_cifar10
get_CIFAR10_data = get_cifar10_data
