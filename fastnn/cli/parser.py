"""The fastnn command line: `build_parser`, its flags from the registries (fastnn.models'
models and options, fastnn.optim's rules and hyperparameters)."""
import argparse
import textwrap

from fastnn import models, optim, schedules
from fastnn.runs import DEFAULTS, MODEL_OPTIONS, RULE_OPTIONS, option_name, recipe_config

# --lr-schedule's values: none (constant) and fastnn.schedules' others
SCHEDULE_CHOICES = ["none", *(name for name in schedules.SCHEDULES if name != "constant")]

# the argparse keywords of a model option's flag, by its kind (fastnn.models.Option)
OPTION_KINDS = {"int": {"type": int}, "float": {"type": float}, "ints": {"type": int, "nargs": "+"},
                "bool": {"action": argparse.BooleanOptionalAction}, "choice": {}}
# the models fastnn tune searches, its default first
TUNE_MODELS = sorted(models.TUNABLE, key=lambda name: name != models.DEFAULT_TUNE_MODEL)


class LinesHelpFormatter(argparse.HelpFormatter):
    """Wraps each line of a description or epilog on its own (the list of recipes keeps one
    entry a line, its wrapped rest indented)."""

    def _fill_text(self, text, width, indent):
        return "\n".join(textwrap.fill(line, width, initial_indent=indent,
                                        subsequent_indent=indent + "    ")
                          for line in text.splitlines())


def recipes_epilog():
    """`fastnn train --help`'s list of recipes, one line each, the default one first."""
    names = sorted(models.RECIPES, key=lambda name: name != models.DEFAULT_RECIPE)
    lines = []
    for name in names:
        recipe = models.recipe(name)
        model = "" if recipe.model == name else f" (--model {recipe.model})"
        lines.append(f"  {name}{model}: {recipe.about}")
    return "recipes (--recipe NAME; a flag replaces one value of it):\n" + "\n".join(lines)


def _value_text(value):
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return " ".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


_FC_DEFAULTS = recipe_config(models.MODELS["fc"].recipe)
_MODEL_KEYS = {k for keys in MODEL_OPTIONS.values() for k in keys}


