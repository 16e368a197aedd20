"""The model registry: what `fastnn train`, `fastnn tune` and fastnn.runs know of each model.

One entry per model in MODELS (a `Model`): how to build it from a run
configuration, the configuration keys (options) it takes, its default recipe,
the checks of its options beyond their ranges, and, when `fastnn tune` can
search it, its search (a `Search`: the space Optuna draws from, the first
trial, the defaults of the tune flags). A model's options are declared once
in OPTIONS (their `fastnn train` flag, their range, their value in a
configuration written before they existed); RECIPES names the settings a new
run trains with. fastnn.runs, fastnn.cli and fastnn.tune read these tables
and name no model, so a new model, option or recipe is an entry here (and its
class in fastnn.classifiers).
"""
import numbers
from typing import Callable, NamedTuple

import numpy as np

IMAGE_SHAPE, NUM_CLASSES = (3, 32, 32), 10  # CIFAR-10


class Option(NamedTuple):
    """A configuration key that only some models take (or, with `solver`, a Solver option)."""
    kind: str          # "int", "float", "bool", "ints" (one or more ints) or "choice"
    legacy: object     # its value in a configuration written before it existed (off)
    help: str          # its `fastnn train` flag's help
    bounds: tuple = None  # (low, high[, low_open, high_open]) for runs.check_config; None: high
    choices: tuple = None  # kind "choice": its values
    solver: str = None  # the Solver keyword it sets (runs.solver_options: every model takes it,
                        # unless models list it as theirs); None: a model option, read by the
                        # models' builders


OPTIONS = {
    "widths": Option("ints", [32, 64, 128], "convnet channels of each group"),
    "stem_width": Option("int", 24, "convnet channels of the stem", (1, None)),
    "label_smoothing": Option(
        "float", 0.0, "convnet: mix the one-hot targets with the uniform distribution",
        (0, 1, False, True)),
    "hidden_dims": Option("ints", [1024, 512, 256], "fc hidden sizes (1024 512 256)"),
    "hidden_dim": Option("int", 100, "two_layer / three_layer_conv hidden size (100 / 500)",
                         (1, None)),
    "num_filters": Option("int", 32, "three_layer_conv filters (32)", (1, None)),
    "filter_size": Option("int", 7, "three_layer_conv filter size (7)", (1, None)),
    "batchnorm": Option("bool", True, "fc batchnorm (on)"),
    "dropout": Option("float", 0.3, "fc dropout: probability of dropping a unit (0.3)",
                      (0, 1, False, True)),
    "weight_scale": Option("float", 1e-2, "fc, two_layer, three_layer_conv: std of the initial "
                           "weights (1e-2; three_layer_conv 1e-3); convnet draws He-style weights",
                           (0, None, True)),
    # ConvNet's keywords (fastnn.classifiers.conv_net), each off at its legacy value
    "activation": Option("choice", "relu", "convnet activation",
                         choices=("relu", "gelu")),
    "bn_scale": Option("choice", "learned", "convnet batchnorm scale: learned, or frozen at 1 "
                       "(only the shifts learn)", choices=("learned", "frozen")),
    "bn_eps": Option("float", 1e-5, "convnet batchnorm epsilon", (0, None, True)),
    "bn_momentum": Option("float", 0.9, "convnet batchnorm running statistics: running = m * "
                          "running + (1 - m) * batch", (0, 1)),
    "logit_scale": Option("float", 1.0, "convnet: multiply the scores by this",
                          (0, None, True)),
    "head_bias": Option("bool", True, "convnet: a bias in the last affine layer"),
    "dirac_init": Option("bool", False, "convnet: start each 3x3 conv's first filters as the "
                         "identity"),
    "stem": Option("choice", "conv", "convnet stem: a 3x3 conv with batchnorm, or whiten: a 2x2 "
                   "conv whose filters whiten the training images' patches, not trained",
                   choices=("conv", "whiten")),
    "stem_bias_epochs": Option("int", 0, "convnet with --stem whiten: train the stem's bias for "
                               "this many epochs only, 0: all", (0, None),
                               solver="train_epochs"),
    # Solver options (every model takes them; stem_bias_epochs above is the convnet's):
    # runs.solver_options maps each to its Solver keyword
    "shift_lr_multiplier": Option("float", 1.0, "multiply the batchnorm shifts' learning rate "
                                  "(not their weight decay) by this", (0, None, True),
                                  solver="lr_multipliers"),
    "bias_lr_multiplier": Option("float", 1.0, "multiply the biases' learning rate (not their "
                                 "weight decay) by this", (0, None, True),
                                 solver="lr_multipliers"),
    "decay_all_roles": Option("bool", False, "--weight-decay shrinks every parameter (biases, "
                              "batchnorm shifts and scales too), not only the weights",
                              solver="decayed_roles"),
    "lookahead": Option("bool", False, "average the parameters every 5 steps (airbench's "
                        "Lookahead) and train on with the average", solver="lookahead"),
    "lr_min_iterations": Option("int", 0, "onecycle / triangle: a run of fewer iterations "
                                "peaks at lr * iterations / this, 0: always at --lr", (0, None),
                                solver="lr_schedule_config"),
}


