"""`fastnn tune`: hyperparameter search on CIFAR-10 with Optuna, K trials trained as one stack.

Each round takes K trials (`--parallel K`). The structural choices (depth,
widths, batch size, lr decay, update rule) are drawn by the round's first
trial and given to the others as single-value ranges, so every trial records
the values it was trained with; the continuous ones (learning rate, reg,
weight scale, dropout) are drawn per trial. The K nets train together as a
`StackedFullyConnectedNet`; after every epoch each trial reports its
validation accuracy, and Optuna's pruner may stop it (it leaves the stack).

The study lives in an Optuna storage: SQLite in the run folder by default, so
`--resume` continues it; a database server (or a journal file) shared by
workers on several machines. `Worker` decides which worker trains which
trial: `--trials N` slots for the whole study, heartbeats for the trials a
worker trains, and the trials of a worker that died queued again for a live one.

After the search the best configuration may be retrained for longer
(`--final-epochs`), and the best-validation model is tested on all test
images. Everything, loading and the test pass included, fits in
`--budget-minutes`. Ctrl-C or SIGTERM ends the search early with what finished
written; a database server that restarts is waited for (`--outage-seconds`).
"""
import contextlib
import csv
import functools
import math
import os
import re
import signal
import threading
import time
import warnings

import numpy as np

from fastnn import models
from fastnn.files import atomic_write, read_json, write_json
from fastnn.interrupt import TrainingInterrupted, stop_requests
from fastnn.plots import save_figure
from fastnn.runs import (augment_options, build_model, build_solver, complete, defaults_for,
                         load_data, predict, recorded, setup_runtime)

BEST_FORMAT, FORMAT_VERSION = "fastnn-tune-best", 1

# the searches' spaces live in fastnn.models' registry (Search); these names stay for callers
UPDATE_RULES = models.FC_UPDATE_RULES
STRUCTURE_SPACE = models.FC_STRUCTURE  # what one round's trials share
MEMBER_SPACE = models.FC_MEMBER  # what each trial draws
CONV_SPACE = models.CONV_SPACE
RESERVE_SECONDS = 45  # the final test pass, plots and files


def _suggest(trial, name, spec, fixed=None):
    kind, low, high, log = spec
    if fixed is not None:  # a single-value range: the trial records the value it trains with
        low = high = fixed
    if kind == "int":
        return trial.suggest_int(name, low, high, log=log)
    return trial.suggest_float(name, low, high, log=log)


def suggest_structure(trial, fixed=None):
    """The round's shared choices; `fixed` (another trial's) pins each to one value."""
    return {name: _suggest(trial, name, spec, None if fixed is None else fixed[name])
            for name, spec in STRUCTURE_SPACE.items()}


def suggest_member(trial):
    return {name: _suggest(trial, name, spec) for name, spec in MEMBER_SPACE.items()}


def hidden_dims(structure):
    width = structure["hidden_width"]
    return [max(16, int(round(width * structure["width_ratio"] ** i)))
            for i in range(structure["num_hidden"])]


def train_config(structure, member, options, trial_number):
    """A `fastnn train` configuration (runs.DEFAULTS keys) for one trial, of what applies.

    `seed` orders the batches (shared by a stack); `model_seed` draws the
    trial's weights and dropout masks.
    """
    return recorded({
        "model": "fc", "hidden_dims": hidden_dims(structure), "batchnorm": True,
        "dropout": member["dropout"], "reg": member["reg"],
        "weight_scale": member["weight_scale"],
        "update_rule": UPDATE_RULES[structure["update_rule_id"]],
        "learning_rate": member["learning_rate"], "lr_decay": structure["lr_decay"],
        "lr_schedule": None if options["lr_schedule"] == "none" else options["lr_schedule"],
        "augment": bool(structure["augment"]),
        "crop_padding": options["crop_padding"],
        "batch_size": 2 ** structure["log2_batch_size"], "epochs": options["epochs"],
        "seed": options["seed"], "model_seed": options["seed"] + trial_number,
        # the split decides the mean image subtracted from every input
        "data": options["data"], "num_training": options["num_training"],
        "num_validation": options["num_validation"], "num_test": options["num_test"],
    })


class Clock:
    """Seconds left of the budget, counted from the command's start."""

    def __init__(self, budget_minutes, start):
        self.deadline = None if budget_minutes is None else start + 60 * budget_minutes
        self.start = start

    def left(self):
        return math.inf if self.deadline is None else self.deadline - time.perf_counter()


# -- the study: its storage, and which worker trains which trial --------------
DEFAULT_PORTS = {"postgresql": 5432, "mysql": 3306}
STORAGE_ENV = "FASTNN_STORAGE"  # the storage URL when --storage is not given
SEARCH_SPACE_ATTR = "fastnn_search_space"  # a study user attribute: the ranges its trials drew from
MAX_RETRIES = 2  # a trial that takes its worker down every time (out of memory) is given up


def hide_password(url):
    """`url` with its password (if any) shown as ***, for messages and resume commands."""
    from sqlalchemy.engine import make_url

    if url.startswith("journal:"):
        return url
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL SQLAlchemy reads: hide what sits between USER: and @
        scheme, sep, rest = url.partition("://")
        if not sep:
            scheme, rest = "", url
        return scheme + sep + re.sub(r"^([^/:@]*):[^@]*@", r"\1:***@", rest)