def defaults_note(key):
    """`fastnn train`'s default of config `key`, for its flag's help: "(X)", the main job's
    value (models.DEFAULT_RECIPE), or "(X / Y)" with fc's after a slash where fc takes the key
    and trains with another value. From the recipes, so the help follows them."""
    main = _value_text(DEFAULTS[key])
    if key in _MODEL_KEYS and key not in MODEL_OPTIONS["fc"]:
        return f"({main})"
    other = _value_text(_FC_DEFAULTS[key])
    return f"({main})" if other == main else f"({main} / {other})"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="fastnn", description="Train, evaluate and tune classifiers on CIFAR-10 "
        "(fastnn train / evaluate / tune). Set FASTNN_DEBUG=1 (or pass --debug) for tracebacks.")
    commands = parser.add_subparsers(dest="command", required=True)
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", default=False,
                       help="show the full traceback of an error (also: FASTNN_DEBUG=1)")

    train = commands.add_parser(
        "train", help="train a classifier on CIFAR-10", parents=[debug],
        argument_default=argparse.SUPPRESS, formatter_class=LinesHelpFormatter,
        description="Train a classifier on CIFAR-10 into a run folder (config.json, metrics.json, "
                    "model.npz, checkpoint.npz, plots). Flags that do not apply to the chosen "
                    "--model or --update-rule are refused.", epilog=recipes_epilog())
    add = train.add_argument
    add("--config", dest="config_file", metavar="FILE",
        help="start from the configuration in FILE (a run's config.json, or a tune folder's "
             "best.json); flags override it")
    add("--recipe", choices=list(models.RECIPES),
        help=f"the named settings to train with, listed below; flags replace single values "
             f"(without it: --model's recipe, else {models.DEFAULT_RECIPE}, the main job)")
    abouts = [model.about for model in models.MODELS.values()]
    add("--model", choices=list(models.MODELS),
        help=f"{', '.join(abouts[:-1])} or {abouts[-1]}; the other defaults are that model's "
             f"recipe (the defaults shown are the main job's, {models.DEFAULT_RECIPE}, and "
             f"fc's after a slash) ({models.DEFAULT_MODEL})")
    for key, option in models.OPTIONS.items():  # the models' own options
        note = f" {defaults_note(key)}" if key in MODEL_OPTIONS[models.DEFAULT_MODEL] or \
            option.solver else ""  # the others' texts name their models' values
        add(option_name(key), help=option.help + note, **OPTION_KINDS[option.kind],
            **({"choices": list(option.choices)} if option.kind == "choice" else {}))
    add("--reg", type=float, help=f"L2 regularisation strength {defaults_note('reg')}")
    add("--update-rule", choices=list(RULE_OPTIONS),
        help=f"update rule {defaults_note('update_rule')}")
    add("--lr", "--learning-rate", dest="learning_rate", type=float,
        help=f"learning rate {defaults_note('learning_rate')}")
    for key, text in rule_option_help().items():  # the update rules' hyperparameters
        if DEFAULTS.get(key) is not None:  # the main job's value, where it sets one
            text += f"; the main job {_value_text(DEFAULTS[key])}"
        add(option_name(key), type=float, help=text)
    add("--lr-schedule", choices=SCHEDULE_CHOICES,
        help=f"learning-rate schedule {defaults_note('lr_schedule')}; multiplies with "
             "--lr-decay")
    add("--augment", action=argparse.BooleanOptionalAction,
        help=f"random horizontal flips of the training images {defaults_note('augment')}")
    add("--crop-padding", type=int,
        help="with --augment, also random translations by up to this many pixels "
             f"{defaults_note('crop_padding')}")
    add("--flip", choices=["random", "alternate"],
        help="with --augment, how images are flipped: at random each step, or alternate "
             "(airbench: each image mirrored on every other epoch after a random first) "
             f"{defaults_note('flip')}")
    add("--padding-mode", choices=["zeros", "reflect"],
        help="with --augment, what --crop-padding shifts in: zeros or the mirrored edge "
             f"{defaults_note('padding_mode')}")
    add("--tta", type=int, choices=[0, 1, 2],
        help="test-time augmentation: 0 none, 1 the mean of each image's and its mirror's "
             f"scores, 2 also 1-pixel translations {defaults_note('tta')}")
    add("--flip-test", action=argparse.BooleanOptionalAction,
        help="the same as --tta 1 (--no-flip-test: --tta 0)")
    add("--lr-decay", type=float,
        help=f"learning-rate factor after each epoch {defaults_note('lr_decay')}")
    add("--epochs", type=int, help=f"epochs {defaults_note('epochs')}")
    add("--batch-size", type=int, help=f"minibatch size {defaults_note('batch_size')}")
    add("--backend", choices=["numpy", "cupy"], help="numpy (CPU) or cupy (GPU) (numpy)")
    add("--seed", type=int, help="seed for weights, batches and dropout (0)")
    add("--data", help="folder holding cifar-10-batches-py or cifar-10-python.tar.gz "
                       "(default: $FASTNN_DATA, else ~/.cache/fastnn, downloaded there)")
    add("--num-training", type=int, help="training images (49000)")
    add("--num-validation", type=int, help="validation images (1000)")
    add("--num-test", type=int, help="test images (10000)")
    add("--threads", type=int, help="CPU threads (all cores)")
    add("--print-every", type=int, help="read the loss every N iterations (50)")
    add("--out", help="run folder (default: a new one under runs/)")
    add("--resume", metavar="DIR", help="continue the stopped run in DIR")

    tune = commands.add_parser(
        "tune", help="search hyperparameters with Optuna", parents=[debug],
        description="Search hyperparameters on CIFAR-10 with Optuna, --parallel trials trained "
                    "together as one stack; writes best.json, trials.csv, best_model.npz and "
                    "plots to the run folder (retrain the best: fastnn train --config "
                    "DIR/best.json).")
    add = tune.add_argument
    searches = {name: models.MODELS[name].search for name in TUNE_MODELS}
    add("--model", choices=TUNE_MODELS, default=TUNE_MODELS[0],
        help="; ".join(search.about for search in searches.values())
             + f" ({TUNE_MODELS[0]})")
    add("--recipe", choices=list(models.RECIPES), default=None,
        help="convnet: search around this recipe of --model (its values are the first trial, "
             "the ranges move to them) (the model's own)")
    for search in searches.values():  # model options the trials take from a flag
        for key, text in search.flags.items():
            add(option_name(key), default=None, help=text,
                **OPTION_KINDS[models.OPTIONS[key].kind])
    add("--trials", type=int, default=60, help="trials in the study, all workers together (60)")
    add("--budget-minutes", type=float, default=None,
        help="stop in time to finish within M minutes of the command's start (none)")
    add("--parallel", type=int, default=None,
        help="fc trials trained together as one stack (2; more pays for small nets and on "
             "GPUs); convnet trials train one at a time")
    add("--epochs", type=int, default=None,
        help="epochs per trial (fc 30; convnet the recipe's 11; a resumed study keeps its own "
             "and refuses another)")
    add("--final-epochs", type=int, default=0,
        help="retrain the best configuration for this many epochs at the end (0: no)")
    add("--crop-padding", type=int, default=None,
        help="trials that augment (fc: a searched choice; convnet: always) also translate "
             "by up to this many pixels (fc 0; convnet 2)")
    add("--lr-schedule", choices=SCHEDULE_CHOICES, default=None,
        help="learning-rate schedule of every trial (onecycle; with --recipe, the recipe's)")
    add("--storage", default=None,
        help="study storage shared by workers: postgresql+psycopg://USER@HOST:PORT/DB (the "
             "password from ~/.pgpass or PGPASSWORD, not the command line, where ps shows it), "
             "sqlite:///PATH or journal:PATH (default: $FASTNN_STORAGE, else sqlite in the run "
             "folder)")
    add("--study-name", default="fastnn", help="study name in the storage (fastnn)")
    add("--heartbeat-seconds", type=int, default=10,
        help="a worker records a heartbeat for its running trials this often (10)")
    add("--grace-seconds", type=int, default=60,
        help="a trial with no heartbeat for this long is lost: FAIL, and run again (60)")
    add("--outage-seconds", type=int, default=60,
        help="a database server that stops answering is waited for this long (retrying with "
             "backoff) before the worker stops (60)")
    add("--resume", action="store_true", help="continue the study in the storage")
    add("--out", default=None, help="run folder (default: a new one under runs/)")
    add("--seed", type=int, default=0, help="sampler and training seed (0)")
    add("--backend", choices=["numpy", "cupy"], default="numpy",
        help="numpy (CPU) or cupy (GPU) (numpy)")
    add("--data", default=None,
        help="folder holding cifar-10-batches-py or cifar-10-python.tar.gz "
             "(default: $FASTNN_DATA, else ~/.cache/fastnn)")
    add("--num-training", type=int, default=49000, help="training images per trial (49000)")
    add("--num-validation", type=int, default=1000,
        help="validation images that score the trials (1000)")
    add("--num-test", type=int, default=10000, help="test images for the best model (10000)")
    add("--threads", type=int, default=None, help="CPU threads (all cores)")

    evaluate = commands.add_parser(
        "evaluate", help="test accuracy and confusion matrix of a run", parents=[debug],
        description="Test accuracy and confusion matrix (printed, and DIR/confusion.png) of the "
                    "model in a train or tune run folder.")
    evaluate.add_argument("run_dir", help="a run folder of `fastnn train` or `fastnn tune`")
    evaluate.add_argument("--data", help="folder holding cifar-10-batches-py")
    evaluate.add_argument("--backend", choices=["numpy", "cupy"], default=None,
                          help="numpy (CPU) or cupy (GPU) (the run's)")
    evaluate.add_argument("--tta", type=int, choices=[0, 1, 2], default=None,
                          help="test-time augmentation: 0 none, 1 mirror, 2 mirror and 1-pixel "
                               "translations (default: as the run was trained to test)")
    evaluate.add_argument("--flip-test", action=argparse.BooleanOptionalAction, default=None,
                          help="the same as --tta 1 (--no-flip-test: --tta 0)")
    return parser


def rule_option_help():
    """{hyperparameter: its flag's help} for the update rules' options (fastnn.optim's table):
    the rules that take it and their defaults, e.g. "adam/adamw beta1 (0.9)"."""
    rules, defaults = {}, {}
    for rule, keys in RULE_OPTIONS.items():
        for key in keys:
            rules.setdefault(key, []).append(rule)
            # a hyperparameter a rule takes only when given (the SGD rules' weight decay): off
            default = optim.DEFAULTS[rule].get(key)
            defaults.setdefault(key, {})["off" if default is None else f"{default:g}"] = None
    # a rule's own key (muon_learning_rate) names its rule once: "muon learning rate (0.24)"
    return {key: f"{'' if rules[key] == [key.split('_')[0]] else '/'.join(rules[key]) + ' '}"
                 f"{key.replace('_', ' ')} ({' / '.join(defaults[key])})"
            for key in rules}
