"""Run configurations: from a config dict to data, model and Solver.

A run configuration is a flat dict with the keys of DEFAULTS (`fastnn
train` writes it to a run folder's config.json, `fastnn tune` records one
per trial). This module is the one place that knows what the keys mean:

    new_config(given)          a new run: its recipe (models.RECIPES) under the given keys
    recipe_config(name)        a recipe's complete configuration
    complete(config)           a stored config: missing keys get their LEGACY_DEFAULTS value
    check_config(config)       ValueError naming the first bad value or unknown key
    not_applicable(config, keys)  the keys that do nothing under this model / rule
    recorded(config)           the config without keys that do not apply
    load_data / build_model / build_solver / predict / setup_runtime
    solver_options(config)     the Solver keywords of the registry's Solver options
    changed_options(old, new)  what differs between two configs beyond what --resume may change

Which option applies to which model, update rule or switch is listed in
three tables (MODEL_OPTIONS, RULE_OPTIONS, NEEDS); a new model (its options,
recipe, builder and checks) arrives through fastnn.models' registry, a new
rule through fastnn.optim's table.
"""
import json
import numbers
import os
import sys

import numpy as np

from fastnn import models, optim, schedules
from fastnn.classifiers.base import ROLES
from fastnn.inference import DEFAULT_BATCH_SIZE
from fastnn.solver import Solver

# What a key a configuration lacks means: the value it had before the key
# existed. Run folders and trials written before the convnet main job lack the
# conv keys and flip_test (and had the fc defaults); every later one records each
# key that applies to it, so for them this fills only keys that do nothing.
LEGACY_DEFAULTS = {
    "model": "fc", "reg": 0.0, "update_rule": "adam", "learning_rate": 1e-3,
    # the update rules' other hyperparameters (fastnn.optim.RANGES): the rule's default
    **{key: None for key in optim.RANGES if key != "learning_rate"}, "lr_schedule": None,
    "augment": False, "crop_padding": 0, "lr_decay": 0.9, "epochs": 15, "batch_size": 256,
    "backend": "numpy", "seed": 0, "data": None, "num_training": 49000,
    "num_validation": 1000, "num_test": 10000, "threads": None, "print_every": 50,
    "flip_test": False,  # added with the conv models, off
    # added with named recipes: no recipe recorded; tta: as flip_test says (complete() fills
    # it); flips drawn at random, crops padded with zeros, as before
    "recipe": None, "tta": 0, "flip": "random", "padding_mode": "zeros",
    # the models' options (fastnn.models.OPTIONS): the fc ones, then the constructors' defaults
    **{key: option.legacy for key, option in models.OPTIONS.items()},
}
# What a new run of each model trains with unless told otherwise (over LEGACY_DEFAULTS):
# its default recipe in fastnn.models.RECIPES.
RECIPES = {name: models.recipe_of(name) for name in models.MODELS}
DEFAULT_MODEL = models.DEFAULT_MODEL
DEFAULT_RECIPE = models.DEFAULT_RECIPE


def recipe_config(name):
    """The complete configuration of the recipe `name` (models.RECIPES), named in it."""
    if not isinstance(name, str) or name not in models.RECIPES:
        raise ValueError(f"--recipe must be one of {sorted(models.RECIPES)}, got {name!r}")
    recipe = models.recipe(name)
    return {**LEGACY_DEFAULTS, **recipe.settings, "model": recipe.model, "recipe": name}


def defaults_for(model):
    """The complete configuration a new run of `model` gets with no other flags."""
    if not isinstance(model, str) or model not in RECIPES:
        raise ValueError(f"--model must be one of {sorted(RECIPES)}, got {model!r}")
    return recipe_config(models.MODELS[model].recipe)


# `fastnn train` with no flags: the main job
DEFAULTS = recipe_config(DEFAULT_RECIPE)
# Options only some models take (every model takes reg).
MODEL_OPTIONS = {name: model.options for name, model in models.MODELS.items()}
# The optim_config keys each update rule takes besides learning_rate, from
# fastnn.optim's one table (and those it takes only when given: the SGD rules' weight_decay).
RULE_OPTIONS = {rule: tuple(k for k in (*optim.DEFAULTS[rule], *optim.SPECS[rule].optional)
                            if k != "learning_rate")
                for rule in optim.RULES}
