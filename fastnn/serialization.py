"""Saving models and checkpoints: `.npz` files with a JSON metadata entry, written atomically.

`save(model, path)` / `load(path)` store a classifier (class, constructor
arguments, dtype, parameters, batchnorm running statistics, fastnn
version); `load` rebuilds it on the active backend. `write_npz` / `read_npz`
are the shared atomic writer and checked reader (Solver checkpoints use them).
"""
import json
import os
import zipfile

import numpy as np

from fastnn.backend import get_array_module, to_numpy
from fastnn.files import atomic_write

MODEL_FORMAT = "fastnn-model"
FORMAT_VERSION = 1
_META = "__meta__"


def write_npz(path, arrays, meta):
    """Write `arrays` (name -> array of any backend) and JSON `meta` to `path` atomically.

    The file appears complete or not at all (fastnn.files.atomic_write).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    payload = {name: to_numpy(a) for name, a in arrays.items()}
    payload[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    with atomic_write(path) as fh:
        np.savez(fh, **payload)


def read_npz(path, expected_format):
    """Read a file written by write_npz -> (arrays as numpy, meta dict).

    Raises FileNotFoundError when it is missing and ValueError when it is
    corrupt or of another format, saying which and why.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    try:
        data = np.load(path, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            with data:
                arrays = {name: data[name] for name in data.files}
            meta = json.loads(arrays.pop(_META).tobytes().decode("utf-8"))
    except KeyError:
        raise ValueError(f"{path} is not a fastnn file: it has no metadata entry") from None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is corrupt or truncated and cannot be read "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(data, np.lib.npyio.NpzFile):  # a bare .npy array
        raise ValueError(f"{path} is not a fastnn file: it holds one array, not an .npz archive")
    if not isinstance(meta, dict) or meta.get("format") != expected_format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{path} is incompatible: it holds {found!r}, expected {expected_format!r}")
    if meta.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path} is incompatible: format version {meta['format_version']} is newer "
                         f"than this fastnn reads ({FORMAT_VERSION}); upgrade fastnn")
    return arrays, meta


def model_state(model):
    """Arrays that describe a model: its parameters and batchnorm running statistics."""
    arrays = {f"param/{name}": value for name, value in model.params.items()}
    for i, bn_param in enumerate(getattr(model, "bn_params", [])):
        for key in ("running_mean", "running_var"):
            if bn_param.get(key) is not None:
                arrays[f"bn/{i}/{key}"] = bn_param[key]
    return arrays


def _checked(stored, what, shape, dtype, xp, source):
    """`stored` as an xp array of `dtype`, after checking its shape and that it holds numbers."""
    if stored.shape != tuple(shape):
        raise ValueError(f"{source} is incompatible: {what} has shape {stored.shape} but the "
                         f"model expects {tuple(shape)}")
    if stored.dtype.kind not in "fiu":
        raise ValueError(f"{source} is incompatible: {what} holds {stored.dtype} values, not "
                         "numbers")
    return xp.asarray(stored, dtype=dtype)


def set_model_state(model, arrays, source):
    """Copy arrays from model_state() into `model` (on its backend), checking names and shapes."""
    xp = get_array_module(*model.params.values())
    for name, current in model.params.items():
        stored = arrays.get(f"param/{name}")
        if stored is None:
            raise ValueError(f"{source} is incompatible: it has no parameter {name!r}")
        model.params[name] = _checked(stored, f"parameter {name!r}", current.shape,
                                      current.dtype, xp, source)
    extra = {k[len("param/"):] for k in arrays if k.startswith("param/")} - set(model.params)
    if extra:
        raise ValueError(f"{source} is incompatible: unexpected parameters {sorted(extra)}")
    bn_params = getattr(model, "bn_params", [])
    known = set()
    for i, bn_param in enumerate(bn_params):
        # layer i + 1's statistics have one entry per feature, as its gamma has
        gamma = model.params.get(f"gamma{i + 1}")
        for key in ("running_mean", "running_var"):
            name = f"bn/{i}/{key}"
            known.add(name)
            stored = arrays.get(name)
            if stored is not None:
                shape = stored.shape if gamma is None else gamma.shape
                bn_param[key] = _checked(stored, f"batchnorm statistic {name}", shape,
                                         model.dtype, xp, source)
    extra = sorted(k for k in arrays if k.startswith("bn/") and k not in known)
    if extra:
        raise ValueError(f"{source} is incompatible: unexpected batchnorm statistics {extra}")


def save(model, path):
    """Write `model` to `path` (.npz) atomically."""
    from fastnn import __version__

    if not hasattr(model, "init_args"):
        raise TypeError(f"fastnn.save needs a fastnn classifier, got {type(model).__name__}")
    meta = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
            "class": type(model).__name__, "init_args": model.init_args,
            "dtype": np.dtype(model.dtype).name, "fastnn_version": __version__}
    write_npz(path, model_state(model), meta)


def load(path):
    """Read a model written by `save`; its arrays live on the active backend."""
    from fastnn import classifiers

    arrays, meta = read_npz(path, MODEL_FORMAT)
    cls = getattr(classifiers, str(meta.get("class")), None)
    if cls is None or not isinstance(meta.get("init_args"), dict):
        raise ValueError(f"{path} is incompatible: unknown model class {meta.get('class')!r}")
    # Building the model draws initial weights; keep the user's global RNG untouched.
    rng_state = np.random.get_state()
    try:
        model = cls(**meta["init_args"])
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path} is incompatible: its constructor arguments do not fit "
                         f"{cls.__name__} ({exc})") from exc
    finally:
        np.random.set_state(rng_state)
    set_model_state(model, arrays, path)
    return model
