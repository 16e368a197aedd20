"""Saving models and checkpoints: `.npz` files with a JSON metadata entry, written atomically.

`save(model, path)` / `load(path)` store a classifier (class, constructor
arguments, dtype, parameters, the arrays of its `buffers` (not trained), the
running statistics of its `norm_params` layers, fastnn version); `load`
rebuilds it on the active backend.
`write_npz` / `read_npz` are the shared atomic writer and checked reader
(Solver checkpoints use them). Every file carries its format's name and
version; a newer version than this fastnn knows is refused, older ones are
read (model files of version 1 kept running statistics as `bn/{i}/...`,
the layer of gamma{i+1}; they load as norm layer str(i + 1)).
"""
import json
import numbers
import os
import zipfile

import numpy as np

from fastnn.backend import get_array_module, to_numpy
from fastnn.classifiers.base import norm_params
from fastnn.files import atomic_write

MODEL_FORMAT = "fastnn-model"
CHECKPOINT_FORMAT = "fastnn-checkpoint"
CHECKPOINT_VERSION = 2  # 2: running statistics by norm layer key (model/norm/..., best_norm/...)
FORMAT_VERSION = 2  # of model files; 2: running statistics as norm/{layer key}/...
_META = "__meta__"
STATISTICS = ("running_mean", "running_var")
# The constructor arguments that size a model's arrays (fastnn's classifiers)
SIZE_ARGS = ("input_dim", "hidden_dim", "hidden_dims", "num_classes", "num_filters",
             "filter_size", "widths", "stem_width")


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