# those a rule takes only when given: None (off) is not recorded, as before they existed
_GIVEN_ONLY = {rule: optim.SPECS[rule].optional for rule in optim.RULES}
# Options that do something only when another option is on: option -> (switch, why).
NEEDS = {"crop_padding": ("augment", "--crop-padding shifts the crops of --augment"),
         "flip": ("augment", "--flip says how --augment flips"),
         "padding_mode": ("augment", "--padding-mode fills the crops of --augment")}
# What --resume may change: where and how fast it runs and how long, not what it trains.
RESUMABLE = {"epochs", "backend", "data", "threads", "print_every"}
# Every key a configuration may hold (fastnn tune's trials add model_seed).
KNOWN_KEYS = set(LEGACY_DEFAULTS) | {"model_seed"}

CONFIG_FORMAT, METRICS_FORMAT, FORMAT_VERSION = "fastnn-run-config", "fastnn-run-metrics", 1

# value checks: key -> (low, high, low_open, high_open); None: unbounded on that side
_INT_RANGES = {"epochs": (1, None), "batch_size": (1, None), "num_training": (1, None),
               "num_validation": (1, None), "num_test": (1, None),
               "crop_padding": (0, None), "print_every": (1, None), "threads": (1, None),
               "seed": (0, None), "model_seed": (0, None), "tta": (0, 2),
               **{k: o.bounds for k, o in models.OPTIONS.items() if o.kind == "int"}}
_FLOAT_RANGES = {"reg": (0, None, False), "lr_decay": (0, None, True),
                 # the update rules' hyperparameters, as fastnn.optim checks them (inf: no bound)
                 **{k: (low, None if high == float("inf") else high, low_open, high_open)
                    for k, (low, high, low_open, high_open) in optim.RANGES.items()},
                 **{k: o.bounds for k, o in models.OPTIONS.items() if o.kind == "float"}}
_CHOICES = {"backend": ("numpy", "cupy"),
            "lr_schedule": (None, *(s for s in schedules.SCHEDULES if s != "constant")),
            "flip": ("random", "alternate"), "padding_mode": ("zeros", "reflect"),
            **{k: o.choices for k, o in models.OPTIONS.items() if o.kind == "choice"}}
# Solver keywords from the registry's options (fastnn.models.OPTIONS' `solver`): key -> keyword
SOLVER_OPTIONS = {k: o.solver for k, o in models.OPTIONS.items() if o.solver}
_BOOLEANS = ("augment", "flip_test", *(k for k, o in models.OPTIONS.items() if o.kind == "bool"))
# None means "the rule's default" (the rule options), "all cores" (threads), "the default
# folder" (data); every other key must hold a value of its type.
_OPTIONAL = {"threads", "data", *(k for keys in RULE_OPTIONS.values() for k in keys)}


def complete(config):
    """A stored (or partial) `config` with LEGACY_DEFAULTS for every key it lacks (tta: the
    level its flip_test meant)."""
    full = {**LEGACY_DEFAULTS, **config}
    if "tta" not in config:
        full["tta"] = 1 if full["flip_test"] is True else 0
    return full


def tta_alias(given):
    """`given` with --flip-test as --tta 1 (--no-flip-test: 0) and --tta's flip_test (tta >= 1),
    so the old flag and the new one say the same; check_config refuses the two disagreeing."""
    if "flip_test" in given and "tta" not in given:
        return {**given, "tta": 1 if given["flip_test"] is True else 0}
    if "tta" in given and "flip_test" not in given:
        return {**given, "flip_test": given["tta"] not in (0, False)}
    return given


def check_tta(config):
    """ValueError when config's tta and flip_test (after tta_alias) say different things."""
    if (config["tta"] >= 1) != config["flip_test"]:
        raise ValueError(f"--tta {config['tta']} and --{'' if config['flip_test'] else 'no-'}"
                         "flip-test disagree (--flip-test is --tta 1, --no-flip-test --tta 0); "
                         "give one of them")