class Recipe(NamedTuple):
    """A named way to train a model: its settings over runs.LEGACY_DEFAULTS."""
    model: str         # its model in MODELS
    settings: dict     # configuration keys (model options, rule, schedule, augmentation, tta)
    about: str = ""    # one line in `fastnn train --help`'s list of recipes


class Search(NamedTuple):
    """How `fastnn tune --model NAME` searches a model."""
    about: str         # in tune --model's help
    space: dict        # parameter -> (kind "int"/"float", low, high, log): what Optuna draws
    baseline: dict     # a new study's first trial: a value per parameter of `space`
    stacked: bool      # K trials trained as one stacked net (fastnn.tune's fc search); else one
                       # trial at a time with the plain Solver, its config the model's recipe
                       # with the drawn values
    parallel: int      # --parallel when not given
    epochs: int        # --epochs of a new study when not given
    crop_padding: int  # --crop-padding when not given
    summary: Callable  # a trial's config -> its values in the log line
    flags: dict = {}   # option -> tune flag help: model options every trial takes from a flag
    shared: tuple = ()  # with `stacked`: the parameters one stack's trials share (its first
                        # trial draws them; a queued trial brings its own)
    lr_schedule: str = "onecycle"  # --lr-schedule when not given ("none": constant)
    # searched around a recipe that sets them (search_for): parameter -> (kind, low, high,
    # log), the range as factors of the recipe's value
    relative: dict = {}


class Model(NamedTuple):
    """A classifier fastnn train and tune can build."""
    about: str         # in --model's help
    build: Callable    # complete run config -> a new classifier of CIFAR-10 images
    options: tuple     # the configuration keys it takes besides reg (others refuse them)
    recipe: str        # its recipe in RECIPES: what a new run trains with by default
    check: Callable = None  # complete run config -> ValueError for a bad value of its options
    search: Search = None   # None: fastnn tune does not search it
    init: Callable = None   # (model, complete run config, data): a new run's start from its
                            # training images (runs.build_model; a resumed run's checkpoint
                            # holds what it set)


def _check_sizes(config, key, what):
    value = config[key]
    if not isinstance(value, (list, tuple)) or not value or any(
            isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in value):
        raise ValueError(f"--{key.replace('_', '-')} must be one or more {what} >= 1, "
                         f"got {value!r}")


def _check_fc(config):
    _check_sizes(config, "hidden_dims", "sizes")


def _check_convnet(config):
    _check_sizes(config, "widths", "channel counts")
    if len(config["widths"]) > 5:  # each group halves the 32x32 image
        raise ValueError(f"--widths: at most 5 groups fit 32x32 images (each halves the "
                         f"size), got {len(config['widths'])}: {config['widths']!r}")
    if config["stem"] == "whiten" and config["stem_width"] != 2 * IMAGE_SHAPE[0] * 4:
        raise ValueError(f"--stem whiten makes {2 * IMAGE_SHAPE[0] * 4} channels (2 per "
                         f"channel of a 2x2 RGB patch), got --stem-width "
                         f"{config['stem_width']}: drop --stem-width")
    if config["stem_bias_epochs"] and config["stem"] != "whiten":
        raise ValueError(f"--stem-bias-epochs applies to --stem whiten (its bias b1), got "
                         f"--stem {config['stem']}: drop --stem-bias-epochs")


