"""The study: its search space, its trials' bookkeeping, and the search's time budget.

`create_study` opens (or creates) the study of a search and checks that it
draws from this fastnn's search space of the model (fastnn.models' registry);
`trial_key` and `has_result` read what a trial is (a retry, a result);
`check_epochs` settles --epochs from the study; `Clock` counts the budget.
"""
import math
import time

from fastnn import models
from fastnn.tune.optuna_api import FAILED_TRIAL, FIXED_PARAMS, quiet_fallback_warnings
from fastnn.tune.storage import describe_storage

SEARCH_SPACE_ATTR = "fastnn_search_space"  # a study user attribute: the ranges its trials drew from
RESERVE_SECONDS = 45  # the final test pass, plots and files


def search_space(model=models.DEFAULT_TUNE_MODEL, recipe=None):
    """Every searched parameter's (kind, low, high, log), as JSON keeps it (around `recipe`:
    fastnn.models.search_for)."""
    return {name: list(spec) for name, spec in models.search_for(model, recipe).space.items()}


def check_search_space(study, where, model=models.DEFAULT_TUNE_MODEL, recipe=None):
    """SystemExit unless `study` draws from this fastnn's search space (of `model`, one of
    fastnn.models.TUNABLE); records it in a new study."""
    from optuna.study import StudyDirection

    name, ours = study.study_name, search_space(model, recipe)
    if study.direction != StudyDirection.MAXIMIZE:
        raise SystemExit(f"fastnn: study {name!r} in the {where} minimizes its objective, so it "
                         "is not a fastnn tune study; choose another --study-name")
    theirs = study.user_attrs.get(SEARCH_SPACE_ATTR)
    if theirs is None:  # a new study, or one made before fastnn recorded its space
        theirs = {}
        for trial in study.get_trials(deepcopy=False):
            for param, dist in trial.distributions.items():
                spec, low, high = ours.get(param), getattr(dist, "low", None), \
                    getattr(dist, "high", None)
                if spec is None or low is None or not spec[1] <= low <= high <= spec[2]:
                    theirs[param] = [type(dist).__name__, low, high, getattr(dist, "log", None)]
        ours = {param: ours.get(param) for param in theirs}  # only what its trials drew
        if not theirs:
            study.set_user_attr(SEARCH_SPACE_ATTR, search_space(model, recipe))
            return
    differ = sorted(p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p))
    if differ:
        shown = "; ".join(f"{p}: {theirs.get(p)} there, {ours.get(p)} here" for p in differ)
        raise SystemExit(f"fastnn: study {name!r} in the {where} exists with another search "
                         f"space ({shown}); choose another --study-name")


def create_study(options, storage):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    quiet_fallback_warnings()  # an outage is reported by the patient storage
    sampler = optuna.samplers.TPESampler(seed=options["seed"], n_startup_trials=8)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2)
    where = describe_storage(options["storage"])
    try:
        study = optuna.create_study(
            study_name=options["study_name"], storage=storage, direction="maximize",
            sampler=sampler, pruner=pruner, load_if_exists=options["resume"] or options["shared"])
    except optuna.exceptions.DuplicatedStudyError:
        raise SystemExit(f"fastnn: study {options['study_name']!r} already exists in the {where}; "
                         "pass --resume to continue it") from None
    check_search_space(study, where, options.get("model", models.DEFAULT_TUNE_MODEL),
                       options.get("recipe"))
    return study


def trial_key(trial):
    """The number of the trial that `trial` runs again (its own number when it is no retry)."""
    return trial.system_attrs.get(FAILED_TRIAL, trial.number)


def has_result(trial):
    """Finished by its own worker: complete, pruned, or failed by itself (diverged)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or \
        (trial.state == TrialState.FAIL and "failed" in trial.user_attrs)


def pinned(trial, names):
    """The values of `names` a queued trial must train with (None where it leaves one free)."""
    given = {**trial.system_attrs.get(FIXED_PARAMS, {}), **trial.params}
    return tuple(given.get(name) for name in names)


def suggest(trial, name, spec, fixed=None):
    """`trial`'s value of `name` drawn from `spec` (kind, low, high, log); `fixed` pins it."""
    kind, low, high, log = spec
    if fixed is not None:  # a single-value range: the trial records the value it trains with
        low = high = fixed
    if kind == "int":
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, low, high, log=log)


def model_defaults(model, recipe=None):
    """--parallel, --epochs, --crop-padding and --lr-schedule of a search of `model` (around
    `recipe`) when not given."""
    search = models.search_for(model, recipe)
    return {"parallel": search.parallel, "epochs": search.epochs,
            "crop_padding": search.crop_padding, "lr_schedule": search.lr_schedule}


def trial_epochs(study):
    """The --epochs the study's trials were trained with (a set: empty for a new study)."""
    return {t.user_attrs["config"]["epochs"] for t in study.get_trials(deepcopy=False)
            if isinstance(t.user_attrs.get("config"), dict) and "epochs" in t.user_attrs["config"]}


def check_epochs(study, options):
    """Settle options["epochs"]: a study's trials all train alike, so a resumed or joined study
    keeps its own --epochs (taken when not given; another one is refused): val accuracies
    after other numbers of epochs do not compare, and TPE and the pruner would mix them."""
    theirs = trial_epochs(study)
    if options.get("epochs") is None:
        options["epochs"] = min(theirs) if len(theirs) == 1 else \
            model_defaults(options.get("model", models.DEFAULT_TUNE_MODEL),
                           options.get("recipe"))["epochs"]
    elif theirs and theirs != {options["epochs"]}:
        where = describe_storage(options["storage"])
        shown = " and ".join(str(e) for e in sorted(theirs))
        raise SystemExit(f"fastnn: study {study.study_name!r} in the {where} trains its trials "
                         f"for {shown} epochs, not --epochs {options['epochs']} (their accuracies "
                         "would not compare); drop --epochs to continue it, start another study "
                         "with --study-name, or retrain the best for longer with --final-epochs")


class Clock:
    """Seconds left of the budget, counted from the command's start."""

    def __init__(self, budget_minutes, start):
        self.deadline = None if budget_minutes is None else start + 60 * budget_minutes
        self.start = start

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()