def describe_storage(url):
    """`url` for messages: a database's host and port, never its password."""
    if url.startswith("journal:"):
        return f"journal file {url[len('journal:'):]}"
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return f"SQLite file {parsed.database}"
    port = parsed.port or DEFAULT_PORTS.get(parsed.get_backend_name(), "?")
    return f"{parsed.get_backend_name()} server {parsed.host}:{port} database {parsed.database}"


def check_file_storage(path, what):
    """SystemExit unless the folder of the storage file `path` exists (and `path` is no folder)."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise SystemExit(f"fastnn: the {what} {path} is a folder; give a file path in --storage")
    if not os.path.isdir(folder):
        raise SystemExit(f"fastnn: no folder {folder} for the {what} {path}; create it, or give "
                         "--storage a path in an existing folder")


def check_database(url):
    """Connect once to the database of `url`; returns the engine options for Optuna.

    An unknown URL, a missing driver, an unreachable server or refused
    credentials end the command with one line that names host and port.
    """
    import sqlalchemy
    from sqlalchemy.engine import make_url

    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError) as error:  # ValueError: a bad port
        raise SystemExit(f"fastnn: --storage {hide_password(url)!r} is not a storage URL "
                         f"({error}); use "
                         "postgresql+psycopg://USER@HOST:PORT/DATABASE, "
                         "sqlite:///PATH or journal:PATH") from None
    backend = parsed.get_backend_name()
    engine_kwargs = {}
    if backend == "sqlite":
        if parsed.database not in (None, "", ":memory:"):
            check_file_storage(parsed.database, "SQLite file")
    else:
        # A trial keeps the pool idle for minutes, and a server may restart: test a
        # connection before using it again (a dead one is replaced).
        engine_kwargs["pool_pre_ping"] = True
    if backend == "postgresql":
        engine_kwargs["connect_args"] = {"connect_timeout": 10}
    where = describe_storage(url)
    try:
        engine = sqlalchemy.create_engine(parsed, **engine_kwargs)
    except (ImportError, sqlalchemy.exc.NoSuchModuleError) as error:
        raise SystemExit(f"fastnn: no database driver for {parsed.drivername!r} ({error}); for "
                         "PostgreSQL: pip install 'fastnn[distributed]' and use a "
                         "postgresql+psycopg:// URL") from None
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as error:
        reason = " ".join(str(error.orig if error.orig is not None else error).split())
        if backend == "sqlite":
            raise SystemExit(f"fastnn: cannot open the study storage, the {where} ({reason}); "
                             "check the path and its permissions") from None
        raise SystemExit(f"fastnn: cannot open the study storage on the {where} ({reason}); "
                         "check that the server runs there and the URL's user, password "
                         "and database") from None
    finally:
        engine.dispose()
    return engine_kwargs


def wait(seconds, stop):
    """Sleep `seconds`, or raise TrainingInterrupted as soon as `stop` (a StopRequest) is set."""
    end = time.monotonic() + seconds
    while True:
        if stop is not None and stop.requested:
            raise TrainingInterrupted("interrupted", None, signal.Signals(stop.signum))
        left = end - time.monotonic()
        if left <= 0:
            return
        time.sleep(min(left, 0.2))


class StorageUnavailable(Exception):
    """The study's database did not answer for the whole outage allowance (one line)."""


def _connection_lost(error):
    """True when `error` (raised by an RDBStorage call) says the server went away, not
    that the call was wrong: worth trying again."""
    import sqlalchemy

    from optuna.exceptions import StorageInternalError

    if isinstance(error, StorageInternalError):
        error = error.__cause__
    return isinstance(error, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) \
        or getattr(error, "connection_invalidated", False)


# The RDBStorage methods that talk to the database (what Optuna's cache calls included).
DATABASE_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies", "create_new_trial",
    "_create_new_trial", "set_trial_param", "_set_trial_param", "get_trial_param",
    "set_trial_state_values", "set_trial_intermediate_value", "set_trial_user_attr",
    "set_trial_system_attr", "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial_id_from_study_id_trial_number", "get_trial", "get_all_trials", "_get_trials",
    "get_best_trial", "_get_best_trial_id", "record_heartbeat", "_get_stale_trial_ids")