# ConvNet's keyword options, each a config key of the same name
CONVNET_KEYWORDS = ("activation", "bn_scale", "bn_eps", "bn_momentum", "logit_scale", "head_bias",
                    "dirac_init", "stem")


def _build_convnet(config):
    from fastnn.classifiers import ConvNet

    return ConvNet(config["widths"], config["stem_width"], IMAGE_SHAPE, NUM_CLASSES,
                   reg=config["reg"], seed=config.get("model_seed", config["seed"]),
                   label_smoothing=config["label_smoothing"],
                   **{key: config[key] for key in CONVNET_KEYWORDS})


def _init_convnet(model, config, data):
    """A new convnet's start from its training images: the whitening stem's filters from the
    first 5000 (airbench), as the Solver sees them (before augmentation)."""
    if config["stem"] == "whiten":
        model.init_whitening(data["X_train"][:5000])


def _build_fc(config):
    from fastnn.classifiers import FullyConnectedNet

    # model_seed (written by fastnn tune) draws the weights and dropout; seed the batches
    return FullyConnectedNet(config["hidden_dims"], int(np.prod(IMAGE_SHAPE)), NUM_CLASSES,
                             dropout=config["dropout"], use_batchnorm=config["batchnorm"],
                             reg=config["reg"], weight_scale=config["weight_scale"],
                             seed=config.get("model_seed", config["seed"]))


def _build_two_layer(config):
    from fastnn.classifiers import TwoLayerNet

    np.random.seed(config["seed"])  # TwoLayerNet draws its weights from np.random
    return TwoLayerNet(int(np.prod(IMAGE_SHAPE)), config["hidden_dim"], NUM_CLASSES,
                       weight_scale=config["weight_scale"], reg=config["reg"])


def _build_three_layer_conv(config):
    from fastnn.classifiers import ThreeLayerConvNet

    np.random.seed(config["seed"])  # ThreeLayerConvNet draws its weights from np.random
    return ThreeLayerConvNet(IMAGE_SHAPE, config["num_filters"], config["filter_size"],
                             config["hidden_dim"], NUM_CLASSES,
                             weight_scale=config["weight_scale"], reg=config["reg"])


# What a new run trains with unless told otherwise (over runs.LEGACY_DEFAULTS): a recipe is a
# model and its settings, named (`fastnn train --recipe NAME`; a run folder records the name).
# A new recipe is one entry here; a setting it needs that no recipe had is one OPTIONS entry
# (a model option) or one runs.LEGACY_DEFAULTS entry (a training option), whose legacy value
# keeps it off for the run folders written before. DEFAULT_RECIPE is the main job; its target:
# >= 0.88 test accuracy on all of CIFAR-10's test images in 10 minutes on a 2-core CPU
# (benchmarks/README.md has the runs).
#
# airbench94 (KellerJordan/cifar10-airbench, legacy/airbench94.py's hyp): 10 epochs for its
# 9.9. Its lr 11.5 and weight decay 0.0153 per 1024 examples, momentum 0.85, in fastnn's
# terms (fastnn.optim's docstring): lr 11.5 / (1 + 1 / (1 - 0.85)) = 1.5 at batch 1024
# (scale it with --batch-size), weight decay 0.0153 / 11.5 (any batch size); its
# bias_scaler 64 on the batchnorm shifts' learning rate
_AIRBENCH = {
    "widths": [64, 256, 256], "stem": "whiten", "activation": "gelu", "bn_scale": "frozen",
    "bn_eps": 1e-12, "bn_momentum": 0.6, "logit_scale": 1 / 9, "head_bias": False,
    "dirac_init": True, "label_smoothing": 0.2, "stem_bias_epochs": 3,
    "update_rule": "sgd_nesterov", "learning_rate": 11.5 / (1 + 1 / (1 - 0.85)),
    "momentum": 0.85, "weight_decay": 0.0153 / 11.5, "shift_lr_multiplier": 64.0,
    "decay_all_roles": True, "reg": 0.0, "lr_schedule": "triangle", "lr_decay": 1.0,
    "epochs": 10, "batch_size": 1024, "augment": True, "flip": "alternate",
    "crop_padding": 2, "padding_mode": "reflect", "flip_test": True, "tta": 2,
    "lookahead": True}


