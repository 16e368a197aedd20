"""Where fastnn's compiled Numba kernels are cached: a user folder, never the installed package.

Numba's `cache=True` writes next to the source file, into
`site-packages/fastnn/kernels/__pycache__`. pip does not know those files, so
`pip uninstall` leaves `site-packages/fastnn/` behind, and Python then imports
that leftover folder as an empty namespace package ahead of a later editable
install (`fastnn` without `set_backend`). So fastnn's kernels are cached in

- `$NUMBA_CACHE_DIR` when the user set it (Numba's own setting), else
- `$XDG_CACHE_HOME/fastnn/numba` (`~/.cache/fastnn/numba`),

each install location in its own subfolder, under a digest of all the kernel
sources (Numba checks only a function's own file, but fastnn's kernels inline
helpers from other files, such as GELU's erf into the fused batchnorm: any
edited kernel file starts a fresh cache), and not cached at all (each
process compiles them again) when that folder cannot be written: a read-only
home, no home. Only fastnn's own dispatchers get this cache (`enable`); Numba's
settings for the user's other jitted code are left alone.
"""
import functools
import hashlib
import os

from numba.core import caching, config


def cache_root():
    """The folder fastnn's compiled kernels go to, or None when there is no usable one.

    `$NUMBA_CACHE_DIR` (as Numba read it), else `$XDG_CACHE_HOME/fastnn/numba`,
    else `~/.cache/fastnn/numba`.
    """
    if config.CACHE_DIR:
        return config.CACHE_DIR
    base = os.environ.get("XDG_CACHE_HOME")
    # The XDG spec says relative paths in this variable are invalid.
    if not base or not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    if not os.path.isabs(base):  # no home at all: "~" stayed as it was
        return None
    return os.path.join(base, "fastnn", "numba")


@functools.lru_cache(maxsize=None)
def sources_digest(folder):
    """16 hex digits naming the contents of every .py file in `folder` (the kernel sources)."""
    digest = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        if name.endswith(".py"):
            with open(os.path.join(folder, name), "rb") as fh:
                digest.update(name.encode() + b"\0" + fh.read() + b"\0")
    return digest.hexdigest()[:16]


class _UserFolderLocator(caching.UserWideCacheLocator):
    """Numba's user-wide locator, pointed at `cache_root()` instead of Numba's own folder.

    Its `from_function` returns None when the folder cannot be made or written.
    """

    def __init__(self, py_func, py_file):
        self._py_file = py_file
        self._lineno = py_func.__code__.co_firstlineno
        root = cache_root()
        if root is None:
            raise OSError("no user cache folder")  # from_function then gives no locator
        self._cache_path = os.path.join(root, self.get_suitable_cache_subpath(py_file),
                                        sources_digest(os.path.dirname(os.path.abspath(py_file))))

    @classmethod
    def from_function(cls, py_func, py_file):
        try:
            return super().from_function(py_func, py_file)
        except OSError:
            return None


class _CacheImpl(caching.CompileResultCacheImpl):
    _locator_classes = [_UserFolderLocator]


class _FunctionCache(caching.FunctionCache):
    _impl_class = _CacheImpl


def enable(dispatcher):
    """Cache `dispatcher`'s compiled code in `cache_root()`; returns it.

    What `cache=True` does (Dispatcher.enable_caching), with fastnn's locator.
    Without a writable folder the dispatcher keeps no disk cache.
    """
    try:
        dispatcher._cache = _FunctionCache(dispatcher.py_func)
    except RuntimeError:  # Numba found no locator: no writable cache folder
        pass
    return dispatcher