@functools.cache
def patient_storage_class():
    """An optuna RDBStorage whose database calls ride out a server restart.

    A call that fails because the connection is gone is made again (a failed
    transaction was rolled back, so it is made whole or not at all), after
    0.5, 1, 2, 4, 8, 8, ... s, for up to `outage_seconds` from the first
    failure (or until `stop`, a StopRequest, is set); then StorageUnavailable
    names the server. Only the outermost call retries (Optuna's calls nest),
    and one message per outage is logged.
    """
    import optuna

    class PatientRDBStorage(optuna.storages.RDBStorage):
        def __init__(self, url, *, outage_seconds, log, stop=None, **kwargs):
            self.outage_seconds, self.log, self.stop = outage_seconds, log, stop
            self.where = describe_storage(url)
            self._depth = threading.local()
            self._outage_lock = threading.Lock()
            self._outage_since = None  # time.monotonic() of the first failed call, or None
            super().__init__(url, **kwargs)

        def _patiently(self, call, *args, **kwargs):
            if getattr(self._depth, "value", 0):  # an inner call: the outer one retries
                return call(*args, **kwargs)
            delay = 0.5
            while True:
                self._depth.value = 1
                try:
                    result = call(*args, **kwargs)
                except Exception as error:
                    if not _connection_lost(error):
                        raise
                    self._wait(error, delay)
                    delay = min(2 * delay, 8)
                    continue
                finally:
                    self._depth.value = 0
                with self._outage_lock:
                    if self._outage_since is not None:
                        self.log(f"the {self.where} answers again after "
                                 f"{time.monotonic() - self._outage_since:.0f} s")
                        self._outage_since = None
                return result

        def _wait(self, error, delay):
            cause = error.__cause__ if error.__cause__ is not None else error
            reason = " ".join(str(getattr(cause, "orig", None) or cause).split())
            with self._outage_lock:
                now = time.monotonic()
                if self._outage_since is None:
                    self._outage_since = now
                    self.log(f"the {self.where} does not answer ({reason}); trying again "
                             f"for up to {self.outage_seconds} s")
                waited = now - self._outage_since
            if waited >= self.outage_seconds:
                raise StorageUnavailable(
                    f"the study storage, the {self.where}, did not answer for "
                    f"{waited:.0f} s ({reason})") from None
            end = time.monotonic() + min(delay, self.outage_seconds - waited)
            while time.monotonic() < end:  # in steps: Ctrl-C is not kept waiting
                if self.stop is not None and self.stop.requested:
                    raise StorageUnavailable(f"the {self.where} does not answer ({reason})")
                time.sleep(min(0.2, max(end - time.monotonic(), 0)))

    def patient(name):
        method = getattr(optuna.storages.RDBStorage, name)

        def call(self, *args, **kwargs):
            return self._patiently(method.__get__(self), *args, **kwargs)

        call.__name__ = name
        return call

    for name in DATABASE_CALLS:
        setattr(PatientRDBStorage, name, patient(name))
    return PatientRDBStorage


def open_storage(options, log=print, stop=None):
    """The Optuna storage of options["storage"]: a database URL or journal:PATH.

    A database storage keeps heartbeats: a trial whose worker sent none for
    `grace_seconds` is marked FAIL by the next worker that looks, and queued
    again with its parameters (Optuna's RetryHeartbeatStaleTrialCallback). A
    journal file keeps no heartbeats, so it cannot tell a dead worker's trial.
    A database server that goes away is waited for up to
    options["outage_seconds"] (patient_storage_class); `stop`, a
    fastnn.interrupt.StopRequest, cuts that wait short.
    """
    import optuna
    from sqlalchemy.exc import DBAPIError

    url = options["storage"]
    if url.startswith("journal:"):
        from optuna.storages.journal import JournalFileBackend

        path = url[len("journal:"):]
        check_file_storage(path, "journal file")
        return optuna.storages.JournalStorage(JournalFileBackend(path))
    engine_kwargs = check_database(url)
    with warnings.catch_warnings():  # heartbeats and retries are experimental in Optuna
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES)
        for attempt in range(5):
            try:
                return patient_storage_class()(
                    url, outage_seconds=options.get("outage_seconds", 60), log=log, stop=stop,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=options["heartbeat_seconds"],
                    grace_period=options["grace_seconds"], heartbeat_stale_trial_callback=retry)
            except DBAPIError:
                # Workers starting together race to create a new database's tables.
                if attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))


def search_space(model="fc"):
    """Every searched parameter's (kind, low, high, log), as JSON keeps it."""
    return {name: list(spec) for name, spec in models.MODELS[model].search.space.items()}


def check_search_space(study, where, model="fc"):
    """SystemExit unless `study` draws from this fastnn's search space (of `model`, one of
    fastnn.models.TUNABLE); records it in a new study."""
    from optuna.study import StudyDirection

    name, ours = study.study_name, search_space(model)
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
            study.set_user_attr(SEARCH_SPACE_ATTR, search_space(model))
            return
    differ = sorted(p for p in ours.keys() | theirs.keys() if ours.get(p) != theirs.get(p))
    if differ:
        shown = "; ".join(f"{p}: {theirs.get(p)} there, {ours.get(p)} here" for p in differ)
        raise SystemExit(f"fastnn: study {name!r} in the {where} exists with another search "
                         f"space ({shown}); choose another --study-name")


def create_study(options, storage):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
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
    check_search_space(study, where, options.get("model", "fc"))
    return study


def trial_key(trial):
    """The number of the trial that `trial` runs again (its own number when it is no retry)."""
    return trial.system_attrs.get("failed_trial", trial.number)