def _airbench_muon(widths, epochs, batch_size=2000):
    """airbench94_muon's recipe (its hyperparameters, batch 2000) at ConvNet `widths`, in fastnn's
    terms: Muon (lr 0.24, momentum 0.6) on the 3x3 filters; Nesterov SGD (momentum 0.85) on the
    rest, a mean loss, so torch's summed-loss rates times the batch size: the head's 0.67 (over
    width, as fastnn's head starts at std 1/sqrt(width) and scales its scores by 1/sqrt(width)
    where airbench's starts at std 1 and divides by width), the biases' and batchnorm shifts'
    0.053; weight decay 2e-6 per example of a step (wd / lr per group, through the momentum,
    the filters excepted); the learning rates straight down to 0 (no warm-up, no lookahead)."""
    width = widths[-1]
    head_lr = 0.67 * batch_size / width
    bias_multiplier = 0.053 * batch_size / head_lr  # the biases' and shifts' 0.053
    return {**_AIRBENCH, "widths": widths, "update_rule": "muon", "learning_rate": head_lr,
            "momentum": 0.85, "muon_learning_rate": 0.24, "muon_momentum": 0.6,
            "weight_decay": 2e-6 * batch_size / head_lr,
            "shift_lr_multiplier": bias_multiplier, "bias_lr_multiplier": bias_multiplier,
            "logit_scale": width ** -0.5,
            "lr_schedule": "linear", "lookahead": False, "batch_size": batch_size,
            "epochs": epochs}


RECIPES = {
    # 8 epochs (airbench94_muon's) at 32/112/176: 0.8815 mean over 3 seeds (0.8805-0.8826) in
    # 9:08-9:43; at 32/96/160 0.8783 in 7:47 (seed 0); airbench_small 0.8794 in 9:11-9:53
    # (benchmarks/README.md)
    "airbench_muon": Recipe("convnet", _airbench_muon([32, 112, 176], 8),
                            "the main job (default): airbench94_muon's recipe at ConvNet "
                            "32/112/176: Muon on the conv filters, Nesterov SGD on the rest, "
                            "batch 2000, 8 epochs, tta 2: 0.882 in 9-10 min on a 2-core Xeon"),
    "airbench94_muon": Recipe("convnet", _airbench_muon([64, 256, 256], 8),
                              "airbench94_muon's recipe: ConvNet 64/256/256, Muon on the conv "
                              "filters, Nesterov SGD on the rest, batch 2000, 8 epochs, tta 2: "
                              "0.9065 in 29 min (2.9 GB) on a 2-core Xeon"),
    # widths 32 96 160 against 32 64 128: 0.879 against 0.869 (3 seeds each), 1.3x the time
    "airbench_small": Recipe("convnet", {**_AIRBENCH, "widths": [32, 96, 160]},
                             "the main job before airbench_muon: airbench94's recipe at ConvNet "
                             "32/96/160, 10 epochs: 0.879 in 9-10 min on a 2-core Xeon"),
    "airbench94": Recipe("convnet", _AIRBENCH,
                         "airbench94's recipe: ConvNet 64/256/256 with a whitening stem, GELU, "
                         "frozen batchnorm scales, Nesterov SGD at batch 1024, triangle "
                         "schedule, lookahead, alternating flips, tta 2; 10 epochs: 0.904 "
                         "in 37 min on a 2-core Xeon"),
    "convnet": Recipe("convnet", {
        "update_rule": "sgd_nesterov", "learning_rate": 0.2, "momentum": 0.9, "reg": 5e-4,
        "lr_schedule": "onecycle", "lr_decay": 1.0, "epochs": 11, "augment": True,
        "crop_padding": 2, "label_smoothing": 0.2, "flip_test": True, "tta": 1,
        # a run of fewer steps (--epochs 1 --num-training 5000: 19) peaks lower: warmed up
        # to 0.2 in a few steps it diverged; the full run's 2101 are unchanged
        "lr_min_iterations": 200},
        "--model convnet's own (fastnn tune searches around it): the contract's ConvNet "
        "32/64/128, one-cycle SGD, 11 epochs; the earlier main job, 0.855 in 15 min on a "
        "2-core Xeon"),
    "fc": Recipe("fc", {}, "the earlier main job, fully connected: 0.58 in 90 s"),
    "two_layer": Recipe("two_layer", {}, "the course's TwoLayerNet"),
    "three_layer_conv": Recipe("three_layer_conv", {
        "weight_scale": 1e-3, "reg": 1e-3, "hidden_dim": 500, "epochs": 5, "lr_decay": 0.95},
        "the course's ThreeLayerConvNet, 5 epochs"),
}
# `fastnn train` with no --model or --recipe: the main job (--model convnet alone: its own
# recipe, MODELS["convnet"].recipe)
DEFAULT_RECIPE = "airbench_muon"