def new_config(given):
    """A new run's configuration: its recipe under `given`; the recipe is given["recipe"], else
    its model's (given["model"]), else the main job's. ValueError when the two disagree."""
    given = tta_alias({k: v for k, v in given.items() if not (k == "recipe" and v is None)})
    if "recipe" not in given and "model" not in given:
        given = {**given, "recipe": DEFAULT_RECIPE}
    if "recipe" not in given:
        return {**defaults_for(given["model"]), **given}
    base = recipe_config(given["recipe"])
    model = given.get("model", base["model"])
    if model != base["model"]:
        defaults_for(model)  # an unknown model is named as such
        raise ValueError(f"--recipe {given['recipe']} trains --model {base['model']}, not "
                         f"{model}: drop --model, or pick a recipe of {model} "
                         f"({', '.join(models.recipes_of(model))})")
    return {**base, **given}


def option_name(key):
    """The command-line flag of a config key: learning_rate -> --lr."""
    return "--lr" if key == "learning_rate" else "--" + key.replace("_", "-")


def not_applicable(config, keys):
    """{key: reason} for the keys (of `keys`) that do nothing under `config`'s model and rule."""
    config = complete(config)
    model_keys = {k for keys_ in MODEL_OPTIONS.values() for k in keys_}
    rule_keys = {k for keys_ in RULE_OPTIONS.values() for k in keys_}
    reasons = {}
    for key in keys:
        if key in model_keys and key not in MODEL_OPTIONS.get(config["model"], ()):
            takers = [m for m, ks in MODEL_OPTIONS.items() if key in ks]
            reasons[key] = f"it applies to --model {'/'.join(takers)}, not {config['model']}"
        elif key in rule_keys and key not in RULE_OPTIONS.get(config["update_rule"], ()):
            takers = [r for r, ks in RULE_OPTIONS.items() if key in ks]
            reasons[key] = (f"it applies to --update-rule {'/'.join(takers)}, "
                            f"not {config['update_rule']}")
        elif key in NEEDS and not config[NEEDS[key][0]]:
            switch, why = NEEDS[key]
            reasons[key] = f"{option_name(switch)} is off ({why})"
    return reasons


def recorded(config):
    """`config` without the keys that do not apply: what a run folder or a trial records."""
    skip = not_applicable(config, config)
    given_only = _GIVEN_ONLY.get(config.get("update_rule"), ())
    return {k: v for k, v in config.items()
            if k not in skip and not (v is None and k in given_only)}


def _check_number(key, value, bounds, integer):
    low, high, low_open, high_open = (*bounds, False, False)[:4]
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ValueError(f"{option_name(key)} must be {'an integer' if integer else 'a number'}, "
                         f"got {value!r}")
    if not np.isfinite(value) or (low is not None and (value <= low if low_open else value < low)) \
            or (high is not None and (value >= high if high_open else value > high)):
        if high is None:
            span = f"{'>' if low_open else '>='} {low}"
        else:
            span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{option_name(key)} must be {span}, got {value!r}")