def read_npz(path, expected_format, version=FORMAT_VERSION):
    """Read a file written by write_npz -> (arrays as numpy, meta dict).

    Raises FileNotFoundError when it is missing and ValueError when it is
    corrupt, of another format, or of a format version newer than
    `version` (the newest this fastnn writes), saying which and why.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no such file: {path}")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a folder, not a fastnn file; give the .npz file in it "
                                "(a run folder's model.npz, for example)")
    with open(path, "rb") as fh:
        magic = fh.read(6)
    if not magic:
        raise ValueError(f"{path} is empty: corrupt or truncated (written by a process that was "
                         "stopped?)")
    if not magic.startswith((b"PK", b"\x93NUMPY")):  # neither an .npz (zip) nor an .npy
        raise ValueError(f"{path} is not a fastnn .npz file: corrupt, or another kind of file "
                         f"(it starts with {magic!r})")
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
    found = meta.get("format_version")
    if not isinstance(found, int) or not 1 <= found <= version:
        raise ValueError(f"{path} is incompatible: {expected_format} format version {found!r}; "
                         f"this fastnn reads versions 1 to {version} (a newer fastnn wrote it? "
                         "upgrade fastnn)")
    return arrays, meta


def model_state(model):
    """Arrays that describe a model: its parameters and the running statistics of its norms."""
    arrays = {f"param/{name}": value for name, value in model.params.items()}
    # arrays a model computes with but does not train (ConvNet's whitening filters)
    arrays.update({f"buffer/{name}": value
                   for name, value in getattr(model, "buffers", {}).items()})
    for key, bn_param in norm_params(model).items():
        for stat in STATISTICS:
            if bn_param.get(stat) is not None:
                arrays[f"norm/{key}/{stat}"] = bn_param[stat]
    return arrays


def upgrade_model_state(arrays, version):
    """model_state() arrays of a file of format `version` in the current layout."""
    if version >= 2:
        return arrays
    # version 1: bn/{i}/{stat} held the statistics of the layer of gamma{i+1}
    upgraded = {}
    for name, value in arrays.items():
        parts = name.split("/")
        if parts[0] == "bn" and len(parts) == 3 and parts[1].isdigit():
            name = f"norm/{int(parts[1]) + 1}/{parts[2]}"
        upgraded[name] = value
    return upgraded


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
        # into the array itself: params are never rebound (one buffer may back them all)
        current[...] = _checked(stored, f"parameter {name!r}", current.shape, current.dtype,
                                xp, source)
    extra = {k[len("param/"):] for k in arrays if k.startswith("param/")} - set(model.params)
    if extra:
        raise ValueError(f"{source} is incompatible: unexpected parameters {sorted(extra)}")
    known = set()
    for name, current in getattr(model, "buffers", {}).items():
        known.add(f"buffer/{name}")
        stored = arrays.get(f"buffer/{name}")
        if stored is None:
            raise ValueError(f"{source} is incompatible: it has no buffer {name!r}")
        current[...] = _checked(stored, f"buffer {name!r}", current.shape, current.dtype, xp,
                                source)
    for key, bn_param in norm_params(model).items():
        for stat in STATISTICS:
            name = f"norm/{key}/{stat}"
            known.add(name)
            stored = arrays.get(name)
            if stored is not None:
                current = bn_param.get(stat)
                shape = stored.shape if current is None else current.shape
                bn_param[stat] = _checked(stored, f"running statistic {name}", shape,
                                          model.dtype, xp, source)
    extra = sorted(k for k in arrays if not k.startswith("param/") and k not in known)
    if extra:
        raise ValueError(f"{source} is incompatible: unexpected running statistics or buffers "
                         f"{extra}")


def write_checkpoint(path, arrays, meta):
    """Write a checkpoint (the layout read_checkpoint describes) atomically, format and version
    added to `meta`."""
    write_npz(path, arrays, {"format": CHECKPOINT_FORMAT, "format_version": CHECKPOINT_VERSION,
                             **meta})


def read_checkpoint(path):
    """(arrays, meta) of a checkpoint (fastnn.solver writes them), in the current layout.

    Layout: model/... (model_state), best/{param}, best_norm/{key}/{stat},
    optim/{param}/{state}, epoch_order; meta holds the format, version and
    the solver's scalars (epoch, t, histories, generator states, ...).
    """
    arrays, meta = read_npz(path, CHECKPOINT_FORMAT, CHECKPOINT_VERSION)
    if meta["format_version"] >= 2:
        return arrays, meta
    # version 1: model/bn/{i}/... and best_bn/{i}/... for the layer of gamma{i+1}
    upgraded = {}
    for name, value in arrays.items():
        if name.startswith("best_bn/"):
            i, stat = name[len("best_bn/"):].split("/", 1)
            name = f"best_norm/{int(i) + 1}/{stat}"
        upgraded[name] = value
    model = upgrade_model_state({k[len("model/"):]: v for k, v in upgraded.items()
                                 if k.startswith("model/")}, 1)
    upgraded = {k: v for k, v in upgraded.items() if not k.startswith("model/")}
    upgraded.update({f"model/{k}": v for k, v in model.items()})
    return upgraded, meta


def save(model, path):
    """Write `model` to `path` (.npz) atomically."""
    from fastnn import __version__

    if not hasattr(model, "init_args"):
        raise TypeError(f"fastnn.save needs a fastnn classifier, got {type(model).__name__}")
    init_args = dict(model.init_args)
    if "reg" in init_args and hasattr(model, "reg"):  # classic code sets model.reg later
        init_args["reg"] = float(model.reg)
    meta = {"format": MODEL_FORMAT, "format_version": FORMAT_VERSION,
            "class": type(model).__name__, "init_args": init_args,
            "dtype": np.dtype(model.dtype).name, "fastnn_version": __version__,
            # drawn at construction when the model was built without a seed
            "dropout_seed": getattr(model, "dropout_param", {}).get("seed")}
    write_npz(path, model_state(model), meta)


def _check_header(meta, arrays, path):
    """ValueError naming the field when `meta`'s init_args or dropout_seed cannot describe
    `arrays`: checked before the model is built, so a damaged or edited header never makes
    load allocate more than the file holds."""
    stored = sum(a.size for a in arrays.values())
    for key in SIZE_ARGS:
        value = meta["init_args"].get(key)
        for size in value if isinstance(value, (list, tuple)) else [value]:
            # a size larger than all the numbers stored cannot describe them
            if isinstance(size, numbers.Real) and not isinstance(size, bool) \
                    and not size <= stored:
                raise ValueError(f"{path} is incompatible: its init_args {key} {value!r} "
                                 f"exceed the {stored} numbers its arrays hold (a damaged or "
                                 "edited file; save the model again)")
    seed = meta.get("dropout_seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"{path} is incompatible: its dropout_seed must be a non-negative "
                         f"integer, got {seed!r} (a damaged or edited file)")


def load(path):
    """Read a model written by `save`; its arrays live on the active backend."""
    from fastnn import classifiers

    arrays, meta = read_npz(path, MODEL_FORMAT)
    arrays = upgrade_model_state(arrays, meta["format_version"])
    cls = getattr(classifiers, str(meta.get("class")), None)
    if cls is None or not isinstance(meta.get("init_args"), dict):
        raise ValueError(f"{path} is incompatible: unknown model class {meta.get('class')!r}")
    _check_header(meta, arrays, path)
    # Building the model draws initial weights; keep the user's global RNG untouched.
    rng_state = np.random.get_state()
    try:
        model = cls(**meta["init_args"])
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"{path} is incompatible: its constructor arguments do not fit "
                         f"{cls.__name__} ({exc})") from exc
    except MemoryError:  # sizes within the bound above can still multiply past the memory
        raise ValueError(f"{path} is incompatible: its init_args {meta['init_args']} ask for "
                         "more memory than there is (a damaged or edited file?)") from None
    finally:
        np.random.set_state(rng_state)
    set_model_state(model, arrays, path)
    if meta.get("dropout_seed") is not None and hasattr(model, "dropout_param"):
        model.dropout_param["seed"] = meta["dropout_seed"]
    return model