def recipe(name):
    """RECIPES[name] as a Recipe (an entry may be a plain (model, settings) pair)."""
    return Recipe(*RECIPES[name])


# fastnn tune --model fc: each round's structural choices (the first block, shared by the
# round's stack) and per-trial values (the second block).
FC_UPDATE_RULES = ("adam", "adamw", "sgd_momentum")  # update_rule_id indexes these
FC_STRUCTURE = {
    "num_hidden": ("int", 1, 4, False),
    "hidden_width": ("int", 256, 2048, True),
    "width_ratio": ("float", 0.25, 1.0, False),  # each later layer is this much narrower
    "log2_batch_size": ("int", 7, 9, False),
    "lr_decay": ("float", 0.85, 1.0, False),
    "update_rule_id": ("int", 0, len(FC_UPDATE_RULES) - 1, False),
    "augment": ("int", 0, 1, False),  # random horizontal flips (and --crop-padding crops)
}
FC_MEMBER = {
    "learning_rate": ("float", 1e-4, 1e-2, True),
    "reg": ("float", 1e-6, 1e-1, True),
    "weight_scale": ("float", 1e-3, 1e-1, True),
    "dropout": ("float", 0.0, 0.6, False),
}
# --model convnet: one ConvNet trial at a time (a stack of conv nets would save nothing:
# their products are already large), around the convnet recipe, in a small space; every
# trial trains all its epochs, and its per-epoch validation accuracy is reported.
CONV_SPACE = {
    "learning_rate": ("float", 0.05, 0.5, True),
    "reg": ("float", 1e-4, 2e-3, True),
    "momentum": ("float", 0.8, 0.95, False),
    "label_smoothing": ("float", 0.0, 0.3, False),
}
_CONV_RECIPE = RECIPES["convnet"].settings

MODELS = {
    "convnet": Model(
        "convnet (the main job's model)", _build_convnet,
        ("widths", "stem_width", "label_smoothing", *CONVNET_KEYWORDS, "stem_bias_epochs",
         "model_seed"), "convnet", _check_convnet,
        Search("convnet: ConvNets around the convnet recipe (learning rate, reg, momentum, "
               "label smoothing), one trial at a time", CONV_SPACE,
               # the convnet recipe, as CONV_SPACE values
               {name: _CONV_RECIPE[name] for name in CONV_SPACE}, stacked=False, parallel=1,
               epochs=_CONV_RECIPE["epochs"], crop_padding=_CONV_RECIPE["crop_padding"],
               summary=lambda c: (f"lr {c['learning_rate']:.2e} reg {c['reg']:.1e} momentum "
                                  f"{c['momentum']:.3f} smoothing {c['label_smoothing']:.2f}"
                                  + "".join(f" {key.replace('_', ' ')} {c[key]:.2e}"
                                            for key in ("weight_decay", "muon_learning_rate")
                                            if c.get(key))),
               flags={"widths": "convnet trials' group widths (the recipe's 32 64 128)",
                      "stem_width": "convnet trials' stem width (24)"},
               relative={"weight_decay": ("float", 0.25, 4.0, True),
                         "muon_learning_rate": ("float", 0.5, 2.0, True)}),
        init=_init_convnet),
    "fc": Model(
        "fc (fully connected)", _build_fc,
        ("hidden_dims", "batchnorm", "dropout", "weight_scale", "model_seed"), "fc", _check_fc,
        Search("fc: fully connected nets, K trials at once as a stack",
               {**FC_STRUCTURE, **FC_MEMBER},
               # known to do well on CIFAR-10 (about 0.62 test accuracy after 30 epochs with
               # flips and a one-cycle schedule): a new study starts from it
               {"num_hidden": 3, "hidden_width": 1024, "width_ratio": 0.5, "log2_batch_size": 8,
                "lr_decay": 1.0, "update_rule_id": FC_UPDATE_RULES.index("adamw"), "augment": 1,
                "learning_rate": 1e-3, "reg": 1e-6, "weight_scale": 1e-2, "dropout": 0.3},
               stacked=True, parallel=2, epochs=30, crop_padding=0, shared=tuple(FC_STRUCTURE),
               summary=lambda c: (f"{c['hidden_dims']} bs {c['batch_size']} "
                                  f"{c['update_rule']} lr {c['learning_rate']:.2e}"))),
    "two_layer": Model("two_layer (TwoLayerNet)", _build_two_layer,
                       ("hidden_dim", "weight_scale"), "two_layer"),
    "three_layer_conv": Model("three_layer_conv (ThreeLayerConvNet)", _build_three_layer_conv,
                              ("num_filters", "filter_size", "hidden_dim", "weight_scale"),
                              "three_layer_conv"),
}
DEFAULT_MODEL = RECIPES[DEFAULT_RECIPE].model
TUNABLE = [name for name, model in MODELS.items() if model.search is not None]
DEFAULT_TUNE_MODEL = "fc"  # `fastnn tune` with no --model