def has_result(trial):
    """Finished by its own worker: complete, pruned, or failed by itself (diverged)."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) or \
        (trial.state == TrialState.FAIL and "failed" in trial.user_attrs)


def pinned_structure(trial):
    """The structure a queued trial must train with (None where it leaves a choice free)."""
    pinned = {**trial.system_attrs.get("fixed_params", {}), **trial.params}
    return tuple(pinned.get(name) for name in STRUCTURE_SPACE)


class Worker:
    """This process's share of a study: takes trials, keeps them alive, finds lost ones.

    Optuna records heartbeats only inside `Study.optimize`; tune trains a
    stack of trials at once, so a thread of its own records one every
    `heartbeat_seconds` for each trial this worker trains. `--trials N` counts
    trials with a result: a trial's "slot" is the number of the trial it runs
    (a retry keeps its lost trial's), and a new trial runs only when fewer
    than N slots with smaller numbers exist, which every worker decides alike.
    """

    def __init__(self, study, options, log):
        self.study, self.log = study, log
        # The study's own storage object (Optuna wraps a database in a cache), so that trials
        # made here are in the study's view; FrozenTrial._trial_id names them in it.
        self.storage = study._storage
        self.study_id = self.storage.get_study_id_from_name(study.study_name)
        self.trials = options["trials"]
        self.worker = options["worker"]
        interval = getattr(self.storage, "get_heartbeat_interval", lambda: None)()
        self.heartbeats = interval is not None  # database storages; a journal keeps none
        self.interval, self.grace = options["heartbeat_seconds"], options["grace_seconds"]
        self.held = {}  # trial id -> number, for the trials this worker trains
        self.first_seen = {}  # others' RUNNING trial number -> time.monotonic() first seen
        self.lost_since = {}  # lost trial's number -> when first seen with no retry queued
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        self.stop = None  # the StopRequest of tune()'s signals, checked before training

    def __enter__(self):
        if self.heartbeats:
            self._thread = threading.Thread(target=self._beat, daemon=True,
                                            name="fastnn-heartbeat")
            self._thread.start()
        return self

    def __exit__(self, exc_type, exc, traceback):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if exc_type is not None and not issubclass(exc_type, StorageUnavailable):
            self.hand_back_all()  # stopped or broken: at once, not after the grace period

    def hand_back_all(self):
        """Hand back every trial this worker trains (it stops); says so where it cannot."""
        for trial_id in list(self.held):
            try:
                self.hand_back(trial_id)
            except Exception as error:  # the storage is what broke
                numbers = ", ".join(str(n) for n in sorted(self.held.values()))
                self.log(f"could not hand back trial(s) {numbers} ({' '.join(str(error).split())})"
                         f"; other workers run them again after {self.grace} s without a "
                         "heartbeat")
                return

    def _beat(self):
        while not self._stop.wait(self.interval):
            with self._lock:
                ids = list(self.held)
            for trial_id in ids:
                try:
                    self.storage.record_heartbeat(trial_id)
                except Exception as error:  # a dropped connection: the next beat tries again
                    self.log(f"heartbeat of trial {self.held.get(trial_id)} failed: {error}")

    def _hold(self, trial_id):
        import optuna

        if self.heartbeats:  # at once: a trial with no heartbeat is never found stale
            self.storage.record_heartbeat(trial_id)
        trial = optuna.trial.Trial(self.study, trial_id)
        with self._lock:
            self.held[trial_id] = trial.number
        trial.set_user_attr("worker", self.worker)
        return trial

    def progress(self, trials=None):
        """(trials with a result, slots taken, slots still in flight) of the study now."""
        from optuna.trial import TrialState

        if trials is None:
            trials = self.study.get_trials(deepcopy=False)
        latest = {}  # slot -> its newest trial (a retry supersedes the lost one)
        for trial in trials:
            if trial.state == TrialState.FAIL and "skipped" in trial.user_attrs:
                continue
            slot = trial_key(trial)
            if slot not in latest or trial.number > latest[slot].number:
                latest[slot] = trial
        now = time.monotonic()
        results, slots, in_flight = 0, set(), 0
        for slot, trial in latest.items():
            if has_result(trial):
                results += 1
            elif trial.state == TrialState.FAIL:  # lost, and no retry queued (yet)
                retries = len(trial.system_attrs.get("retry_history", []))
                since = self.lost_since.setdefault(trial.number, now)
                if retries >= MAX_RETRIES or now - since > 2 * self.grace:
                    continue  # given up, or its finder died before queueing it: a new trial's slot
                in_flight += 1
            else:
                in_flight += 1
            slots.add(slot)
        return results, slots, in_flight

    def recover(self):
        """Mark FAIL, and queue again, the trials whose workers stopped sending heartbeats."""
        import optuna
        from optuna.trial import TrialState

        if not self.heartbeats:
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(self.study)
        # A trial with no heartbeat at all (its worker died within a moment of taking it, or
        # an older fastnn ran it) is never stale to Optuna: after it has run a grace period
        # as seen from here, it gets one heartbeat, so that its owner's silence shows.
        now = time.monotonic()
        for trial in self.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if trial._trial_id in self.held:
                continue
            seen = self.first_seen.setdefault(trial.number, now)
            if seen is not None and now - seen > self.grace:
                self.first_seen[trial.number] = None
                self.storage.record_heartbeat(trial._trial_id)

    def hand_back(self, trial_id):
        """Mark a trial FAIL and queue it again, as a worker that finds it lost does."""
        import optuna
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        with self._lock:
            self.held.pop(trial_id, None)
        callback = getattr(self.storage, "get_heartbeat_stale_trial_callback", lambda: None)()
        try:
            if not self.storage.set_trial_state_values(trial_id, TrialState.FAIL):
                return
        except UpdateFinishedTrialError:
            return
        if callback is not None:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                callback(self.study, self.storage.get_trial(trial_id))

    def reclaim_running(self):
        """Queue again what a killed session left RUNNING (a study in this worker's own folder)."""
        from optuna.trial import TrialState

        for trial in self.study.get_trials(states=(TrialState.RUNNING,)):
            self.hand_back(trial._trial_id)

    def take(self, k):
        """Up to k trials for one stack, as [(trial, slot)]; [] when the study has none to give.

        Queued trials come first (retries of lost ones, the baseline), only
        those of one structure, since a stack shares its structure; then new
        trials while the study has room.
        """
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        self.recover()
        trials = self.study.get_trials(deepcopy=False)
        taken, structure = [], None
        for queued in trials:
            if queued.state != TrialState.WAITING or len(taken) == k:
                continue
            pinned = pinned_structure(queued)
            if taken and (None in structure or pinned != structure):
                continue
            try:  # atomic: of the workers that try, one gets it
                claimed = self.storage.set_trial_state_values(queued._trial_id, TrialState.RUNNING)
            except UpdateFinishedTrialError:
                claimed = False
            if claimed:
                taken.append((self._hold(queued._trial_id), trial_key(queued)))
                structure = pinned
        _, slots, _ = self.progress(trials)
        new = [self._hold(self.storage.create_new_trial(self.study_id))
               for _ in range(min(k - len(taken), self.trials - len(slots)))]
        if new:
            # Another worker may have taken the last slots since `trials` was read: numbers
            # are handed out in order, so the N smallest slots are the study's.
            _, slots, _ = self.progress()
            for trial in new:
                if sum(slot < trial.number for slot in slots) < self.trials:
                    taken.append((trial, trial.number))
                else:
                    trial.set_user_attr("skipped", "the study had --trials slots taken before it")
                    self.finish(trial, state=TrialState.FAIL)
        return taken

    def finish(self, trial, value=None, state=None, failed=None):
        """Tell Optuna the trial's end; False when another worker declared it lost meanwhile.

        `failed` (a reason) marks a trial that failed by itself: a result, not run again.
        """
        from optuna.exceptions import UpdateFinishedTrialError

        with self._lock:
            self.held.pop(trial._trial_id, None)
        try:
            if failed:
                trial.set_user_attr("failed", failed)
            self.study.tell(trial, value, state=state)
            return True
        except UpdateFinishedTrialError:
            self.log(f"trial {trial.number}: dropped, another worker found it lost (no heartbeat "
                     f"for {self.grace} s) and runs it again")
            return False


# A configuration known to do well on CIFAR-10 (about 0.62 test accuracy after
# 30 epochs with flips and a one-cycle schedule): the first trial of a new study, so the
# search starts from it.
BASELINE = models.MODELS["fc"].search.baseline


def run_round(worker, taken, data, options, clock, log):
    """Train the trials `taken` (worker.take's [(trial, slot)]) as one stack.

    Returns (outcome, round_best, model_epochs): outcome lists (trial number,
    val_acc or None) per trial; round_best is (val_acc, config, model, trial
    number) of the round's best trial, or None; model_epochs counts the
    epochs its nets trained, for pacing.
    """
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from fastnn.stacked import StackedFullyConnectedNet, StackedSolver

    trials = [trial for trial, _ in taken]
    structure = suggest_structure(trials[0])  # a queued trial brings its own
    members = []
    configs = []
    for i, (trial, slot) in enumerate(taken):
        with warnings.catch_warnings():
            # A retry holds its lost trial's values already: they win over the ranges asked
            # for here (a lost stack's first trial can lead the new stack, or follow).
            warnings.filterwarnings("ignore", "Inconsistent parameter values", RuntimeWarning)
            if i:
                suggest_structure(trial, fixed=structure)
            member = suggest_member(trial)
        # A retry draws the weights its lost trial would have: the seed follows the slot.
        config = train_config(structure, member, options, slot)
        trial.set_user_attr("config", config)
        members.append({"weight_scale": member["weight_scale"], "reg": member["reg"],
                        "dropout": member["dropout"], "seed": config["model_seed"]})
        configs.append(config)

    stack = StackedFullyConnectedNet(hidden_dims(structure), members, use_batchnorm=True)
    by_member = dict(enumerate(trials))
    lost = set()  # members another worker declared lost (this worker's heartbeats stalled)
    round_start = time.perf_counter()

    def on_epoch_end(epoch, val_accs):
        prune = []
        out_of_time = clock.left() < RESERVE_SECONDS + options["final_seconds"]
        for member_id, acc in val_accs.items():
            trial = by_member[member_id]
            try:
                trial.report(acc, epoch)
            except UpdateFinishedTrialError:
                lost.add(member_id)
                prune.append(member_id)
                continue
            if epoch < options["epochs"] and (out_of_time or trial.should_prune()):
                prune.append(member_id)  # never at the last epoch: that trial is complete
        return prune

    solver = StackedSolver(
        stack, data, update_rule=configs[0]["update_rule"],
        optim_configs=[{"learning_rate": c["learning_rate"]} for c in configs],
        lr_decay=structure["lr_decay"], lr_schedule=configs[0]["lr_schedule"],
        batch_size=configs[0]["batch_size"], num_epochs=options["epochs"],
        seed=options["seed"], augment=augment_options(configs[0]), on_epoch_end=on_epoch_end)
    wait(0, worker.stop)  # a signal since the trials were taken (the Solver sees only its own)
    solver.train()
    outcome, best_id, model_epochs = [], None, 0
    for member_id, trial in by_member.items():
        result = solver.results[member_id]
        model_epochs += max(len(result["val_acc_history"]) - 1, 0)
        value = result["best_val_acc"]
        name = f"trial {trial.number}" + (f" (retry of {taken[member_id][1]})"
                                          if taken[member_id][1] != trial.number else "")
        if member_id in lost:
            worker.finish(trial, state=TrialState.FAIL)  # logs that it was dropped
            continue
        if result["status"] == "failed" or not np.isfinite(value):
            if worker.finish(trial, state=TrialState.FAIL, failed="non-finite loss"):
                log(f"{name}: failed (non-finite loss)")
                outcome.append((trial.number, None))
            continue
        state = TrialState.PRUNED if result["status"] == "pruned" else None
        if not worker.finish(trial, None if state else value, state=state):
            continue
        outcome.append((trial.number, value))
        if best_id is None or value > solver.results[best_id]["best_val_acc"]:
            best_id = member_id
        config = configs[member_id]
        log(f"{name}: val {value:.4f} ({result['status']}) "
            f"{models.MODELS['fc'].search.summary(config)}")
    budget = "" if clock.deadline is None else f"; {clock.left():.0f} s of budget left"
    log(f"round of {len(trials)} took {time.perf_counter() - round_start:.0f} s{budget}")
    round_best = None
    if best_id is not None:  # only the round's best becomes a model: building one costs
        round_best = (solver.results[best_id]["best_val_acc"], configs[best_id],
                      solver.best_model(best_id), by_member[best_id].number)
    return outcome, round_best, model_epochs


def model_defaults(model):
    """--parallel, --epochs and --crop-padding of a search of `model` when not given."""
    search = models.MODELS[model].search
    return {"parallel": search.parallel, "epochs": search.epochs,
            "crop_padding": search.crop_padding}


def conv_baseline(model="convnet"):
    """The first trial of a new study of `model` (one trained one at a time)."""
    return models.MODELS[model].search.baseline


def conv_train_config(params, options, slot):
    """A `fastnn train` configuration for one trial trained alone: its model's recipe with
    `params`, the architecture (the model's tune flags) and schedule of `options` (cli's tune
    flags); the weights' seed follows the slot, as train_config's does."""
    model = options.get("model", "convnet")
    config = {**defaults_for(model), **params, "epochs": options["epochs"],
              "lr_schedule": None if options["lr_schedule"] == "none" else options["lr_schedule"],
              "crop_padding": options["crop_padding"], "seed": options["seed"],
              "model_seed": options["seed"] + slot}
    for key in models.MODELS[model].search.flags:
        if options.get(key) is not None:
            config[key] = options[key]
    for key in ("data", "num_training", "num_validation", "num_test"):  # as train_config
        config[key] = options[key]
    return recorded(config)


def run_conv_trial(worker, taken, data, options, clock, log):
    """Train one trial (worker.take(1)'s [(trial, slot)]) of a model searched one trial at a
    time (convnet) with the plain Solver; returns (outcome, trial_best, model_epochs) as
    run_round does."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    (trial, slot), = taken
    with warnings.catch_warnings():  # a retry holds its lost trial's values already
        warnings.filterwarnings("ignore", "Inconsistent parameter values", RuntimeWarning)
        search = models.MODELS[options.get("model", "convnet")].search
        params = {name: _suggest(trial, name, spec) for name, spec in search.space.items()}
    config = conv_train_config(params, options, slot)
    trial.set_user_attr("config", config)
    start = time.perf_counter()
    model = build_model(config)
    solver = build_solver(model, data, config, out_dir=None, verbose=False)
    wait(0, worker.stop)  # a signal since the trial was taken (the Solver sees only its own)
    try:
        solver.train()  # Ctrl-C: TrainingInterrupted, and tune() hands the trial back
    except FloatingPointError:
        if worker.finish(trial, state=TrialState.FAIL, failed="non-finite loss"):
            log(f"trial {trial.number}: failed (non-finite loss)")
            return [(trial.number, None)], None, solver.epoch
        return [], None, solver.epoch
    # the epoch-end entries (with one iteration per epoch the first one is also one)
    epoch_ends = solver.val_acc_history[-solver.epoch:] if solver.epoch else []
    try:
        for epoch, acc in enumerate(epoch_ends, start=1):
            trial.report(acc, epoch)
    except UpdateFinishedTrialError:
        pass  # another worker found it lost: finish() below says so
    value = solver.best_val_acc
    if not worker.finish(trial, value):
        return [], None, solver.epoch
    budget = "" if clock.deadline is None else f"; {clock.left():.0f} s of budget left"
    log(f"trial {trial.number}: val {value:.4f} (complete) {config['model']} "
        f"{search.summary(config)}; {time.perf_counter() - start:.0f} s{budget}")
    return [(trial.number, value)], (value, config, model, trial.number), solver.epoch


def retrain(config, data, epochs, log):
    """Train `config` for `epochs` with the plain Solver; returns (model, best val acc)."""
    config = {**config, "epochs": epochs, "print_every": 10**9}
    model = build_model(config)
    solver = build_solver(model, data, config, out_dir=None)
    solver.verbose = False
    solver.train()
    log(f"retrained the best configuration for {epochs} epochs: val {solver.best_val_acc:.4f}")
    return model, solver.best_val_acc


def write_trials_table(study, path):
    """All trials of the study, best first, as CSV."""
    trials = sorted(study.get_trials(deepcopy=False),
                    key=lambda t: -(t.value if t.value is not None else -1))
    names = sorted({name for t in trials for name in t.params})
    with atomic_write(path, text=True, newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["rank", "number", "state", "val_acc", "epochs_reported", "worker",
                         "note", *names])
        for rank, t in enumerate(trials, start=1):
            writer.writerow([rank, t.number, t.state.name, t.value, len(t.intermediate_values),
                             t.user_attrs.get("worker"), trial_note(t),
                             *[t.params.get(n) for n in names]])


def trial_note(trial):
    """Why a trial is as it is, for trials.csv: failed, skipped, lost, or a retry."""
    from optuna.trial import TrialState

    notes = []
    if trial_key(trial) != trial.number:
        notes.append(f"retry of {trial_key(trial)}")
    for attr in ("failed", "skipped"):
        if attr in trial.user_attrs:
            notes.append(f"{attr}: {trial.user_attrs[attr]}")
    if trial.state == TrialState.FAIL and not {"failed", "skipped"} & trial.user_attrs.keys():
        notes.append("lost: its worker stopped")
    return "; ".join(notes)


def plot_study(study, out_dir):
    """val_acc per trial (final and per-epoch), and parameter importances when Optuna can."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import optuna

    fig, ax = plt.subplots(figsize=(7, 4))
    for t in study.get_trials(deepcopy=False):
        if t.intermediate_values:
            ax.plot([t.number] * len(t.intermediate_values), list(t.intermediate_values.values()),
                    ".", color="0.7", markersize=3)
        if t.value is not None:
            ax.plot(t.number, t.value, "o", color="C0")
    ax.set(xlabel="trial", ylabel="validation accuracy",
           title="Validation accuracy per trial (grey: per epoch)")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))  # trial numbers
    save_figure(fig, os.path.join(out_dir, "trials.png"))
    try:
        with warnings.catch_warnings():  # few trials per value: rough, and it says so
            warnings.simplefilter("ignore")
            importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError):  # too few finished trials
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list(importances)[::-1]
    ax.barh(names, [importances[n] for n in names])
    ax.set(xlabel="importance (Optuna default evaluator)", title="Hyperparameter importances")
    save_figure(fig, os.path.join(out_dir, "importances.png"))