def check_config(config):
    """Raise ValueError naming the first key of `config` (complete or not) that is unknown, or
    whose value is of the wrong type or out of range (a hand-edited config.json as a flag)."""
    unknown = sorted(set(config) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"keys fastnn train does not know: {unknown}; remove them")
    config = complete(config)
    for key, choices in (("model", MODEL_OPTIONS), ("update_rule", RULE_OPTIONS)):
        if not isinstance(config[key], str) or config[key] not in choices:
            raise ValueError(f"{option_name(key)} must be one of {sorted(choices)}, "
                             f"got {config[key]!r}")
    for key, choices in _CHOICES.items():
        if config[key] not in choices:
            raise ValueError(f"{option_name(key)} must be one of {list(choices)}, "
                             f"got {config[key]!r}")
    if config["recipe"] is not None and not isinstance(config["recipe"], str):
        raise ValueError(f"--recipe must be a recipe's name, got {config['recipe']!r}")
    if config["data"] is not None and not isinstance(config["data"], str):
        raise ValueError(f"--data must be a folder (a path), got {config['data']!r}")
    skip = not_applicable(config, config)
    for key in _BOOLEANS:
        if key not in skip and not isinstance(config[key], bool):
            raise ValueError(f"{option_name(key)} must be true or false, got {config[key]!r}")
    for ranges, integer in ((_INT_RANGES, True), (_FLOAT_RANGES, False)):
        for key, bounds in ranges.items():
            if key in config and key not in skip and not (config[key] is None
                                                          and key in _OPTIONAL):
                _check_number(key, config[key], bounds, integer)
    check_tta(config)
    model_check = models.MODELS[config["model"]].check
    if model_check is not None:
        model_check(config)
    if config["augment"] and config["crop_padding"] >= 32:
        raise ValueError(f"--crop-padding must be below the image size 32, "
                         f"got {config['crop_padding']}")
    if config["num_training"] + config["num_validation"] > 50000:
        raise ValueError(f"--num-training + --num-validation must be at most CIFAR-10's 50000 "
                         f"training images, got {config['num_training']} + "
                         f"{config['num_validation']}")
    if config["num_test"] > 10000:
        raise ValueError(f"--num-test must be at most CIFAR-10's 10000 test images, "
                         f"got {config['num_test']}")


def load_data(config, data_root=None):
    """The CIFAR-10 split `config` asks for (fastnn.data.get_cifar10_data's dict)."""
    from fastnn.data import get_cifar10_data

    config = complete(config)
    return get_cifar10_data(num_training=config["num_training"],
                            num_validation=config["num_validation"],
                            num_test=config["num_test"], root=data_root or config["data"])


def build_model(config, data=None):
    """A new, initialised classifier for CIFAR-10 images (3x32x32, 10 classes).

    data: the run's data (load_data's dict): a model that starts from its training images
    (models.Model.init: the convnet's whitening stem) gets them here (a resumed run's
    checkpoint then replaces what they set); None: it stays as drawn."""
    config = complete(config)
    entry = models.MODELS[config["model"]]
    model = entry.build(config)
    if data is not None and entry.init is not None:
        entry.init(model, config, data)
    return model


def optim_config(config):
    """The Solver's optim_config: the learning rate and the rule's options that were set."""
    config = complete(config)
    options = {"learning_rate": config["learning_rate"]}
    options.update({k: config[k] for k in RULE_OPTIONS[config["update_rule"]]
                    if config.get(k) is not None})
    return options


def augment_options(config):
    """The Solver's `augment` option from a run configuration (None: no augmentation)."""
    if not config.get("augment"):
        return None
    # flip: random (True) or alternating; padding_mode: what the crops shift in
    return {"flip": "alternate" if config.get("flip") == "alternate" else True,
            "crop_padding": int(config.get("crop_padding") or 0),
            "padding_mode": config.get("padding_mode") or LEGACY_DEFAULTS["padding_mode"]}


def _multipliers(config):
    """The Solver's lr_multipliers, {role: m}, from the role options (ROLE_lr_multiplier) whose
    value is not 1 (None: none)."""
    multipliers = {key[:-len("_lr_multiplier")]: float(config[key])
                   for key, word in SOLVER_OPTIONS.items()
                   if word == "lr_multipliers" and config[key] != 1.0}
    return multipliers or None


# The Solver options (models.OPTIONS' `solver`) whose config value is simpler than the Solver
# keyword's: key -> (complete config -> the keyword's value); the legacy value gives None (off)
_SOLVER_VALUES = {
    "shift_lr_multiplier": _multipliers,
    "bias_lr_multiplier": _multipliers,
    "decay_all_roles": lambda c: ROLES if c["decay_all_roles"] else None,
    "lookahead": lambda c: bool(c["lookahead"]) or None,
    # only the cycles take it (another schedule ignores the recipe's value)
    "lr_min_iterations": lambda c: (
        {"min_iterations": c["lr_min_iterations"]} if c["lr_min_iterations"] and
        "min_iterations" in schedules.DEFAULTS[c["lr_schedule"] or "constant"] else None),
    # the convnet's whitening stem's bias (b1) gets no steps after that many epochs
    "stem_bias_epochs": lambda c: ({"b1": c["stem_bias_epochs"]} if c["stem_bias_epochs"]
                                   else None),
}