def recipe_of(model):
    """The settings of `model`'s default recipe (over runs.LEGACY_DEFAULTS)."""
    return recipe(MODELS[model].recipe).settings


def recipes_of(model):
    """The names of `model`'s recipes, its default first."""
    default = MODELS[model].recipe
    return [default] + [name for name in RECIPES
                        if name != default and recipe(name).model == model]


def search_for(model, recipe_name=None):
    """How `fastnn tune --model model --recipe recipe_name` searches: MODELS[model].search
    moved to the recipe (None: the model's own, its search as declared). Its trials and
    baseline take the recipe's values; each log-scaled range is scaled by the recipe's value
    over the declared baseline's (so it keeps its width around the recipe), each other range
    widened to hold the recipe's value. A log-scaled parameter the recipe turns off (0: the
    airbench recipes' reg, who decay the weights instead) is not searched; the `relative`
    parameters the recipe sets (its weight decay, muon's learning rate) are, around its
    values. Epochs, crops and the schedule are the recipe's."""
    search = MODELS[model].search
    if recipe_name is None or recipe_name == MODELS[model].recipe:
        return search
    settings = recipe(recipe_name).settings
    baseline, space = {}, {}
    for name, (kind, low, high, log) in search.space.items():
        old, new = search.baseline[name], settings.get(name, search.baseline[name])
        if log and kind == "float":
            if new == 0:
                continue  # off in the recipe: it stays off
            low, high = low * new / old, high * new / old
        else:
            low, high = min(low, new), max(high, new)
        space[name], baseline[name] = (kind, low, high, log), new
    for name, (kind, low, high, log) in search.relative.items():
        if settings.get(name):
            value = settings[name]
            space[name], baseline[name] = (kind, low * value, high * value, log), value
    return search._replace(space=space, baseline=baseline,
                           epochs=settings.get("epochs", search.epochs),
                           crop_padding=settings.get("crop_padding", search.crop_padding),
                           lr_schedule=settings.get("lr_schedule") or "none")


def check_tables():
    """ValueError unless the tables agree: each model's options declared in OPTIONS, its
    recipe one of RECIPES made for it, each recipe's model registered."""
    for name, model in MODELS.items():
        unknown = sorted(set(model.options) - set(OPTIONS) - {"model_seed"})
        if unknown:
            raise ValueError(f"models.MODELS[{name!r}] takes undeclared options {unknown}; "
                             "declare them in models.OPTIONS")
        if RECIPES.get(model.recipe, (None,))[0] != name:
            raise ValueError(f"models.MODELS[{name!r}] names recipe {model.recipe!r}, which is "
                             f"not a recipe of {name!r} in models.RECIPES")
    for name in RECIPES:
        model = recipe(name).model
        if model not in MODELS:
            raise ValueError(f"models.RECIPES[{name!r}] names no model in models.MODELS: "
                             f"{model!r}")


check_tables()  # at import: a broken entry fails loudly, not at its first use