def previous_best(out_dir):
    """The best of an earlier session in out_dir (--resume), as tune() keeps it, or None."""
    import fastnn

    json_path = os.path.join(out_dir, "best.json")
    model_path = os.path.join(out_dir, "best_model.npz")
    if not (os.path.exists(json_path) and os.path.exists(model_path)):
        return None
    saved = read_json(json_path, BEST_FORMAT, FORMAT_VERSION)
    return saved["val_acc"], saved["config"], fastnn.load(model_path), saved["trial"]


class TuneStopped(Exception):
    """The search stopped early (a signal, a lost storage): `status` is the exit status;
    the message says why and what was written."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


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
            model_defaults(options.get("model", "fc"))["epochs"]
    elif theirs and theirs != {options["epochs"]}:
        where = describe_storage(options["storage"])
        shown = " and ".join(str(e) for e in sorted(theirs))
        raise SystemExit(f"fastnn: study {study.study_name!r} in the {where} trains its trials "
                         f"for {shown} epochs, not --epochs {options['epochs']} (their accuracies "
                         "would not compare); drop --epochs to continue it, start another study "
                         "with --study-name, or retrain the best for longer with --final-epochs")


def tune(options, log=print, data=None):
    """Run the search described by `options` (see cli.py's tune flags); returns best.json's dict.

    `data`: the CIFAR-10 split, when the caller has loaded it already. Ctrl-C or
    SIGTERM, or a database that stays away for options["outage_seconds"], stops
    the search: the trials in training are handed back, what finished is written
    (best.json, best_model.npz, trials.csv, plots), and TuneStopped says so.
    """
    with stop_requests() as stop:  # a signal is acted on between trials (Solver: between steps)
        return _tune(options, log, data, stop)


def _tune(options, log, data, stop):
    import fastnn

    for key, value in model_defaults(options.get("model", "fc")).items():
        if options.get(key) is None and key != "epochs":  # epochs: the study's, if it has any
            options[key] = value
    clock = Clock(options["budget_minutes"], options["start"])
    out_dir = options["out"]
    os.makedirs(out_dir, exist_ok=True)
    # An explicit storage is a shared study: workers join it. The default one is this run's.
    options["shared"] = options["storage"] is not None
    if options["storage"] is None:
        options["storage"] = f"sqlite:///{os.path.abspath(os.path.join(out_dir, 'study.db'))}"
    study = create_study(options, open_storage(options, log, stop))
    check_epochs(study, options)
    setup_runtime(options)
    data = load_data(options) if data is None else data
    # The training splits go to the backend once: every round's Solver then finds them there
    # (on cupy, not one upload of X_train per round). The test split stays on the host.
    data = {**data, **{k: fastnn.xp().asarray(data[k])
                       for k in ("X_train", "y_train", "X_val", "y_val")}}
    if not options["shared"] and not study.trials:
        # Not with a shared storage: workers starting together would each enqueue it.
        study.enqueue_trial(models.MODELS[options.get("model", "fc")].search.baseline)
    best = previous_best(out_dir)  # (val_acc, config, model, trial number)
    trained_here = 0
    stopped = None  # TuneStopped, when the search ends early
    results = None  # trials with a result in the study (None: the storage is gone)
    with Worker(study, options, log) as worker:
        worker.stop = stop
        if not options["shared"]:
            worker.reclaim_running()
        round_seconds = None  # the first round always runs; its trials stop at the deadline
        waiting = False
        try:
            while True:
                wait(0, stop)
                if round_seconds is not None and \
                        clock.left() < RESERVE_SECONDS + options["final_seconds"] + round_seconds:
                    log("stopping the search: the budget is nearly spent")
                    break
                taken = worker.take(options["parallel"])
                if not taken:  # the study is full: done, or trials in flight on other workers
                    results, _, in_flight = worker.progress()
                    if results >= options["trials"] or not in_flight:
                        break
                    if not worker.heartbeats:
                        log(f"{in_flight} trials run on other workers; this one stops (a journal "
                            "storage keeps no heartbeats, so a lost trial is not run again)")
                        break
                    if clock.left() < RESERVE_SECONDS + options["final_seconds"] + \
                            worker.interval:
                        log("stopping: the budget is nearly spent")
                        break
                    if not waiting:
                        log(f"waiting for {in_flight} trials on other workers: a trial whose "
                            f"worker stops for {worker.grace} s runs again here")
                    waiting = True
                    wait(worker.interval, stop)
                    continue
                waiting = False
                round_start = time.perf_counter()
                stacked = models.MODELS[options.get("model", "fc")].search.stacked
                trainer = run_round if stacked else run_conv_trial
                outcome, round_best, model_epochs = trainer(worker, taken, data, options, clock,
                                                            log)
                round_seconds = time.perf_counter() - round_start
                trained_here += len(outcome)
                if options["final_epochs"] and model_epochs:  # a retrain's cost, at this pace
                    per_model_epoch = round_seconds / model_epochs
                    options["final_seconds"] = 1.5 * per_model_epoch * options["final_epochs"]
                if round_best is not None and (best is None or round_best[0] > best[0]):
                    best = round_best
            results = worker.progress()[0]
        except TrainingInterrupted as interrupt:  # the first signal (a second one: at once)
            name = signal.Signals(interrupt.signum).name
            log(f"{name}: handing back the trials in training")
            worker.hand_back_all()
            stopped = TuneStopped(f"stopped by {name}", 128 + int(interrupt.signum))
            with contextlib.suppress(StorageUnavailable):
                results = worker.progress()[0]
        except StorageUnavailable as lost:  # its trials run again elsewhere after the grace
            again = f"the trials in training here run again on another worker after " \
                f"--grace-seconds {worker.grace}"
            if stop.requested:  # a signal while waiting for the database
                name = signal.Signals(stop.signum).name
                stopped = TuneStopped(f"stopped by {name}: {lost}; {again}",
                                      128 + int(stop.signum))
            else:
                stopped = TuneStopped(f"{lost}; {again}", 1)
    if best is None:
        if stopped is not None:
            raise TuneStopped(f"{stopped}; no trial had finished here, nothing was written",
                              stopped.status)
        if results >= options["trials"]:
            raise SystemExit(f"fastnn: study {options['study_name']!r} already has {results} "
                             f"trials with a result (--trials {options['trials']}); raise "
                             "--trials to run more")
        raise SystemExit("fastnn: no trial finished; raise --budget-minutes or --trials")
    if stopped is None and options["final_epochs"] and \
            clock.left() > RESERVE_SECONDS + options["final_seconds"]:
        value, config, model, number = best
        try:
            retrained, retrained_val = retrain(config, data, options["final_epochs"], log)
        except TrainingInterrupted as interrupt:  # the search's best is kept
            name = signal.Signals(interrupt.signum).name
            stopped = TuneStopped(f"stopped by {name} while retraining the best configuration",
                                  128 + int(interrupt.signum))
        else:
            if retrained_val >= value:
                best = (retrained_val, {**config, "epochs": options["final_epochs"]},
                        retrained, number)
    result = write_results(study if results is not None else None, best, data, options,
                           results, trained_here, log)
    if stopped is not None:
        written = "best.json, best_model.npz, trials.csv and plots" if results is not None \
            else "best.json and best_model.npz"
        raise TuneStopped(f"{stopped}; {written} of the {trained_here} trials finished here are "
                          f"in {out_dir}", stopped.status)
    return result


def write_results(study, best, data, options, results, trained_here, log):
    """best_model.npz and best.json of `best` (val_acc, config, model, trial number); then
    trials.csv and the plots of `study` (None: its storage is gone, they are left out)."""
    import fastnn

    value, config, model, number = best
    out_dir = options["out"]
    test_acc = float((fastnn.to_numpy(predict(model, data["X_test"],
                                              flip=complete(config)["flip_test"]))
                      == data["y_test"]).mean())
    study_best = {"study_best_trial": None, "study_best_val_acc": None}
    if study is not None:
        with contextlib.suppress(ValueError):  # completed trials only; pruned ones do not count
            study_best = {"study_best_trial": study.best_trial.number,
                          "study_best_val_acc": study.best_value}
    fastnn.save(model, os.path.join(out_dir, "best_model.npz"))
    result = {"config": config, "val_acc": value, "test_acc": test_acc,
              "num_test": int(data["X_test"].shape[0]), "trial": number, **study_best,
              "study_results": results, "worker": options["worker"],
              "worker_trials": trained_here,
              "seconds": round(time.perf_counter() - options["start"], 1)}
    write_json(os.path.join(out_dir, "best.json"), result, BEST_FORMAT, FORMAT_VERSION)
    if study is not None:
        write_trials_table(study, os.path.join(out_dir, "trials.csv"))
        plot_study(study, out_dir)
    log(f"best: val {value:.4f}, test {test_acc:.4f} on {result['num_test']} images "
        f"(trial {number}); {result['seconds']:.0f} s; folder {out_dir}")
    return result