def solver_options(config):
    """The Solver keywords of the registry's Solver options (models.OPTIONS' `solver`) from a
    run configuration."""
    config = complete(config)
    return {word: _SOLVER_VALUES[key](config) if key in _SOLVER_VALUES else config[key]
            for key, word in SOLVER_OPTIONS.items()}


def changed_options(old, new):
    """{key: (old value, new value)} for the keys beyond RESUMABLE where two configs differ."""
    old, new = complete(recorded(old)), complete(recorded(new))
    # the recipe's name only names the settings, which are compared one by one (a config.json
    # from before recipes had names lacks it)
    return {k: (old.get(k), new.get(k)) for k in sorted((set(old) | set(new)) - RESUMABLE
                                                         - {"recipe"})
            if old.get(k) != new.get(k)}


class RunSolver(Solver):
    """A Solver whose checkpoints record the run configuration they were trained under
    (`run_config`); load_checkpoint refuses a checkpoint trained under another one.

    So a resumed run trains as it started, whatever was edited in its config.json
    since; checkpoints written before they recorded it are checked for the one thing
    they show, the number of iterations an epoch takes.
    """

    run_config = None

    def _save_extra(self, arrays, meta):
        meta["run_config"] = self.run_config

    def _load_extra(self, arrays, meta, path):
        stored, per_epoch = meta.get("run_config"), self.iterations_per_epoch
        changed = changed_options(stored, self.run_config) if stored is not None else {}
        if changed:
            raise ValueError(f"{path} was trained with " + ", ".join(
                f"{option_name(k)} {json.dumps(old)}, not {json.dumps(new)}"
                for k, (old, new) in changed.items())
                + "; a resumed run may change only "
                f"{', '.join(option_name(k) for k in sorted(RESUMABLE))}")
        epoch, t = int(meta["epoch"]), int(meta["t"])
        if not epoch * per_epoch <= t < (epoch + 1) * per_epoch:
            raise ValueError(f"{path} was trained with another --batch-size or --num-training: "
                             f"it stopped at iteration {t}, after epoch {epoch}, but "
                             f"{per_epoch} iterations make an epoch now")


def build_solver(model, data, config, out_dir=None, verbose=True):
    """A Solver (RunSolver) for `model` as `config` says; checkpoints go to
    out_dir/checkpoint.npz and record `config`."""
    config = complete(config)
    solver = RunSolver(model, data, update_rule=config["update_rule"],
                       optim_config=optim_config(config),
                       lr_decay=config["lr_decay"], batch_size=config["batch_size"],
                       num_epochs=config["epochs"], print_every=config["print_every"],
                       verbose=verbose, progress=verbose, seed=config["seed"],
                       lr_schedule=config["lr_schedule"], augment=augment_options(config),
                       **solver_options(config),
                       checkpoint_path=out_dir and os.path.join(out_dir, "checkpoint.npz"))
    solver.run_config = recorded(config)
    return solver


def predict(model, X, batch_size=DEFAULT_BATCH_SIZE, flip=False, tta=None):
    """Predicted labels (N,) on the model's backend for X (N, ...), in batches
    (fastnn.inference.predict; flip: average each image's scores with its mirror's, as tta=1;
    tta 0/1/2: the test-time augmentation level)."""
    from fastnn.inference import predict as batched_predict

    return batched_predict(model, X, batch_size, flip, tta)


def setup_runtime(config):
    """Make config's backend active and apply its thread count (None: leave as is); a backend
    without its fast kernels (a broken Numba) is said on stderr, with what to do."""
    import fastnn
    from fastnn.kernels import registry

    backend = config.get("backend", DEFAULTS["backend"])
    fastnn.set_backend(backend)
    if backend in registry.unavailable:
        print(f"fastnn: {registry.unavailable[backend]}", file=sys.stderr)
    if config.get("threads"):
        fastnn.set_num_threads(config["threads"])
